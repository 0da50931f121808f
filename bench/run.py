"""`make bench`: sdrecipe against its peers and the hardware floor, side by side.

Everything runs in one session on the same files, round-robin over the tools
(so slow phases of a noisy machine hit every tool alike), and BENCHMARKS.md is
regenerated from the medians. Full-size synthetic checkpoints are made once in
build/bench/ and reused. Each peer lives in its own virtualenv there, with
torch==2.13.0 installed first and pinned; a peer that fails to install or run is
reported with its error.

Usage: python -m bench.run [--rounds N]   (BENCH_SDXL=0 leaves out the SDXL scenarios)
       python -m bench.run --only dit         (scenario 15, full-size Flux.1-dev and SD3.5
                                               Large: only when named, it needs ~50 GB of disk)
       python -m bench.run --only quant --rounds 1  (scenario 16, quantized Flux.1-dev inputs
                                               and outputs: only when named, ~60 GB of disk)
       python -m bench.run --only flux_lora   (scenario 17, a rank-32 LoRA baked into and
                                               extracted from full-size bf16 Flux.1-dev:
                                               only when named, 48 GB of files at once and
                                               10 GB left free: ~59 GB free at the start)
       python -m bench.run --report-only      (re-render from build/bench/results.json)
       python -m bench.run --only newer       (scenario 18, the newer methods and TIES against
                                               a cold A + (B - C) and mergekit: only when named)
       python -m bench.run --only svd_sdxl    (scenario 19, iso_c and tsv of full-size SDXL:
                                               only when named, an hour on two cores)
BENCH_DIT_SHRINK=16 python -m bench.run --only dit: the same at a 16th of the widths, to
check that every tool runs and that their outputs agree (also for quant and flux_lora); it
writes build/bench/BENCHMARKS-dit-shrink16.md, not BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.report import DEVICE_TITLES, write_report
from sdrecipe.synthetic import (
    AdapterSpec,
    ModelSpec,
    model_layout,
    write_adapter,
    write_model_set,
)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "bench"
BENCH = ROOT / "bench"
PYTHON = sys.executable
SDRECIPE = [PYTHON, "-m", "sdrecipe"]
MODEL_SPEC_VERSION = 2  # bump when sdrecipe.synthetic's values change
RESULTS = WORK / "results.json"  # the last run's raw figures (see --report-only)

SD15_MODELS = {
    "sd15-A.safetensors": ModelSpec(seed=11, delta_seed=21),
    "sd15-B.safetensors": ModelSpec(seed=11, delta_seed=22),
    "sd15-C.safetensors": ModelSpec(seed=11),
    "sd15-D.safetensors": ModelSpec(seed=11, delta_seed=24),
    "sd15-E.safetensors": ModelSpec(seed=11, delta_seed=25),
}
SDXL_MODELS = {
    "sdxl-A.safetensors": ModelSpec(family="sdxl", seed=31, delta_seed=41),
    "sdxl-B.safetensors": ModelSpec(family="sdxl", seed=31, delta_seed=42),
    "sdxl-C.safetensors": ModelSpec(family="sdxl", seed=31),
}
# Scenario 8's block weights (SDXL: BASE, IN00..IN08, M00, OUT00..OUT08), as pasted
# from supermerger; IN04 (the sixth value) is the one changed between rounds.
SDXL_BLOCK_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1"
# Scenario 12's LoRA: kohya's layers of SDXL's UNet and both text encoders, rank 64.
SDXL_LORA = "sdxl-lora64.safetensors"
SDXL_LORA_SPEC = AdapterSpec("sdxl", rank=64, alpha=32.0, seed=51)
PEERS = {
    # name: (requirement, imports it needs but does not declare)
    "sd-meh": ("sd-meh==0.9.5", ["safetensors", "tqdm", "scipy", "tensordict"]),
    "sd-mecha": ("sd-mecha==1.1.8", []),
    "mergekit": ("mergekit==0.1.5", []),
}


@dataclass
class Run:
    """One timed process: wall seconds and peak memory (kB) of its process tree."""

    wall: float
    peak_anon: int
    peak_rss: int
    error: str = ""
    disk_read: int = 0  # bytes the process tree read from disk, not the page cache


@dataclass
class Result:
    """All rounds of one tool in one scenario."""

    runs: list[Run] = field(default_factory=list)

    @property
    def error(self) -> str:
        return next((run.error for run in self.runs if run.error), "")

    def median(self, attribute: str) -> float:
        values = [getattr(run, attribute) for run in self.runs if not run.error]
        return statistics.median(values) if values else float("nan")


def _tree(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        try:
            tasks = os.listdir(f"/proc/{pids[index]}/task")
            for task in tasks:
                with open(f"/proc/{pids[index]}/task/{task}/children") as handle:
                    pids += [int(child) for child in handle.read().split()]
        except OSError:
            pass
        index += 1
    return pids


def _memory(pids: list[int]) -> tuple[int, int]:
    anon = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:
            pass
    return anon, rss


def measure(command: list[str], log: Path, cwd: Path = WORK) -> Run:
    """Run `command`, sampling its process tree's memory every 10 ms."""
    blocks_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    with open(log, "w") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        peak = [0, 0]

        def sample() -> None:
            while process.poll() is None:
                anon, rss = _memory(_tree(process.pid))
                peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        wall = time.perf_counter() - started
        sampler.join()
    error = ""
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        error = f"exit {code}: " + " | ".join(line.strip()[:200] for line in tail)
    # Waited-for children's block input, in 512-byte units (Linux counts page-cache
    # misses, so this is what came from the disk).
    blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - blocks_before
    return Run(wall, peak[0], peak[1], error, blocks * 512)


# --- setup ---------------------------------------------------------------------------


def stale(name: str, spec: ModelSpec | AdapterSpec) -> bool:
    """Whether the checkpoint `name` is missing or was made from another spec."""
    manifest = WORK / "models.json"
    known = json.loads(manifest.read_text()) if manifest.exists() else {}
    return known.get(name) != f"{MODEL_SPEC_VERSION}:{spec}" or not (WORK / name).exists()


def ensure_models(models: dict[str, ModelSpec]) -> None:
    """Generate the full-size checkpoints once; regenerate if their spec changed."""
    manifest = WORK / "models.json"
    known = json.loads(manifest.read_text()) if manifest.exists() else {}
    for name, spec in models.items():
        wanted = f"{MODEL_SPEC_VERSION}:{spec}"
        if stale(name, spec):
            (WORK / name).unlink(missing_ok=True)
            size = "full size" if spec.shrink == 1 else f"widths / {spec.shrink}"
            print(f"generating {name} ({size})", flush=True)
            write_model_set(WORK, {name: spec}, shrink=1)
            known[name] = wanted
            manifest.write_text(json.dumps(known, indent=1))


def ensure_adapter(name: str, spec: AdapterSpec) -> None:
    """Generate a synthetic adapter once; regenerate if its spec changed."""
    manifest = WORK / "models.json"
    known = json.loads(manifest.read_text()) if manifest.exists() else {}
    wanted = f"{MODEL_SPEC_VERSION}:{spec}"
    if known.get(name) != wanted or not (WORK / name).exists():
        size = "full size" if spec.shrink == 1 else f"widths / {spec.shrink}"
        print(f"generating {name} ({size})", flush=True)
        write_adapter(WORK / name, spec)
        known[name] = wanted
        manifest.write_text(json.dumps(known, indent=1))


def ensure_peer(name: str) -> str:
    """Create the peer's virtualenv if needed; return an install error, or ''."""
    requirement, extras = PEERS[name]
    venv = WORK / f"venv-{name}"
    marker = venv / ".installed"
    if marker.exists() and marker.read_text() == requirement:
        return ""
    constraints = WORK / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    steps = [
        [PYTHON, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
        [str(venv / "bin" / "pip"), "install", "-q", "-c", str(constraints), requirement, *extras],
    ]
    print(f"installing {requirement} into {venv.name}", flush=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return f"install failed: {' '.join(step[-2:])}: {done.stderr.strip()[-300:]}"
    marker.write_text(requirement)
    return ""


# --- the tools, as commands ------------------------------------------------------------


def write_recipes() -> None:
    recipes = {
        "add_difference.yaml": """
inputs: {A: sd15-A.safetensors, B: sd15-B.safetensors, C: sd15-C.safetensors}
nodes: {merged: A + (B - C)}
outputs: {merged: {path: out-sdrecipe.safetensors, dtype: fp16}}
""",
        "weighted_sum.yaml": """
inputs: {A: sd15-A.safetensors, B: sd15-B.safetensors}
nodes: {merged: "weighted_sum(A, B, alpha=0.3)"}
outputs: {merged: {path: out-sdrecipe.safetensors, dtype: fp16}}
""",
        "five_inputs.yaml": """
inputs:
  A: sd15-A.safetensors
  B: sd15-B.safetensors
  C: sd15-C.safetensors
  D: sd15-D.safetensors
  E: sd15-E.safetensors
nodes:
  style: B - C
  detail: D - E
  merged: A + 0.5 * style + 0.5 * detail
outputs: {merged: {path: out-five.safetensors, dtype: fp16}}
""",
        "sdxl.yaml": """
inputs: {A: sdxl-A.safetensors, B: sdxl-B.safetensors, C: sdxl-C.safetensors}
nodes: {merged: A + (B - C)}
outputs: {merged: {path: out-sdxl.safetensors, dtype: fp16}}
""",
        "sdxl_ties.yaml": """
inputs: {A: sdxl-A.safetensors, B: sdxl-B.safetensors, C: sdxl-C.safetensors}
nodes: {merged: "ties(C, A, B, density=0.2)"}
outputs: {merged: {path: out-sdxl-ties.safetensors, dtype: fp16}}
""",
        "sdxl_blocks.yaml": f"""
inputs: {{A: sdxl-A.safetensors, B: sdxl-B.safetensors}}
nodes:
  blended: {{method: weighted_sum, models: [A, B], alpha: "{SDXL_BLOCK_ALPHAS}"}}
outputs: {{blended: {{path: out-sdxl-blocks.safetensors, dtype: fp16}}}}
""",
    }
    recipes["sdxl_lora.yaml"] = f"""
inputs: {{A: sdxl-A.safetensors, L: {SDXL_LORA}}}
nodes: {{baked: A + 0.8 * L}}
outputs: {{baked: {{path: out-sdxl-lora.safetensors, dtype: fp16}}}}
"""
    recipes["sdxl_convert.yaml"] = """
inputs: {A: sdxl-A.safetensors}
nodes: {model: A}
outputs: {model: {path: out-sdxl-convert.safetensors, dtype: fp16}}
"""
    recipes["extract_lora.yaml"] = """
inputs: {B: sd15-B.safetensors, C: sd15-C.safetensors}
nodes: {learned: B - C}
outputs: {learned: {path: out-lora.safetensors, format: lora, rank: 64}}
"""
    # Scenario 3b: the same recipe with both intermediates kept out of the cache.
    recipes["five_inputs_uncached.yaml"] = (
        recipes["five_inputs.yaml"]
        .replace("style: B - C", "style: {expression: B - C, cache: false}")
        .replace("detail: D - E", "detail: {expression: D - E, cache: false}")
        .replace("out-five.safetensors", "out-five-uncached.safetensors")
    )
    # Issue 12's methods over the same SD1.5 files: base C and three fine-tunes.
    advanced = {
        "ties": "ties(C, A, B, D, density=0.2)",
        "dare_ties": "dare_ties(C, A, B, D, drop=0.9, seed=0)",
        "slerp": "slerp(A, B, t=0.5)",
        # Issue 32's methods, at their defaults.
        "breadcrumbs": "breadcrumbs(C, A, B, D, density=0.9, gamma=0.01)",
        "della": "della(C, A, B, D, drop=0.3, epsilon=0.1, seed=0)",
        "sce": "sce(C, A, B, D, select_topk=1.0)",
        "iso_c": "iso_c(C, A, B, D)",
        "tsv": "tsv(C, A, B, D)",
    }
    for method, call in advanced.items():
        recipes[f"{method}.yaml"] = (
            "inputs: {A: sd15-A.safetensors, B: sd15-B.safetensors, C: sd15-C.safetensors, "
            "D: sd15-D.safetensors}\n"
            f'nodes: {{merged: "{call}"}}\n'
            "outputs: {merged: {path: out-sdrecipe.safetensors, dtype: fp16}}\n"
        )
    for method in SVD_METHODS:  # the same on full-size SDXL (scenario 19, opt-in)
        recipes[f"sdxl_{method}.yaml"] = (
            "inputs: {A: sdxl-A.safetensors, B: sdxl-B.safetensors, C: sdxl-C.safetensors}\n"
            f'nodes: {{merged: "{method}(C, A, B)"}}\n'
            f"outputs: {{merged: {{path: out-sdxl-{method}.safetensors, dtype: fp16}}}}\n"
        )
    # Caching that pays: a TIES intermediate, then a downstream factor that changes.
    recipes["ties_downstream.yaml"] = """
inputs: {A: sd15-A.safetensors, B: sd15-B.safetensors, C: sd15-C.safetensors, D: sd15-D.safetensors}
nodes:
  tuned: "ties(C, A, B, D, density=0.2) - C"
  merged: A + 0.5 * tuned
outputs: {merged: {path: out-ties-downstream.safetensors, dtype: fp16}}
"""
    for name, text in recipes.items():
        (WORK / name).write_text(text.lstrip())
    mergekit_advanced = {
        "ties": "merge_method: ties\nbase_model: sd15-C.safetensors\n"
        + _mergekit_models(["A", "B", "D"], "{density: 0.2, weight: 1.0}"),
        "dare_ties": "merge_method: dare_ties\nbase_model: sd15-C.safetensors\n"
        + _mergekit_models(["A", "B", "D"], "{density: 0.1, weight: 1.0}"),
        "breadcrumbs": "merge_method: breadcrumbs\nbase_model: sd15-C.safetensors\n"
        + _mergekit_models(["A", "B", "D"], "{density: 0.9, gamma: 0.01, weight: 1.0}"),
        # sdrecipe's della is mergekit's della_linear; mergekit's density is 1 - drop.
        "della": "merge_method: della_linear\nbase_model: sd15-C.safetensors\n"
        + _mergekit_models(["A", "B", "D"], "{density: 0.7, epsilon: 0.1, weight: 1.0}"),
        "sce": "merge_method: sce\nbase_model: sd15-C.safetensors\n"
        + _mergekit_models(["A", "B", "D"], "{weight: 1.0}")
        + "parameters: {select_topk: 1.0}\n",
        "slerp": "merge_method: slerp\nbase_model: sd15-A.safetensors\n"
        + _mergekit_models(["A", "B"], "{}")
        + "parameters: {t: 0.5}\n",
    }
    for method, text in mergekit_advanced.items():
        (WORK / f"mergekit-{method}.yml").write_text(text + "dtype: float32\nout_dtype: float16\n")
    for method, weights in (("add_difference", (1.0, 1.0)), ("weighted_sum", (0.7, 0.3))):
        a, b = weights
        base = "\nbase_model: sd15-C.safetensors" if method == "add_difference" else ""
        merge = "task_arithmetic" if method == "add_difference" else "linear"
        (WORK / f"mergekit-{method}.yml").write_text(
            f"merge_method: {merge}{base}\nmodels:\n"
            f"  - model: sd15-A.safetensors\n    parameters: {{weight: {a}}}\n"
            f"  - model: sd15-B.safetensors\n    parameters: {{weight: {b}}}\n"
            "parameters: {normalize: false}\ndtype: float32\nout_dtype: float16\n"
        )


def _mergekit_models(names: list[str], parameters: str) -> str:
    return "models:\n" + "".join(
        f"  - model: sd15-{name}.safetensors\n    parameters: {parameters}\n" for name in names
    )


FOUR_INPUTS = [f"sd15-{name}.safetensors" for name in ("C", "A", "B", "D")]  # base first
ADVANCED_INPUTS = {"ties": FOUR_INPUTS, "dare_ties": FOUR_INPUTS, "slerp": FOUR_INPUTS[1:3]}
NEWER_METHODS = ("breadcrumbs", "della", "sce")  # scenario 18, against mergekit
SVD_METHODS = ("iso_c", "tsv")  # no peer has them: sdrecipe alone


def _venv_bin(name: str) -> str:
    return str(WORK / f"venv-{name}" / "bin")


def _sdrecipe_and_peers(method: str, peer_args: list[str]) -> dict[str, list[str]]:
    """sdrecipe, sd-mecha and mergekit on `method` (mergekit reads its own config)."""
    return {
        "sdrecipe": [*SDRECIPE, "build", "--force", "--cache-dir", "cache", f"{method}.yaml"],
        "sd-mecha": [
            f"{_venv_bin('sd-mecha')}/python",
            str(BENCH / "peer_sd_mecha.py"),
            method,
            "out-sd-mecha.safetensors",
            *peer_args,
        ],
        "mergekit": [
            f"{_venv_bin('mergekit')}/mergekit-pytorch",
            f"mergekit-{method}.yml",
            "out-mergekit",
        ],
    }


def advanced_commands(method: str) -> dict[str, list[str]]:
    """Each tool's command for `method` (TIES, DARE-TIES or SLERP)."""
    return _sdrecipe_and_peers(method, ADVANCED_INPUTS[method])


def tool_commands(method: str) -> dict[str, list[str]]:
    """Each tool's command for `method` over the same SD1.5 inputs, fp16 output."""
    models = ["sd15-A.safetensors", "sd15-B.safetensors"]
    if method == "add_difference":
        models.append("sd15-C.safetensors")
        floor_args = [*models, "out-floor.safetensors"]
        peer_args = models
    else:
        floor_args = [*models, "out-floor.safetensors", "0.3"]
        peer_args = [*models, "0.3"]
    commands = _sdrecipe_and_peers(method, peer_args)
    return {
        "sdrecipe": commands["sdrecipe"],
        "floor (minimal loop)": [PYTHON, str(BENCH / "floor.py"), method, *floor_args],
        "sd-meh": [
            f"{_venv_bin('sd-meh')}/python",
            str(BENCH / "peer_sd_meh.py"),
            method,
            "out-sd-meh.safetensors",
            *peer_args,
        ],
        "sd-mecha": commands["sd-mecha"],
        "mergekit": commands["mergekit"],
    }


# --- scenarios ---------------------------------------------------------------------------


def side_by_side(
    name: str,
    commands: dict[str, list[str]],
    rounds: int,
    skip: dict[str, str],
    before: Callable[[], None] = lambda: None,
) -> dict[str, Result]:
    """Every tool once per round, in turn, on the same files; `before` runs
    before each tool (to give every run the same page cache, say)."""
    results = {tool: Result() for tool in commands}
    for round_ in range(rounds):
        for tool, command in commands.items():
            if tool in skip:
                continue
            remove_outputs()
            before()
            run = measure(command, WORK / "logs" / f"{name}-{tool.split()[0]}-{round_}.log")
            results[tool].runs.append(run)
            status = run.error or f"{run.wall:.1f} s, {run.peak_anon / 1024:.0f} MB anon"
            print(f"  {name} round {round_ + 1}: {tool}: {status}", flush=True)
    for tool, reason in skip.items():
        results[tool].runs.append(Run(float("nan"), 0, 0, reason))
    return results


def repeated(name: str, command: list[str], rounds: int, before: Callable[[], None]) -> Result:
    result = Result()
    for round_ in range(rounds):
        before()
        run = measure(command, WORK / "logs" / f"{name}-{round_}.log")
        result.runs.append(run)
        print(f"  {name} round {round_ + 1}: {run.error or f'{run.wall:.2f} s'}", flush=True)
    return result


def cold_builds(name: str, recipe: str, rounds: int) -> Result:
    """`sdrecipe build --force RECIPE` each round from an emptied tensor cache, its
    inputs' fingerprints known; the cache is emptied again after."""
    hash_inputs(recipe)
    command = [*SDRECIPE, "build", "--force", "--cache-dir", "cache", recipe]
    result = repeated(name, command, rounds, free_cache)
    free_cache()
    return result


def hash_inputs(recipe: str) -> None:
    """Hash `recipe`'s inputs into the bench cache, so that timed builds merge only."""
    command = [*SDRECIPE, "plan", "--cache-dir", "cache", recipe]
    subprocess.run(command, cwd=WORK, check=True, capture_output=True)


def remove_outputs() -> None:
    """Delete every tool's output (between rounds, so each run writes a new file)."""
    for output in WORK.glob("out-*"):
        shutil.rmtree(output) if output.is_dir() else output.unlink()


def free_cache() -> None:
    """Drop cached tensors and outputs but keep the inputs' fingerprints: cached
    outputs are hard links, and a few full-size ones fill a disk."""
    remove_outputs()
    command = [*SDRECIPE, "cache", "gc", "--max-size", "0", "--cache-dir", "cache"]
    done = subprocess.run(command, cwd=WORK, capture_output=True, text=True)
    if done.returncode != 0:  # say why: a run of hours should not end in a bare exit status
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")


def io_floor() -> dict[str, float]:
    """Reading the three inputs from the page cache, and writing 2.1 GB."""
    started = time.perf_counter()
    for name in ("sd15-A.safetensors", "sd15-B.safetensors", "sd15-C.safetensors"):
        subprocess.run(["cat", str(WORK / name)], stdout=subprocess.DEVNULL, check=True)
    read = time.perf_counter() - started
    size = (WORK / "sd15-A.safetensors").stat().st_size
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={WORK / 'out-dd.bin'}", "bs=8M", f"count={size >> 23}"],
        check=True,
        capture_output=True,
    )
    write = time.perf_counter() - started
    (WORK / "out-dd.bin").unlink()
    return {"read": read, "write": write}


def classic_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenarios 1-6: the classic methods against the peers, caching, hashing."""
    # Fingerprint the inputs once, so "cold" builds below measure merging only.
    for recipe in (
        "add_difference.yaml",
        "weighted_sum.yaml",
        "five_inputs.yaml",
        "five_inputs_uncached.yaml",
    ):
        hash_inputs(recipe)

    print("scenario 1: cold A + (B - C)", flush=True)
    report["add_difference"] = side_by_side(
        "add_difference", tool_commands("add_difference"), rounds, skip
    )
    report["io_floor"] = io_floor()
    free_cache()
    print("scenario 2: cold weighted_sum(A, B, alpha=0.3)", flush=True)
    report["weighted_sum"] = side_by_side(
        "weighted_sum", tool_commands("weighted_sum"), rounds, skip
    )
    free_cache()

    print("scenario 3: five inputs, two named intermediates", flush=True)
    five = [*SDRECIPE, "build", "--force", "--cache-dir", "cache", "five_inputs.yaml"]
    report["five_inputs"] = repeated("five_inputs", five, rounds, lambda: None)
    uncached = [
        *SDRECIPE,
        "build",
        "--force",
        "--cache-dir",
        "cache",
        "five_inputs_uncached.yaml",
    ]
    report["five_inputs_uncached"] = repeated(
        "five_inputs_uncached", uncached, rounds, lambda: None
    )

    print("scenario 4: no-op rebuild", flush=True)
    noop = [*SDRECIPE, "build", "--cache-dir", "cache", "five_inputs.yaml"]
    report["noop"] = repeated("noop", noop, rounds, lambda: None)

    print("scenario 5: alpha change on the output, intermediates cached", flush=True)
    recipe = WORK / "five_inputs.yaml"
    factors = iter(["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"] * rounds)

    def change_alpha() -> None:
        text = recipe.read_text()
        current = text.split("merged: A + ")[1].split(" ")[0]
        recipe.write_text(text.replace(f"A + {current} * style", f"A + {next(factors)} * style"))

    alpha = [*SDRECIPE, "build", "--cache-dir", "cache", "five_inputs.yaml"]
    report["alpha_change"] = repeated("alpha_change", alpha, rounds, change_alpha)

    free_cache()

    print("scenario 6: first-time hashing of new inputs", flush=True)

    def forget_inputs() -> None:
        remove_outputs()
        shutil.rmtree(WORK / "cache-new", ignore_errors=True)

    first = [*SDRECIPE, "build", "--cache-dir", "cache-new", "add_difference.yaml"]
    report["first_time"] = repeated("first_time", first, rounds, forget_inputs)
    fingerprint = [*SDRECIPE, "plan", "--cache-dir", "cache-new", "add_difference.yaml"]
    report["fingerprint_only"] = repeated("fingerprint_only", fingerprint, rounds, forget_inputs)
    forget_inputs()


def advanced_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenarios 9-10: TIES, DARE-TIES and SLERP against the peers; a cached TIES."""
    for method in ("ties", "dare_ties", "slerp"):
        print(f"scenario 9: {method}, side by side", flush=True)
        hash_inputs(f"{method}.yaml")
        report[method] = side_by_side(method, advanced_commands(method), rounds, skip)
        free_cache()

    print("scenario 10: a cached TIES intermediate, then a downstream change", flush=True)
    downstream = WORK / "ties_downstream.yaml"
    cold = [*SDRECIPE, "build", "--force", "--cache-dir", "cache", downstream.name]
    report["ties_cold"] = repeated("ties_cold", cold, rounds, free_cache)
    factors = iter(["0.4", "0.6"] * rounds)

    def change_factor() -> None:
        text = downstream.read_text()
        current = text.split("merged: A + ")[1].split(" ")[0]
        downstream.write_text(text.replace(f"A + {current} *", f"A + {next(factors)} *"))

    again = [*SDRECIPE, "build", "--cache-dir", "cache", downstream.name]
    report["ties_downstream"] = repeated("ties_downstream", again, rounds, change_factor)
    free_cache()
    print("start-up: sdrecipe --help", flush=True)
    report["help"] = repeated("help", [*SDRECIPE, "--help"], max(rounds, 5), lambda: None)


def newer_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 18 (only when named), one run on the SD1.5 inputs: the cold
    `A + (B - C)` that the task-vector methods are held to, TIES and DARE-TIES;
    breadcrumbs, DELLA and SCE side by side with mergekit; iso_c and TSV alone
    (no peer has them)."""
    report["newer_machine"] = machine()  # first: an interrupted run still renders
    print("scenario 18: the baseline, cold A + (B - C)", flush=True)
    report["newer_add_difference"] = cold_builds(
        "newer-add_difference", "add_difference.yaml", rounds
    )
    for method in ("ties", "dare_ties"):
        print(f"scenario 18: {method}, sdrecipe alone", flush=True)
        report[f"newer_{method}"] = cold_builds(f"newer-{method}", f"{method}.yaml", rounds)
    for method in NEWER_METHODS:
        print(f"scenario 18: {method}, side by side with mergekit", flush=True)
        hash_inputs(f"{method}.yaml")
        commands = _sdrecipe_and_peers(method, FOUR_INPUTS)
        del commands["sd-mecha"]  # has none of the three
        report[method] = side_by_side(method, commands, rounds, skip)
        free_cache()
    for method in SVD_METHODS:
        print(f"scenario 18: {method}, sdrecipe alone", flush=True)
        report[method] = cold_builds(method, f"{method}.yaml", rounds)


def svd_sdxl_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 19 (only when named: about an hour on two cores): iso_c and TSV of three
    full-size SDXL models."""
    report["svd_sdxl_machine"] = machine()
    ensure_models(SDXL_MODELS)
    for method in SVD_METHODS:
        print(f"scenario 19: SDXL {method}", flush=True)
        report[f"sdxl_{method}"] = cold_builds(f"sdxl_{method}", f"sdxl_{method}.yaml", rounds)


# Scenario 20's device (`--device`) and its builds' recipes (their titles: DEVICE_TITLES).
DEVICE = "cuda"
DEVICE_RECIPES = {
    "add_difference": "add_difference.yaml",
    "ties": "ties.yaml",
    "sdxl_ties": "sdxl_ties.yaml",
    "sdxl_extract": "sdxl_extract.yaml",
    "dit_flux": "dit-flux.yaml",
}


def device_unavailable(device: str) -> str | None:
    """Why `sdrecipe --device DEVICE` cannot run here, or None."""
    import torch

    from sdrecipe.engine.devices import place
    from sdrecipe.errors import RecipeError

    try:
        placement = place(device)
    except RecipeError as exc:
        return str(exc)
    if placement is None or placement.device.type == "cpu":
        return f"--device {device} computes on the CPU here (torch {torch.__version__} sees no GPU)"
    return None


def device_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 20 (only when named; `--device`, default cuda): the same cold builds
    on the CPU and on the device, side by side in one run. Without a GPU nothing
    runs, and the report says so: GPU figures are measured, never estimated."""
    report["device_machine"] = machine()
    report["device_name"] = DEVICE
    reason = device_unavailable(DEVICE)
    if reason is not None:
        report["device_not_measured"] = reason
        print(f"scenario 20: not measured: {reason}", flush=True)
        return
    import torch

    report["device_card"] = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else DEVICE
    (WORK / "sdxl_extract.yaml").write_text(
        "inputs: {A: sdxl-A.safetensors, C: sdxl-C.safetensors}\n"
        "nodes: {learned: A - C}\n"
        "outputs: {learned: {path: out-sdxl-lora.safetensors, format: lora, rank: 64}}\n"
    )
    for name, title in DEVICE_TITLES:
        recipe = DEVICE_RECIPES[name]
        print(f"scenario 20: {title}, cpu and {DEVICE}", flush=True)
        if name == "dit_flux":
            dit_commands("flux", list(dit_fixtures("flux")))  # writes the recipe
        else:
            ensure_models(SDXL_MODELS if name.startswith("sdxl") else SD15_MODELS)
        hash_inputs(recipe)
        build = [*SDRECIPE, "build", "--force", "--cache-dir", "cache", recipe]
        commands = {"sdrecipe": build, f"sdrecipe --device {DEVICE}": [*build, "--device", DEVICE]}
        report[f"device_{name}"] = side_by_side(f"device-{name}", commands, rounds, {}, free_cache)
    free_cache()


def sdxl_commands() -> dict[str, list[str]]:
    """Scenario 7's tools: inputs and output (27.8 GB) do not fit in the page cache."""
    hash_inputs("sdxl.yaml")
    models = ["sdxl-A.safetensors", "sdxl-B.safetensors", "sdxl-C.safetensors"]
    return {
        "sdrecipe": [*SDRECIPE, "build", "--force", "--cache-dir", "cache", "sdxl.yaml"],
        "floor (minimal loop)": [
            PYTHON,
            str(BENCH / "floor.py"),
            "add_difference",
            *models,
            "out-floor.safetensors",
        ],
        "sd-meh": [
            f"{_venv_bin('sd-meh')}/python",
            str(BENCH / "peer_sd_meh.py"),
            "add_difference",
            "out-sd-meh.safetensors",
            *models,
        ],
    }


def page_cache_state(cached: list[str]) -> Callable[[], None]:
    """A `before` for `side_by_side`: the last run's output is written back
    (sync), every model file and cached output leaves the page cache
    (posix_fadvise; no root needed), then `cached` are read once. Without it a
    run inherits the writeback and the page cache the tool before it left, and
    which tool pays for that depends on the order."""

    def reset() -> None:
        os.sync()
        models = [*WORK.glob("*.safetensors"), *WORK.glob("*.gguf")]
        for path in [*models, *(WORK / "cache" / "packs").glob("*")]:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
        for name in cached:
            subprocess.run(["cat", str(WORK / name)], stdout=subprocess.DEVNULL, check=True)

    return reset


def sdxl_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenarios 7, 8 and 11 on full-size SDXL."""
    print("scenario 7: SDXL A + (B - C), side by side with sd-meh and the floor", flush=True)
    commands = sdxl_commands()
    inputs = list(SDXL_MODELS)
    report["sdxl"] = side_by_side("sdxl", commands, rounds, skip, page_cache_state(inputs))
    report["sdxl_cold"] = side_by_side("sdxl-cold", commands, rounds, skip, page_cache_state([]))
    free_cache()
    report.update(sdxl_block_weights(rounds))
    free_cache()
    print("scenario 11: SDXL ties(C, A, B, density=0.2)", flush=True)
    report["sdxl_ties"] = cold_builds("sdxl_ties", "sdxl_ties.yaml", rounds)


def lora_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 12 (unless BENCH_SDXL=0): a rank-64 LoRA baked into full-size SDXL,
    beside a plain conversion build of the same checkpoint and sd-mecha's bake.
    Scenario 13: a rank-64 LoRA extracted from full-size SD1.5 B - C."""
    if with_sdxl():
        print("scenario 12: SDXL + a rank-64 LoRA, beside a plain conversion", flush=True)
        ensure_adapter(SDXL_LORA, SDXL_LORA_SPEC)
        for name in ("sdxl-A.safetensors", SDXL_LORA):
            subprocess.run(["cat", str(WORK / name)], stdout=subprocess.DEVNULL, check=True)
        for recipe in ("sdxl_lora.yaml", "sdxl_convert.yaml"):
            hash_inputs(recipe)
        commands = {
            "sdrecipe": [*SDRECIPE, "build", "--force", "--cache-dir", "cache", "sdxl_lora.yaml"],
            "sdrecipe-convert": [
                *SDRECIPE,
                *("build", "--force", "--cache-dir", "cache", "sdxl_convert.yaml"),
            ],
            "sd-mecha": [
                f"{_venv_bin('sd-mecha')}/python",
                str(BENCH / "peer_sd_mecha.py"),
                *("lora", "out-sd-mecha.safetensors", "sdxl-A.safetensors", SDXL_LORA, "0.8"),
            ],
        }
        report["sdxl_lora"] = side_by_side("sdxl_lora", commands, rounds, skip)
        free_cache()
    print("scenario 13: a rank-64 LoRA extracted from SD1.5 B - C", flush=True)
    report["extract_lora"] = cold_builds("extract_lora", "extract_lora.yaml", rounds)


SWEEP_ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
SWEEP_MATRIX = f"""
matrix: {{alpha: {list(SWEEP_ALPHAS)}}}
inputs: {{A: sd15-A.safetensors, B: sd15-B.safetensors}}
nodes: {{merged: "weighted_sum(A, B, alpha=${{alpha}})"}}
outputs: {{merged: {{path: "out-sweep-${{alpha}}.safetensors", dtype: fp16}}}}
"""


def sweep_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 14: weighted_sum of two SD1.5 models at five alphas, as one
    matrix recipe and as five separate builds, beside the I/O floor of writing
    five outputs."""
    print("scenario 14: a sweep of five alphas, one matrix recipe vs five builds", flush=True)
    (WORK / "sweep.yaml").write_text(SWEEP_MATRIX)
    separate = []
    for alpha in SWEEP_ALPHAS:
        name = f"sweep-{alpha}.yaml"
        text = SWEEP_MATRIX.split("inputs:", 1)[1].replace("${alpha}", str(alpha))
        (WORK / name).write_text("inputs:" + text.replace("out-sweep-", "out-single-"))
        separate.append(name)
    hash_inputs("sweep.yaml")
    build = [*SDRECIPE, "build", "--force", "--cache-dir", "cache"]
    five = " && ".join(" ".join([*build, name]) for name in separate)
    commands = {
        "sdrecipe": [*build, "sweep.yaml"],
        "sdrecipe, five builds": ["sh", "-c", five],
    }
    report["sweep"] = side_by_side("sweep", commands, rounds, skip)
    size = (WORK / "sd15-A.safetensors").stat().st_size  # fp16, as the outputs
    started = time.perf_counter()
    for index in range(len(SWEEP_ALPHAS)):
        subprocess.run(
            [
                "dd",
                "if=/dev/zero",
                f"of={WORK / f'out-dd-{index}.bin'}",
                "bs=8M",
                f"count={size >> 23}",
            ],
            check=True,
            capture_output=True,
        )
    report["sweep_write_floor"] = time.perf_counter() - started
    free_cache()


# --- scenario 15: full-size DiT checkpoints ------------------------------------------------

# Two bf16 Flux.1-dev transformers and a bf16 output (23.8 GB each, 72 GB) do not fit
# the bench disk, so the inputs are fp8 (float8_e4m3fn, 11.9 GB a Flux file, 8.2 GB an
# SD3.5 Large one) and the output bf16; every tool upcasts to float32 to compute. Flux and
# SD3.5 run one after the other: one family's fixtures are deleted before the other's are made.
FP8 = torch.float8_e4m3fn
DIT_MODELS = {
    "flux": {
        "A": ModelSpec(family="flux1", dtype=FP8, seed=61, delta_seed=71),
        "B": ModelSpec(family="flux1", dtype=FP8, seed=61, delta_seed=72),
    },
    "sd35": {
        "A": ModelSpec(family="sd35-large", dtype=FP8, seed=91, delta_seed=81),
        "B": ModelSpec(family="sd35-large", dtype=FP8, seed=91, delta_seed=82),
        "C": ModelSpec(family="sd35-large", dtype=FP8, seed=91),
    },
}
DIT_METHODS = {"flux": "weighted_sum", "sd35": "add_difference"}
DIT_NODES = {"flux": '"weighted_sum(A, B, alpha=0.3)"', "sd35": "A + (B - C)"}
DIT_DISK_MARGIN = 15e9  # bytes the dit group leaves free on the bench disk
DIT_OUTPUTS = {
    "sdrecipe": "out-dit.safetensors",
    "floor (minimal loop)": "out-floor.safetensors",
    "sd-mecha": "out-sd-mecha.safetensors",
}


def dit_shrink() -> int:
    """BENCH_DIT_SHRINK: divide the dit fixtures' widths (validation runs only)."""
    return int(os.environ.get("BENCH_DIT_SHRINK", "1"))


def dit_models(family: str) -> dict[str, ModelSpec]:
    """File name → spec of `family`'s fixtures, at the size BENCH_DIT_SHRINK asks for."""
    shrink = dit_shrink()
    suffix = f"-shrink{shrink}" if shrink > 1 else ""
    return {
        f"dit-{family}-{letter}{suffix}.safetensors": dataclasses.replace(spec, shrink=shrink)
        for letter, spec in DIT_MODELS[family].items()
    }


def _parameters(spec: ModelSpec) -> int:
    return sum(info.numel for info in model_layout(spec).values())


def dit_fixtures(family: str) -> dict[str, ModelSpec]:
    """Delete the other dit fixtures, check the disk, and make `family`'s if needed."""
    models = dit_models(family)
    for path in WORK.glob("dit-*.safetensors"):
        if path.name not in models:
            print(f"deleting {path.name}", flush=True)
            path.unlink()
    free_cache()
    missing = [name for name, spec in models.items() if stale(name, spec)]
    parameters = _parameters(next(iter(models.values())))
    needed = parameters * (FP8.itemsize * len(missing) + torch.bfloat16.itemsize)
    free = shutil.disk_usage(WORK).free
    if free - needed < DIT_DISK_MARGIN:
        raise SystemExit(
            f"scenario 15 ({family}) needs {needed / 1e9:.1f} GB for its fixtures and output, "
            f"and {DIT_DISK_MARGIN / 1e9:.0f} GB left over; {free / 1e9:.1f} GB are free"
        )
    for name in missing:
        started = time.perf_counter()
        ensure_models({name: models[name]})
        print(f"  made {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return models


def dit_commands(family: str, inputs: list[str]) -> dict[str, list[str]]:
    """sdrecipe, the floor and sd-mecha on `family`'s fixtures, bf16 out."""
    method = DIT_METHODS[family]
    alpha = ["0.3"] if method == "weighted_sum" else []
    recipe = f"dit-{family}.yaml"
    letters = ", ".join(
        f"{letter}: {name}" for letter, name in zip(DIT_MODELS[family], inputs, strict=True)
    )
    (WORK / recipe).write_text(
        f"inputs: {{{letters}}}\n"
        f"nodes: {{merged: {DIT_NODES[family]}}}\n"
        f"outputs: {{merged: {{path: {DIT_OUTPUTS['sdrecipe']}, dtype: bfloat16}}}}\n"
    )
    # sd-mecha 1.1.8 has no SD3.5 Large config: see peer_sd_mecha.py's --own-config.
    mecha = ["--bf16", *(["--own-config"] if family == "sd35" else [])]
    floor_output = DIT_OUTPUTS["floor (minimal loop)"]
    return {
        "sdrecipe": [*SDRECIPE, "build", "--force", "--cache-dir", "cache", recipe],
        "floor (minimal loop)": [
            *(PYTHON, str(BENCH / "floor.py"), "--dtype", "BF16", method),
            *(*inputs, floor_output, *alpha),
        ],
        "sd-mecha": [
            *(f"{_venv_bin('sd-mecha')}/python", str(BENCH / "peer_sd_mecha.py"), *mecha),
            *(method, DIT_OUTPUTS["sd-mecha"], *inputs, *alpha),
        ],
    }


def compare_outputs(commands: dict[str, list[str]], skip: dict[str, str]) -> dict[str, str]:
    """Each tool once more, all outputs kept; each output against sdrecipe's, tensor by
    tensor (sd-mecha writes Flux's keys behind `model.diffusion_model.`)."""
    from safetensors import safe_open

    remove_outputs()
    for tool, command in commands.items():
        if tool not in skip:
            subprocess.run(command, cwd=WORK, capture_output=True)
    if not (WORK / DIT_OUTPUTS["sdrecipe"]).exists():
        return {"sdrecipe": "wrote no output"}
    with safe_open(WORK / DIT_OUTPUTS["sdrecipe"], "pt") as handle:
        reference = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    verdicts = {}
    for tool in commands:
        if tool == "sdrecipe" or tool in skip:
            continue
        if not (WORK / DIT_OUTPUTS[tool]).exists():
            verdicts[tool] = "wrote no output"
            continue
        with safe_open(WORK / DIT_OUTPUTS[tool], "pt") as handle:
            other = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        other = {
            key if key in reference else key.removeprefix("model.diffusion_model."): value
            for key, value in other.items()
        }
        common = reference.keys() & other.keys()
        same = sum(torch.equal(reference[key], other[key]) for key in common)
        worst = max(
            ((reference[key].float() - other[key].float()).abs().max().item() for key in common),
            default=float("nan"),
        )
        dtypes = sorted({str(other[key].dtype).removeprefix("torch.") for key in common})
        verdicts[tool] = (
            f"{len(common)} of sdrecipe's {len(reference)} tensors ({len(other)} written), "
            f"{same} bit-identical, max |difference| {worst:.3g}, {', '.join(dtypes)}"
        )
        print(f"  {tool} against sdrecipe: {verdicts[tool]}", flush=True)
    remove_outputs()
    return verdicts


def dit_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 15: full-size Flux.1-dev weighted_sum(A, B) and SD3.5 Large A + (B - C),
    fp8 inputs and a bf16 output, against sd-mecha and the floor, nothing cached at the
    start. The family whose fixtures are already there runs first."""
    shrink = dit_shrink()
    report["dit_shrink"] = shrink
    report["dit_machine"] = machine()
    evict = page_cache_state([])

    def before() -> None:
        free_cache()  # a cached output is a hard link: two outputs do not fit beside the inputs
        evict()

    ready = [f for f in DIT_MODELS if all((WORK / name).exists() for name in dit_models(f))]
    for family in [*ready, *(f for f in DIT_MODELS if f not in ready)]:
        print(f"scenario 15: {family}, {DIT_METHODS[family]}, fp8 in, bf16 out", flush=True)
        inputs = list(dit_fixtures(family))
        commands = dit_commands(family, inputs)
        hash_inputs(f"dit-{family}.yaml")
        tools = {tool: reason for tool, reason in skip.items() if tool in commands}
        report[f"dit_{family}"] = side_by_side(f"dit-{family}", commands, rounds, tools, before)
        report[f"dit_{family}_bytes"] = {
            "inputs": sum((WORK / name).stat().st_size for name in inputs),
            "parameters": _parameters(dit_models(family)[inputs[0]]),
        }
        if shrink > 1:
            report[f"dit_{family}_check"] = compare_outputs(commands, tools)
        free_cache()


# --- scenario 16: quantized inputs and outputs, full-size Flux.1-dev -----------------------

# Every merge is weighted_sum(A, B, alpha=0.3) of the Flux.1-dev transformers of scenario
# 15 (A and B differ by their fine-tune deltas), nothing cached at the start. Bf16 inputs
# and the GGUF made from the fp8 ones do not fit the disk beside the fp8 pair: the fp8
# pair goes first, then the GGUF with B in bf16, then A and B in bf16.
QUANT_ALPHA = 0.3
QUANT_MARGIN = 10e9  # bytes scenario 16 leaves free on the bench disk
QUANT_GGUF = "dit-flux-G.gguf"


def quant_bf16() -> dict[str, ModelSpec]:
    """The bf16 fixtures of scenario 16 (dit-flux-A16, B16), shrunk as BENCH_DIT_SHRINK says."""
    shrink = dit_shrink()
    suffix = f"-shrink{shrink}" if shrink > 1 else ""
    return {
        f"dit-flux-{letter}16{suffix}.safetensors": dataclasses.replace(
            spec, dtype=torch.bfloat16, shrink=shrink
        )
        for letter, spec in DIT_MODELS["flux"].items()
    }


# The precision check's models: Flux.1-dev at a quarter of the widths, in bf16, and every
# output format merged from them.
PRECISION_SHRINK = 4
PRECISION_OUTPUTS = {
    "float32": "dtype: float32",
    "bfloat16": "dtype: bfloat16",
    "float16": "dtype: float16",
    "fp8_e4m3fn": "dtype: fp8_e4m3fn",
    "fp8_e5m2": "dtype: fp8_e5m2",
    "fp8_e4m3fn scaled": "dtype: fp8_e4m3fn, scaled: true",
    "GGUF Q8_0": "format: gguf, quant: Q8_0",
    "GGUF Q5_1": "format: gguf, quant: Q5_1",
    "GGUF Q4_0": "format: gguf, quant: Q4_0",
}


def quant_recipe(name: str, inputs: list[str], output: str) -> list[str]:
    """Write `quant-NAME.yaml` (weighted_sum of the two `inputs` into `output`, a
    YAML mapping's body) and return the command that builds it."""
    recipe = f"quant-{name}.yaml"
    (WORK / recipe).write_text(
        f"inputs: {{A: {inputs[0]}, B: {inputs[1]}}}\n"
        f'nodes: {{merged: "weighted_sum(A, B, alpha={QUANT_ALPHA})"}}\n'
        f"outputs: {{merged: {{{output}}}}}\n"
    )
    hash_inputs(recipe)
    return [*SDRECIPE, "build", "--force", "--cache-dir", "cache", recipe]


def quant_floor(inputs: list[str]) -> list[str]:
    """The minimal loop on two safetensors inputs, fp8 (e4m3fn) out."""
    out = "out-floor.safetensors"
    command = [PYTHON, str(BENCH / "floor.py"), "--dtype", "F8_E4M3", "weighted_sum"]
    return [*command, *inputs, out, str(QUANT_ALPHA)]


def quant_disk(needed: float, what: str, scenario: str = "16", keep: tuple[str, ...] = ()) -> None:
    """Fail unless `needed` bytes more leave QUANT_MARGIN free on the bench disk; the
    message names the other big files of build/bench (not `keep`) one could delete."""
    free = shutil.disk_usage(WORK).free
    if free - needed < QUANT_MARGIN:
        others = sorted(
            f"{path.name} ({path.stat().st_size / 1e9:.1f} GB)"
            for path in [*WORK.glob("*.safetensors"), *WORK.glob("*.gguf")]
            if path.name not in keep and path.stat().st_size > 1e9
        )
        raise SystemExit(
            f"scenario {scenario} ({what}) needs {needed / 1e9:.1f} GB more, and "
            f"{QUANT_MARGIN / 1e9:.0f} GB left over; {free / 1e9:.1f} GB are free"
            + (f"; other fixtures in {WORK}: {', '.join(others)}" if others else "")
        )


def precision(report: dict[str, object]) -> None:
    """Each output format's rounding against the float32 merge (bench/precision.py)."""
    shrink = PRECISION_SHRINK * dit_shrink()  # quant_bf16's specs carry dit_shrink: replaced
    models = {
        name.replace("dit-flux", "precision"): dataclasses.replace(spec, shrink=shrink)
        for name, spec in quant_bf16().items()
    }
    ensure_models(models)
    inputs = list(models)
    outputs = {}
    for index, (fmt, options) in enumerate(PRECISION_OUTPUTS.items()):
        suffix = "gguf" if "gguf" in options else "safetensors"
        outputs[fmt] = f"out-precision-{index}.{suffix}"
        command = quant_recipe(f"precision-{index}", inputs, f"path: {outputs[fmt]}, {options}")
        subprocess.run(command, cwd=WORK, check=True, capture_output=True)
    found = subprocess.run(
        [PYTHON, str(BENCH / "precision.py"), str(QUANT_ALPHA), *inputs, *outputs.values()],
        cwd=WORK,
        check=True,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    report["quant_precision"] = {fmt: row for fmt, row in zip(outputs, rows, strict=True)}
    report["quant_precision_parameters"] = _parameters(models[inputs[0]])
    remove_outputs()
    for name in models:
        (WORK / name).unlink()


def quant_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 16: full-size Flux.1-dev merges with quantized inputs and outputs,
    against the same merge of bf16 files and the minimal loop."""
    report["quant_machine"] = machine()
    report["quant_shrink"] = dit_shrink()
    if os.environ.get("BENCH_QUANT_PRECISION", "1") != "0":  # 0 keeps the last run's 16e
        print("scenario 16: the rounding of each output format", flush=True)
        precision(report)
    evict = page_cache_state([])

    def before() -> None:
        free_cache()
        evict()

    def run(name: str, commands: dict[str, list[str]]) -> None:
        report[f"quant_{name}"] = side_by_side(f"quant-{name}", commands, rounds, {}, before)

    print("scenario 16a/b: fp8 A and B, into fp8 and into GGUF Q8_0", flush=True)
    fp8 = list(dit_fixtures("flux"))
    parameters = _parameters(dit_models("flux")[fp8[0]])
    quant_disk(parameters * 2.2, "an fp8 output and a GGUF one")
    run(
        "fp8",
        {
            "sdrecipe": quant_recipe("fp8", fp8, "path: out-quant.safetensors, dtype: fp8"),
            "floor (minimal loop)": quant_floor(fp8),
        },
    )
    gguf = quant_recipe("gguf", fp8, "path: out-quant.gguf, format: gguf, quant: Q8_0")
    run("gguf", {"sdrecipe": gguf})
    report["quant_gguf_bytes"] = (WORK / "out-quant.gguf").stat().st_size
    (WORK / "out-quant.gguf").rename(WORK / QUANT_GGUF)
    for name in fp8:
        (WORK / name).unlink()
    print("scenario 16c: GGUF Q8_0 A and bf16 B, into fp8", flush=True)
    bf16_models = quant_bf16()
    b16, a16 = sorted(bf16_models, reverse=True)  # B first: it goes beside the GGUF
    free_cache()
    quant_disk(parameters * 3, "a bf16 input and an fp8 output")
    ensure_models({b16: bf16_models[b16]})
    run(
        "gguf_in",
        {
            "sdrecipe": quant_recipe(
                "gguf-in", [QUANT_GGUF, b16], "path: out-quant.safetensors, dtype: fp8"
            )
        },
    )
    (WORK / QUANT_GGUF).unlink()
    print("scenario 16d: bf16 A and B, into fp8 (the baseline)", flush=True)
    free_cache()  # 16c's output and its cached pack
    quant_disk(parameters * 3, "a bf16 input and an fp8 output")
    ensure_models({a16: bf16_models[a16]})
    bf16 = [a16, b16]
    run(
        "bf16",
        {
            "sdrecipe": quant_recipe("bf16", bf16, "path: out-quant.safetensors, dtype: fp8"),
            "floor (minimal loop)": quant_floor(bf16),
        },
    )
    report["quant_parameters"] = parameters
    free_cache()
    for name in bf16:
        (WORK / name).unlink()


# --- scenario 17: LoRAs on full-size Flux.1-dev --------------------------------------------

# 17a bakes a rank-32 LoRA (every linear layer of every double and single block, kohya's
# names) into scenario 16's bf16 Flux.1-dev A, beside the plain conversion of A (`model: A`),
# both bf16 out; 17b extracts a rank-32 LoRA from B - A. A bf16 Flux.1-dev file is 23.8 GB:
# 17a holds A and one output, 17b A and B, never three at once. The phase whose fixtures are
# all there runs first; A and B are deleted at the end (the LoRA, 0.3 GB, is kept).
FLUX_LORA_STRENGTH = 0.8
FLUX_LORA_SPEC = AdapterSpec("flux1", rank=32, alpha=16.0, seed=101, dtype=torch.bfloat16)
FLUX_LORA_OUTPUTS = {
    "sdrecipe": "out-flux-lora.safetensors",
    "sdrecipe-convert": "out-flux-convert.safetensors",
}
FLUX_LORA_EXTRACTED = "out-lora.safetensors"
FLUX_LORA_SMALL = 1e9  # bytes a phase needs besides the 23.8 GB files: LoRAs, cache records


def flux_lora_adapter() -> tuple[str, AdapterSpec]:
    """Scenario 17's LoRA: file name and spec, shrunk as BENCH_DIT_SHRINK says."""
    shrink = dit_shrink()
    suffix = f"-shrink{shrink}" if shrink > 1 else ""
    return f"flux-lora32{suffix}.safetensors", dataclasses.replace(FLUX_LORA_SPEC, shrink=shrink)


def flux_lora_recipe(name: str, inputs: dict[str, str], node: str, output: str) -> list[str]:
    """Write `flux-lora-NAME.yaml` (one node, its output a YAML mapping's body), hash its
    inputs, and return the command that builds it."""
    recipe = f"flux-lora-{name}.yaml"
    letters = ", ".join(f"{letter}: {path}" for letter, path in inputs.items())
    target = node.split(":")[0]
    (WORK / recipe).write_text(
        f"inputs: {{{letters}}}\nnodes: {{{node}}}\noutputs: {{{target}: {{{output}}}}}\n"
    )
    hash_inputs(recipe)
    return [*SDRECIPE, "build", "--force", "--cache-dir", "cache", recipe]


def adapter_facts(path: Path) -> dict[str, object]:
    """A LoRA file's size, modules and ranks (from its header)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        downs = [key for key in handle.keys() if key.endswith("lora_down.weight")]  # noqa: SIM118
        ranks = sorted({handle.get_slice(key).get_shape()[0] for key in downs})
    return {"bytes": path.stat().st_size, "modules": len(downs), "ranks": ranks}


def flux_lora_check(commands: dict[str, list[str]]) -> str:
    """A shrunken run's check: both builds once more, outputs kept; which of the
    conversion's tensors the bake changed."""
    from safetensors import safe_open

    remove_outputs()
    for command in commands.values():
        subprocess.run(command, cwd=WORK, capture_output=True)
    outputs = [WORK / FLUX_LORA_OUTPUTS[tool] for tool in ("sdrecipe", "sdrecipe-convert")]
    if not all(output.exists() for output in outputs):
        missing = ", ".join(output.name for output in outputs if not output.exists())
        remove_outputs()
        return f"not compared: no {missing}"
    with safe_open(outputs[0], "pt") as baked, safe_open(outputs[1], "pt") as converted:
        keys, written = set(converted.keys()), set(baked.keys())
        changed, dtypes = 0, set()
        for key in keys & written:
            left, right = baked.get_tensor(key), converted.get_tensor(key)
            changed += not torch.equal(left, right)
            dtypes.add(str(left.dtype).removeprefix("torch."))
    verdict = (
        f"the bake wrote {len(written)} tensors, the conversion {len(keys)}; "
        f"{changed} differ ({', '.join(sorted(dtypes))})"
    )
    print(f"  check: {verdict}", flush=True)
    remove_outputs()
    return verdict


def flux_lora_scenarios(rounds: int, skip: dict[str, str], report: dict[str, object]) -> None:
    """Scenario 17: a rank-32 LoRA baked into full-size bf16 Flux.1-dev beside the plain
    conversion of the same file (17a), and a rank-32 LoRA extracted from B - A (17b);
    nothing cached at the start of any run. sd-mecha 1.1.8 has no Flux LoRA config (see
    report.py's FLUX_LORA_MECHA): no peer."""
    shrink = dit_shrink()
    report["flux_lora_machine"] = machine()
    report["flux_lora_shrink"] = shrink
    models = quant_bf16()
    a16, b16 = sorted(models)
    lora, lora_spec = flux_lora_adapter()
    parameters = _parameters(models[a16])
    size = parameters * torch.bfloat16.itemsize  # one bf16 file, or a bf16 output
    keep = (a16, b16, lora)
    evict = page_cache_state([])

    def before() -> None:
        free_cache()  # the last output (and its cache record, a hard link) goes first
        evict()

    def make(names: list[str]) -> None:
        for name in names:
            if stale(name, models[name]):
                started = time.perf_counter()
                ensure_models({name: models[name]})
                print(f"  made {name} in {time.perf_counter() - started:.0f} s", flush=True)

    def bake() -> None:
        print("scenario 17a: Flux.1-dev + a rank-32 LoRA, beside a plain conversion", flush=True)
        free_cache()
        if (WORK / b16).exists():  # 17b's: A, B and an output do not fit
            print(f"deleting {b16}", flush=True)
            (WORK / b16).unlink()
        needed = size * (1 + stale(a16, models[a16])) + FLUX_LORA_SMALL
        quant_disk(needed, "a bf16 Flux.1-dev file and a bf16 output", "17a", keep)
        make([a16])
        ensure_adapter(lora, lora_spec)
        report["flux_lora_adapter"] = adapter_facts(WORK / lora)
        strength = f"{FLUX_LORA_STRENGTH} * L"
        commands = {
            "sdrecipe": flux_lora_recipe(
                "bake",
                {"A": a16, "L": lora},
                f"baked: A + {strength}",
                f"path: {FLUX_LORA_OUTPUTS['sdrecipe']}, dtype: bf16",
            ),
            "sdrecipe-convert": flux_lora_recipe(
                "convert",
                {"A": a16},
                "model: A",
                f"path: {FLUX_LORA_OUTPUTS['sdrecipe-convert']}, dtype: bf16",
            ),
        }
        report["flux_lora"] = side_by_side("flux-lora", commands, rounds, {}, before)
        if shrink > 1:
            report["flux_lora_check"] = flux_lora_check(commands)
        free_cache()

    def extract() -> None:
        print("scenario 17b: a rank-32 LoRA extracted from Flux.1-dev B - A", flush=True)
        free_cache()
        missing = sum(stale(name, models[name]) for name in (a16, b16))
        quant_disk(size * missing + FLUX_LORA_SMALL, "two bf16 Flux.1-dev files", "17b", keep)
        make([a16, b16])
        command = flux_lora_recipe(
            "extract",
            {"A": a16, "B": b16},
            "learned: B - A",
            f"path: {FLUX_LORA_EXTRACTED}, format: lora, rank: 32",
        )
        results = side_by_side("flux-lora-extract", {"sdrecipe": command}, rounds, {}, before)
        report["flux_lora_extract"] = results
        if (WORK / FLUX_LORA_EXTRACTED).exists():
            report["flux_lora_extracted"] = adapter_facts(WORK / FLUX_LORA_EXTRACTED)
        free_cache()

    # BENCH_FLUX_LORA_EXTRACT=0 measures 17a alone and keeps the last run's 17b figures.
    phases = [bake, extract] if os.environ.get("BENCH_FLUX_LORA_EXTRACT", "1") != "0" else [bake]
    if len(phases) == 2 and not stale(a16, models[a16]) and not stale(b16, models[b16]):
        phases.reverse()
    for phase in phases:
        phase()
    report["flux_lora_parameters"] = parameters
    for name in (a16, b16):
        print(f"deleting {name}", flush=True)
        (WORK / name).unlink(missing_ok=True)


SCENARIOS: dict[str, Callable[[int, dict[str, str], dict[str, object]], None]] = {
    "classic": classic_scenarios,
    "advanced": advanced_scenarios,
    "newer": newer_scenarios,
    "lora": lora_scenarios,
    "sweep": sweep_scenarios,
    "sdxl": sdxl_scenarios,
    "dit": dit_scenarios,
    "quant": quant_scenarios,
    "flux_lora": flux_lora_scenarios,
    "svd_sdxl": svd_sdxl_scenarios,
    "device": device_scenarios,
}
# Groups that run only when `--only` names them, and those that use no SD1.5 input.
OPT_IN = {"dit", "quant", "flux_lora", "newer", "svd_sdxl", "device"}
OWN_MODELS = {"dit", "quant", "flux_lora", "svd_sdxl", "device"}
# The peers a group runs; the others run them all.
GROUP_PEERS: dict[str, list[str]] = {
    "dit": ["sd-mecha"],
    "quant": [],
    "flux_lora": [],
    "newer": ["mergekit"],
    "svd_sdxl": [],
    "device": [],
}


def with_sdxl() -> bool:
    """Whether the SDXL scenarios run: unless BENCH_SDXL=0 (they need ~21 GB more disk)."""
    return os.environ.get("BENCH_SDXL", "1") != "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only",
        help=f"Comma-separated groups ({', '.join(SCENARIOS)}); their figures replace "
        "those of the last run's results.json, and BENCHMARKS.md is re-rendered.",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="Re-render BENCHMARKS.md from the last run."
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("BENCH_DEVICE", "cuda"),
        help="The device group's device (scenario 20: `--only device`) [default: cuda].",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.report_only:
        saved = json.loads(RESULTS.read_text())
        write_report(ROOT / "BENCHMARKS.md", _restore(saved["report"]), saved["machine"])
        return
    rounds = args.rounds
    sdxl = with_sdxl()
    groups = (
        args.only.split(",")
        if args.only
        else [g for g in SCENARIOS if (sdxl or g != "sdxl") and g not in OPT_IN]
    )
    unknown = [group for group in groups if group not in SCENARIOS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; groups: {', '.join(SCENARIOS)}")
    # A shrunken dit run only checks the tools: its figures go beside, not into, the report.
    validating = bool({"dit", "quant", "flux_lora"} & set(groups)) and dit_shrink() > 1
    results, benchmarks = RESULTS, ROOT / "BENCHMARKS.md"
    if validating:
        results = WORK / f"results-dit-shrink{dit_shrink()}.json"
        benchmarks = WORK / f"BENCHMARKS-dit-shrink{dit_shrink()}.md"
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    needs_sdxl = "sdxl" in groups or ("lora" in groups and sdxl)
    needs_sd15 = any(group not in OWN_MODELS for group in groups)
    ensure_models((SD15_MODELS if needs_sd15 else {}) | (SDXL_MODELS if needs_sdxl else {}))
    peers = {peer for group in groups for peer in GROUP_PEERS.get(group, PEERS)}
    skip = {name: error for name in PEERS if name in peers and (error := ensure_peer(name))}
    write_recipes()
    for name in SD15_MODELS if needs_sd15 else ():  # warm the page cache for every tool alike
        subprocess.run(["cat", str(WORK / name)], stdout=subprocess.DEVNULL, check=True)
    report: dict[str, object] = {}
    if args.only and results.exists():
        report = _restore(json.loads(results.read_text())["report"])
    try:
        shutil.rmtree(WORK / "cache", ignore_errors=True)
        for group in groups:
            SCENARIOS[group](rounds, skip, report)
    finally:  # a crash late in the run keeps the figures measured so far
        results.write_text(json.dumps({"report": _save(report), "machine": machine()}, indent=1))
    write_report(benchmarks, report, machine())
    print(f"wrote {benchmarks}")


def sdxl_block_weights(rounds: int) -> dict[str, object]:
    """Scenario 8: a block-weighted SDXL weighted_sum built cold, then rebuilt after
    one block's value changed (only that block's keys are recomputed)."""
    print("scenario 8: SDXL block-weighted weighted_sum, cold then one block changed", flush=True)
    recipe = WORK / "sdxl_blocks.yaml"
    cold = [*SDRECIPE, "build", "--force", "--cache-dir", "cache", "sdxl_blocks.yaml"]
    result: dict[str, object] = {
        "sdxl_blocks_cold": repeated("sdxl_blocks", cold, rounds, free_cache)
    }
    values = iter(["0.45", "0.35"] * rounds)

    def change_block() -> None:
        alphas = recipe.read_text().split('alpha: "')[1].split('"')[0].split(",")
        alphas[5] = next(values)  # IN04
        text = recipe.read_text().split('alpha: "')
        rest = text[1].split('"', 1)[1]
        recipe.write_text(f'{text[0]}alpha: "{",".join(alphas)}"{rest}')

    again = [*SDRECIPE, "build", "--cache-dir", "cache", "sdxl_blocks.yaml"]
    result["sdxl_block_change"] = repeated("sdxl_block_change", again, rounds, change_block)
    change_block()
    summary = json.loads(
        subprocess.run(
            [*again[:4], "--json", *again[4:]], cwd=WORK, check=True, capture_output=True, text=True
        ).stdout
    )
    result["sdxl_block_change_keys"] = summary["cache"]
    return result


def _save(value: object) -> object:
    """The report as JSON data (results become lists of runs)."""
    if isinstance(value, Result):
        return {"runs": [vars(run) for run in value.runs]}
    if isinstance(value, dict):
        return {key: _save(item) for key, item in value.items()}
    return value


def _restore(value: object) -> object:
    """The inverse of `_save`."""
    if isinstance(value, dict) and set(value) == {"runs"}:
        return Result([Run(**run) for run in value["runs"]])
    if isinstance(value, dict):
        return {key: _restore(item) for key, item in value.items()}
    return value


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory = next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))
    import torch

    return {
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": f"{int(memory) / 1024 / 1024:.1f} GiB",
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


if __name__ == "__main__":
    main()
