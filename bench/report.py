"""Render a benchmark run as BENCHMARKS.md (generated; never edited by hand)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Result

SCENARIOS = {
    "add_difference": "Scenario 1: cold `A + (B − C)`, three inputs, fp16 output",
    "weighted_sum": "Scenario 2: cold `weighted_sum(A, B, alpha=0.3)`, fp16 output",
}
ADVANCED = {
    "ties": "Scenario 9a: TIES of four models, `ties(C, A, B, D, density=0.2)`",
    "dare_ties": "Scenario 9b: DARE of four models, `dare_ties(C, A, B, D, drop=0.9)`",
    "slerp": "Scenario 9c: SLERP of two, `slerp(A, B, t=0.5)`",
}
NEWER_HEADING = "## Scenario 18: the newer task-vector methods, four full-size SD1.5 models"
NEWER_ABOUT = (
    "In one run: sdrecipe's cold `A + (B − C)` (scenario 1's recipe), which the task-vector "
    "methods are held to, then each method of `C` (the base) and `A`, `B`, `D` at its "
    "defaults, fp16 out: TIES and DARE-TIES (scenario 9's recipes), breadcrumbs, DELLA and "
    "SCE side by side with mergekit (`mergekit-pytorch`: `breadcrumbs`, `della_linear` with "
    "density 0.7, `sce`), iso_c and TSV alone (no peer has them)."
)
# Each method's recipe call, and the multiple of the cold `A + (B - C)` it is held to.
NEWER = {
    "newer_ties": ("ties(C, A, B, D, density=0.2)", 1.5),
    "newer_dare_ties": ("dare_ties(C, A, B, D, drop=0.9)", 1.5),
    "breadcrumbs": ("breadcrumbs(C, A, B, D, density=0.9, gamma=0.01)", 2.0),
    "della": ("della(C, A, B, D, drop=0.3, epsilon=0.1)", 2.0),
    "sce": ("sce(C, A, B, D, select_topk=1.0)", 2.0),
    "iso_c": ("iso_c(C, A, B, D)", None),
    "tsv": ("tsv(C, A, B, D)", None),
}
SVD_BOUND = (
    "iso_c and TSV are bound by their float64 SVDs, one matrix key per core (the README "
    "gives their cost per matrix size); they are held to no multiple."
)
SVD_SDXL_HEADING = "## Scenario 19: iso_c and TSV of three full-size SDXL models"
DEVICE_HEADING = "## Scenario 20: the same builds on the CPU and on a GPU"
DEVICE_ABOUT = (
    "Cold builds (`--force`, the tensor cache emptied before each), the CPU's and the "
    "device's in turn, on the same files; `× sdrecipe` is the device build's time over "
    "the CPU build's."
)


def _mb(kilobytes: float) -> str:
    return "–" if math.isnan(kilobytes) or not kilobytes else f"{kilobytes / 1024:,.0f} MB"


def _s(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds:.2f} s"


def _side_by_side(results: dict[str, Result]) -> list[str]:
    ours = results["sdrecipe"].median("wall")
    lines = [
        "| tool | median wall | × sdrecipe | peak anonymous | peak RSS | read from disk | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for tool, result in results.items():
        if result.error and all(run.error for run in result.runs):
            lines.append(f"| {tool} | failed | – | – | – | – | {result.error} |")
            continue
        wall = result.median("wall")
        walls = ", ".join(f"{run.wall:.1f}" for run in result.runs if not run.error)
        read = result.median("disk_read")
        lines.append(
            f"| {tool} | {_s(wall)} | {wall / ours:.2f}× | {_mb(result.median('peak_anon'))} "
            f"| {_mb(result.median('peak_rss'))} | {read / 1e6:,.0f} MB | {walls} |"
        )
    return lines


def _single(title: str, result: Result, note: str = "", level: str = "##") -> list[str]:
    walls = ", ".join(f"{run.wall:.2f}" for run in result.runs if not run.error)
    lines = [
        f"{level} {title}",
        "",
        "| median wall | peak anonymous | peak RSS | runs (s) |",
        "|---|---|---|---|",
        f"| {_s(result.median('wall'))} | {_mb(result.median('peak_anon'))} "
        f"| {_mb(result.median('peak_rss'))} | {walls or result.error} |",
        "",
    ]
    return lines + ([note, ""] if note else [])


def _targets(report: dict) -> list[str]:
    first = report["add_difference"]
    ours = first["sdrecipe"].median("wall")
    floor = first["floor (minimal loop)"].median("wall")
    peers = {
        tool: result.median("wall")
        for tool, result in first.items()
        if tool not in ("sdrecipe", "floor (minimal loop)")
    }
    beaten = all(not math.isnan(w) and w > ours for w in peers.values())
    anon3 = first["sdrecipe"].median("peak_anon")
    anon5 = max(
        report["five_inputs"].median("peak_anon"),
        report["five_inputs_uncached"].median("peak_anon"),
    )
    noop = report["noop"].median("wall")
    help_ = report["help"].median("wall")
    rows = [
        (
            "cold `A + (B − C)` vs the minimal loop",
            "≤ 1.3×",
            f"{ours / floor:.2f}×",
            ours / floor <= 1.3,
        ),
        (
            "cold `A + (B − C)` vs every peer",
            "faster than each",
            ", ".join(f"{t} {w / ours:.1f}×" for t, w in peers.items()),
            beaten,
        ),
        (
            "peak anonymous memory, SD1.5",
            "≤ 600 MB, whatever the inputs",
            f"3 inputs {_mb(anon3)}, 5 inputs {_mb(anon5)}",
            max(anon3, anon5) <= 600 * 1024,
        ),
    ]
    if "sdxl" in report:
        states = {"inputs cached": report["sdxl"], "nothing cached": report.get("sdxl_cold")}
        anon = max(s["sdrecipe"].median("peak_anon") for s in states.values() if s)
        rows.append(("peak anonymous memory, SDXL", "≤ 1 GB", _mb(anon), anon <= 1024 * 1024))
        for state, sdxl in states.items():
            if sdxl is None:
                continue
            mine = sdxl["sdrecipe"].median("wall")
            for tool, target in (("sd-meh", "faster"), ("floor (minimal loop)", "no slower")):
                theirs = sdxl[tool].median("wall") if tool in sdxl else float("nan")
                met = None if math.isnan(theirs) else mine <= theirs
                rows.append(
                    (
                        f"SDXL `A + (B − C)`, {state}, against {tool}",
                        target,
                        f"{mine / theirs:.2f}×",
                        met,
                    )
                )
    else:
        rows.append(("peak anonymous memory, SDXL", "≤ 1 GB", "not run (BENCH_SDXL=0)", None))
    rows += _advanced_targets(report, ours)
    rows += _flux_lora_targets(report) or [FLUX_LORA_NOT_RUN]
    rows.append(("no-op rebuild (with interpreter start)", "≤ 1 s", _s(noop), noop <= 1.0))
    rows.append(("`sdrecipe --help`", "≤ 0.3 s", _s(help_), help_ <= 0.3))
    lines = ["| measure | target | measured | met |", "|---|---|---|---|"]
    for measure, target, measured, met in rows:
        verdict = "–" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {measure} | {target} | {measured} | {verdict} |")
    return lines


def _advanced_targets(report: dict, add_difference: float) -> list[tuple]:
    """Issue 12's targets: the methods against their peers and add_difference,
    caching by cost, and SDXL memory."""
    rows: list[tuple] = []
    for method in ADVANCED:
        if method not in report:
            continue
        ours = report[method]["sdrecipe"].median("wall")
        peers = {t: r.median("wall") for t, r in report[method].items() if t != "sdrecipe"}
        shown = ", ".join(
            f"{t} {w / ours:.1f}×" if not math.isnan(w) else f"{t} failed" for t, w in peers.items()
        )
        beaten = all(not math.isnan(w) and w > ours for w in peers.values())
        rows.append((f"{method} vs every peer", "faster than each", shown, beaten))
        if method != "slerp":
            ratio = ours / add_difference
            rows.append(
                (f"{method} vs cold `A + (B − C)`", "≤ 1.5×", f"{ratio:.2f}×", ratio <= 1.5)
            )
    default, uncached = report["five_inputs"].median("wall"), report["five_inputs_uncached"]
    rows.append(
        (
            "scenario 3 (default caching) vs 3b (`cache: false`)",
            "no slower",
            f"{default:.2f} s vs {uncached.median('wall'):.2f} s",
            default <= uncached.median("wall") * 1.1,
        )
    )
    if "ties_downstream" in report:
        cold = report["ties_cold"].median("wall")
        change = report["ties_downstream"].median("wall")
        rows.append(
            (
                "downstream change over a cached TIES node vs cold",
                "much faster",
                f"{change:.2f} s vs {cold:.2f} s ({cold / change:.1f}×)",
                cold / change >= 2,
            )
        )
    if "sdxl_ties" in report:
        anon = report["sdxl_ties"].median("peak_anon")
        rows.append(
            ("peak anonymous memory, SDXL TIES", "≤ 1.5 GB", _mb(anon), anon <= 1536 * 1024)
        )
    return rows + _lora_targets(report)


def _lora_targets(report: dict) -> list[tuple]:
    """Issue 13's targets: a LoRA baked into SDXL against a plain conversion build."""
    if "sdxl_lora" not in report:
        return [("SDXL + rank-64 LoRA vs plain conversion", "≤ 1.2×", "not run", None)]
    results = report["sdxl_lora"]
    bake, convert = results["sdrecipe"].median("wall"), results["sdrecipe-convert"].median("wall")
    ratio = bake / convert
    rows = [
        (
            "SDXL + rank-64 LoRA vs plain conversion (`model: A`)",
            "≤ 1.2×",
            f"{_s(bake)} vs {_s(convert)} ({ratio:.2f}×)",
            ratio <= 1.2,
        )
    ]
    mecha = results["sd-mecha"]
    shown = (
        f"sd-mecha failed: {mecha.error[:80]}"
        if mecha.error
        else (f"{_s(mecha.median('wall'))} ({mecha.median('wall') / bake:.1f}×)")
    )
    rows.append(
        (
            "SDXL LoRA bake vs sd-mecha",
            "faster",
            shown,
            None if mecha.error else (mecha.median("wall") > bake),
        )
    )
    return rows


def sweep_section(report: dict) -> list[str]:
    """Scenario 14's section: the matrix build beside five builds and the write floor."""
    ours = report["sweep"]["sdrecipe"].median("wall")
    floor = report["sweep_write_floor"]
    return [
        "## Scenario 14: a sweep, `weighted_sum(A, B)` at five alphas, fp16 out",
        "",
        "`sdrecipe`: one recipe with `matrix: {alpha: [0.1, 0.3, 0.5, 0.7, 0.9]}`, "
        "built in one pass over the inputs; `sdrecipe, five builds`: five recipes, "
        "one `sdrecipe build` each, one after the other.",
        "",
        *_side_by_side(report["sweep"]),
        "",
        f"Writing five fp16 outputs with `dd` alone takes {_s(floor)}: "
        f"{floor / ours:.0%} of the matrix build.",
        "",
    ]


DIT_HEADING = "## Scenario 15: full-size DiT checkpoints, fp8 in, bf16 out"
DIT_FAMILIES = {
    "flux": ("15a", "Flux.1-dev", "BFL transformer file, `weighted_sum(A, B, alpha=0.3)`"),
    "sd35": ("15b", "SD3.5 Large", "single file, `A + (B − C)`"),
}
DIT_ABOUT = (
    "Synthetic full-size checkpoints from `sdrecipe.synthetic` (real key names and shapes, seeded"
    " noise): Flux.1-dev's transformer in BFL's layout (780 tensors, 11.9 G parameters, no key "
    "prefix), two of them merged with `weighted_sum`, and SD3.5 Large as one file "
    "(`model.diffusion_model.` and `first_stage_model.`, 1167 tensors, 8.23 G parameters), three "
    "of them merged as `A + (B − C)`. Two bf16 Flux files and a bf16 output (23.8 GB each) come "
    "to 72 GB, more than the bench disk holds (about 70 GB free), so every input is in the fp8 "
    "layout (`float8_e4m3fn`: 11.9 GB a Flux file, 8.2 GB an SD3.5 Large one) and the output is "
    "bf16 (23.8 GB and 16.5 GB): each tool upcasts to float32, computes and writes bf16 "
    "(sdrecipe's recipe says `dtype: bfloat16`, the floor runs with `--dtype BF16`). The two "
    "families run one after the other: the first's fixtures are deleted before the second's are "
    "made. Before every run the last output is written back and deleted, the tensor cache emptied"
    " and every model file evicted from the page cache (inputs and output outweigh the bench "
    "machine's memory anyway): each tool starts with nothing cached, and `read from disk` is its "
    "process tree's block input."
)
DIT_MECHA = (
    "sd-mecha 1.1.8 reads the fp8 files (it merges in float32) and is asked for bf16. It takes "
    "the BFL Flux file for its own `flux-flux` config, and writes the keys behind "
    "`model.diffusion_model.` (ComfyUI's naming; the inputs, sdrecipe and the floor keep "
    "BFL's). It has no SD3.5 Large config: its detection picks SD3 Medium's `sd3-comfyui` "
    "and would leave 432 of the 1167 tensors out of the output (joint blocks 24–37 and the "
    "q/k norms), and an explicit `StructuralModelConfig(...)` fails in `merge` "
    "(`ValueError: the 'structural' model config is not a unique object`), so "
    "`bench/peer_sd_mecha.py --own-config` registers a config listing the input's tensors "
    "and gives it to all three models."
)


def _failed(result: Result) -> bool:
    return all(run.error for run in result.runs)


def _dit_targets(report: dict) -> list[str]:
    """Issue 15's targets, for each family that ran."""
    rows: list[tuple] = []
    for family, (_, name, _) in DIT_FAMILIES.items():
        if f"dit_{family}" not in report:
            continue
        results = report[f"dit_{family}"]
        ours = results["sdrecipe"]
        wall = ours.median("wall")
        for tool in ("sd-mecha", "floor (minimal loop)"):
            theirs = results.get(tool)
            if theirs is None or _failed(ours) or _failed(theirs):
                failed = ours.error if _failed(ours) else (theirs.error if theirs else "not run")
                rows.append((f"{name}: sdrecipe vs {tool}", "faster", failed[:120], None))
                continue
            ratio = theirs.median("wall") / wall
            rows.append((f"{name}: sdrecipe vs {tool}", "faster", f"{ratio:.2f}×", ratio > 1))
        anon = ours.median("peak_anon")
        rows.append(
            (
                f"{name}: sdrecipe's peak anonymous memory",
                "≤ 1.5 GB",
                _mb(anon),
                anon <= 1536 * 1024,
            )
        )
        read = ", ".join(
            f"{tool} {result.median('disk_read') / 1e9:.1f} GB"
            for tool, result in results.items()
            if not _failed(result)
        )
        rows.append((f"{name}: read from disk", "reported", read, None))
    return _table(rows) if rows else []


def dit_section(report: dict) -> list[str]:
    """Scenario 15's section: `python -m bench.run --only dit`."""
    lines = _section_head(report, "dit", DIT_HEADING, "--only dit")
    lines += [DIT_ABOUT, "", DIT_MECHA, ""]
    targets = _dit_targets(report)
    lines += [*targets, ""] if targets else []
    for family, (number, name, what) in DIT_FAMILIES.items():
        lines += [f"### {number}: {name}, {what}", ""]
        if f"dit_{family}" not in report:
            lines += ["Not measured yet: `python -m bench.run --only dit`.", ""]
            continue
        sizes = report[f"dit_{family}_bytes"]
        lines += [
            f"{sizes['parameters'] / 1e9:.2f} G parameters: {sizes['inputs'] / 1e9:.1f} GB of fp8 "
            f"inputs, a {sizes['parameters'] * 2 / 1e9:.1f} GB bf16 output.",
            "",
            *_side_by_side(report[f"dit_{family}"]),
            "",
        ]
        checks = report.get(f"dit_{family}_check")
        if checks:
            lines += ["Outputs against sdrecipe's:", ""]
            lines += [f"- {tool}: {verdict}" for tool, verdict in checks.items()] + [""]
    return lines


QUANT_HEADING = "## Scenario 16: quantized Flux.1-dev inputs and outputs"
QUANT_RUNS = {
    "fp8": "16a: fp8 (e4m3fn) A and B, fp8 out",
    "gguf": "16b: fp8 A and B, GGUF Q8_0 out",
    "gguf_in": "16c: GGUF Q8_0 A and bf16 B, fp8 out",
    "bf16": "16d (the baseline): bf16 A and B, fp8 out",
}
QUANT_ABOUT = (
    "`weighted_sum(A, B, alpha=0.3)` of two full-size Flux.1-dev transformers (scenario "
    "15's fixtures), nothing cached at the start (`--force`, page cache emptied), each "
    "tool in turn. The targets compare each quantized merge with the same merge of bf16 "
    "files (16d); 16b has no peer that writes GGUF. The fp8 output keeps 1-D tensors in "
    "bf16; the minimal loop writes every floating tensor as fp8.\n\n"
    "The four input pairs do not fit the disk together, so 16a/b, 16c and 16d ran one "
    "after the other, minutes apart, and the shared disk's speed differed between those "
    "windows (see each run's read from disk over its wall, and the minimal loop's wall "
    'in 16a and 16d). The rows "over the minimal loop of its window" take that out: '
    "each run's wall over the minimal loop's in the same window, against the same ratio "
    "for 16d. 16c had no minimal loop (it reads no GGUF)."
)
PRECISION_ABOUT = (
    "The rounding each output format adds, against the float32 merge of the same bf16 "
    "inputs (Flux.1-dev at a quarter of the widths, {parameters:,.0f} M parameters of "
    "synthetic values, Gaussian with σ 0.05): `rms` = √(Σ error² / Σ value²) over the "
    'tensors, `max` = the largest max|error| / max|value| of any tensor; "matrices" are '
    "the tensors of two or more dimensions, the ones the fp8 and GGUF formats quantize."
)


def _quant_targets(report: dict) -> list[str]:
    baseline = report.get("quant_bf16", {}).get("sdrecipe")
    rows = []
    for name, title in QUANT_RUNS.items():
        results = report.get(f"quant_{name}")
        if results is None:
            continue
        ours = results["sdrecipe"]
        label = title.split(":")[0]
        if _failed(ours):
            rows.append(f"| {label}: sdrecipe | runs | {ours.error[:120]} | **no** |")
            continue
        if name != "bf16" and baseline is not None and not _failed(baseline):
            ratio = ours.median("wall") / baseline.median("wall")
            met = "yes" if ratio <= 1.3 else "**no**"
            rows.append(f"| {label}: wall against 16d | ≤ 1.3× | {ratio:.2f}× | {met} |")
            normalized = _against_floors(report, name)
            if normalized is not None:
                ratio, which = normalized
                rows.append(
                    f"| {label}: the same, each over the minimal loop of its window{which} "
                    f"| ≤ 1.3× | {ratio:.2f}× | {'yes' if ratio <= 1.3 else '**no**'} |"
                )
        anon = ours.median("peak_anon")
        met = "yes" if anon <= 1536 * 1024 else "**no**"
        rows.append(f"| {label}: peak anonymous memory | ≤ 1.5 GB | {_mb(anon)} | {met} |")
    if "quant_gguf" in report and not _failed(report["quant_gguf"]["sdrecipe"]):
        rate = report["quant_gguf_bytes"] / report["quant_gguf"]["sdrecipe"].median("wall")
        rows.append(f"| 16b: GGUF Q8_0 written | reported | {rate / 1e6:,.0f} MB/s | – |")
    header = ["| measure | target | measured | met |", "|---|---|---|---|"]
    return header + rows if rows else []


# The minimal loop that ran in (or just before) each run's window of scenario 16.
QUANT_FLOORS = {
    "fp8": ("fp8", ""),
    "gguf": ("fp8", " (16a's, run just before)"),
    "bf16": ("bf16", ""),
}


def _against_floors(report: dict, name: str) -> tuple[float, str] | None:
    """Run `name`'s wall over the minimal loop of its window, against the same for 16d:
    the disk's speed changes from one window to the next, the floor shows by how much."""
    if name not in QUANT_FLOORS:
        return None
    floors = []
    for run in (name, "bf16"):
        group, _ = QUANT_FLOORS[run]
        floor = report.get(f"quant_{group}", {}).get("floor (minimal loop)")
        ours = report.get(f"quant_{run}", {}).get("sdrecipe")
        if floor is None or ours is None or _failed(floor) or _failed(ours):
            return None
        floors.append(ours.median("wall") / floor.median("wall"))
    return floors[0] / floors[1], QUANT_FLOORS[name][1]


def quant_section(report: dict) -> list[str]:
    """Scenario 16's section: `python -m bench.run --only quant`."""
    lines = _section_head(report, "quant", QUANT_HEADING, "--only quant --rounds 1")
    lines += [QUANT_ABOUT, ""]
    targets = _quant_targets(report)
    lines += [*targets, ""] if targets else []
    for name, title in QUANT_RUNS.items():
        lines += [f"### {title}", ""]
        if f"quant_{name}" not in report:
            lines += ["Not measured yet: `python -m bench.run --only quant`.", ""]
            continue
        lines += [*_side_by_side(report[f"quant_{name}"]), ""]
    if "quant_precision" in report:
        parameters = report["quant_precision_parameters"] / 1e6
        lines += [
            "### 16e: the rounding of each output format",
            "",
            PRECISION_ABOUT.format(parameters=parameters),
            "",
            "| output | rms, all | max, all | rms, matrices | max, matrices |",
            "|---|---|---|---|---|",
        ]
        for fmt, row in report["quant_precision"].items():
            lines.append(
                f"| {fmt} | {row['all_rms']:.2e} | {row['all_max']:.2e} "
                f"| {row['matrices_rms']:.2e} | {row['matrices_max']:.2e} |"
            )
        lines.append("")
    return lines


FLUX_LORA_HEADING = "## Scenario 17: LoRAs on full-size Flux.1-dev, bf16"
FLUX_LORA_RUNS = {
    "flux_lora": "17a: Flux.1-dev + a rank-32 LoRA, `A + 0.8 * L`, beside the plain "
    "conversion `model: A`, bf16 out",
    "flux_lora_extract": "17b: a rank-32 LoRA extracted from `B − A`",
}
FLUX_LORA_ABOUT = (
    "Scenario 16's bf16 fixtures: two synthetic full-size Flux.1-dev transformers in BFL's "
    "layout (`sdrecipe.synthetic`, B = A's values with another fine-tune delta), and a "
    "synthetic rank-32 LoRA (alpha 16, bf16, kohya's names) on every linear layer of every "
    "double and single block. 17a: `sdrecipe` builds `A + 0.8 * L`, `sdrecipe-convert` "
    "builds `model: A`, the same file written without the LoRA (the floor a bake can "
    "approach), both `dtype: bf16`. 17b: `learned: B - A` written with `format: lora, rank: "
    "32` (a truncated SVD of each layer's difference). Before every run the last output is "
    "deleted, the tensor cache emptied and every model file evicted from the page cache "
    "(`posix_fadvise`): each run starts with nothing cached, and `read from disk` is its "
    "process tree's block input. A bf16 Flux.1-dev file is 23.8 GB, so 17a keeps A and one "
    "output on the disk, 17b A and B, never three such files at once."
)
FLUX_LORA_MECHA = (
    "sd-mecha 1.1.8 is not compared: it registers LoRA configs only over `sd1-kohya`, "
    "`sdxl-kohya` and `sdxl-kohya_but_diffusers` (`_register_all_lycoris_configs` in "
    "`sd_mecha/extensions/builtin/lycoris.py`; its one Flux config, `flux-flux`, is the "
    "model's), so no config matches a Flux LoRA's keys and `sd_mecha.convert(lora, base)` "
    "fails (`TypeError: Could not convert recipe from config from candidate configs () to "
    "config flux-flux`), and it cannot extract one either."
)
# The first words of scenario 17's rows in the targets table at the top of BENCHMARKS.md.
FLUX_LORA_LABELS = ("Flux.1-dev + rank-32 LoRA", "Flux LoRA extraction")
FLUX_LORA_NOT_RUN = (
    "Flux.1-dev + rank-32 LoRA vs plain conversion (`model: A`), and the LoRA extraction",
    "≤ 1.2×; ≤ 1.5 GB; ≤ 3 GB",
    "not run (opt-in: `python -m bench.run --only flux_lora`)",
    None,
)


def _flux_lora_targets(report: dict, read: bool = False) -> list[tuple]:
    """Scenario 17's targets (and, with `read`, what each run read from disk)."""
    rows: list[tuple] = []
    results = report.get("flux_lora")
    if results is not None:
        bake, convert = results["sdrecipe"], results.get("sdrecipe-convert")
        label = "Flux.1-dev + rank-32 LoRA vs plain conversion (`model: A`)"
        if _failed(bake) or convert is None or _failed(convert):
            failed = bake if _failed(bake) else convert
            error = failed.error if failed is not None else "not run"
            rows.append((label, "≤ 1.2×", error[:120], False if _failed(bake) else None))
        else:
            wall, floor = bake.median("wall"), convert.median("wall")
            rows.append(
                (
                    label,
                    "≤ 1.2×",
                    f"{_s(wall)} vs {_s(floor)} ({wall / floor:.2f}×)",
                    wall <= 1.2 * floor,
                )
            )
        if not _failed(bake):
            anon = bake.median("peak_anon")
            rows.append(
                (
                    "Flux.1-dev + rank-32 LoRA: peak anonymous memory",
                    "≤ 1.5 GB",
                    _mb(anon),
                    anon <= 1536 * 1024,
                )
            )
    extract = report.get("flux_lora_extract", {}).get("sdrecipe")
    if extract is not None:
        label = "Flux LoRA extraction (rank 32, `B − A`): peak anonymous memory"
        if _failed(extract):
            rows.append((label, "≤ 3 GB", extract.error[:120], False))
        else:
            anon = extract.median("peak_anon")
            measured = f"{_mb(anon)} ({_s(extract.median('wall'))})"
            rows.append((label, "≤ 3 GB", measured, anon <= 3 * 1024 * 1024))
    if read:
        for key, title in FLUX_LORA_RUNS.items():
            shown = ", ".join(
                f"{tool} {result.median('disk_read') / 1e9:.1f} GB"
                for tool, result in report.get(key, {}).items()
                if not _failed(result)
            )
            if shown:
                rows.append((f"{title.split(':')[0]}: read from disk", "reported", shown, None))
    return rows


def _section_head(report: dict, group: str, heading: str, arguments: str) -> list[str]:
    """An opt-in group's heading (marked when a shrunken validation run made it) and
    the line saying where and when `python -m bench.run ARGUMENTS` measured it."""
    shrink = report.get(f"{group}_shrink", 1)
    validation = f" (a validation run, widths / {shrink}: not the benchmark)" if shrink > 1 else ""
    lines = [heading + validation, ""]
    if f"{group}_machine" in report:
        machine = report[f"{group}_machine"]
        lines += [
            f"Measured by `python -m bench.run {arguments}` on {machine['date']}: "
            f"{machine['cores']} cores ({machine['cpu']}), {machine['memory']} RAM, "
            f"torch {machine['torch']}.",
            "",
        ]
    return lines


def _table(rows: list[tuple]) -> list[str]:
    """Targets as a table: measure, target, measured and whether it was met."""
    lines = ["| measure | target | measured | met |", "|---|---|---|---|"]
    for measure, target, measured, met in rows:
        verdict = "–" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {measure} | {target} | {measured} | {verdict} |")
    return lines


def flux_lora_section(report: dict) -> list[str]:
    """Scenario 17's section: `python -m bench.run --only flux_lora`."""
    lines = _section_head(report, "flux_lora", FLUX_LORA_HEADING, "--only flux_lora")
    lines += [FLUX_LORA_ABOUT, "", FLUX_LORA_MECHA, ""]
    targets = _flux_lora_targets(report, read=True)
    lines += [*_table(targets), ""] if targets else []
    parameters = report.get("flux_lora_parameters")
    for key, title in FLUX_LORA_RUNS.items():
        lines += [f"### {title}", ""]
        if key not in report:
            lines += ["Not measured yet: `python -m bench.run --only flux_lora`.", ""]
            continue
        facts = report.get("flux_lora_adapter" if key == "flux_lora" else "flux_lora_extracted")
        if facts and parameters:
            lora = (
                f"{facts['bytes'] / 1e6:,.0f} MB LoRA, {facts['modules']} modules of rank "
                f"{', '.join(str(rank) for rank in facts['ranks'])}"
            )
            gigabytes = parameters * 2 / 1e9
            lines += [
                f"{parameters / 1e9:.2f} G parameters: bf16 inputs of {gigabytes:.1f} GB each; "
                + (
                    f"a {lora}; a {gigabytes:.1f} GB bf16 output."
                    if key == "flux_lora"
                    else f"out: a {lora}."
                ),
                "",
            ]
        lines += [*_side_by_side(report[key]), ""]
        if key == "flux_lora" and report.get("flux_lora_check"):
            lines += [f"Outputs: {report['flux_lora_check']}.", ""]
    return lines


def newer_section(report: dict) -> list[str]:
    """Scenario 18's section: `python -m bench.run --only newer`."""
    lines = _section_head(report, "newer", NEWER_HEADING, "--only newer")
    lines += [NEWER_ABOUT, "", *_table(_newer_targets(report)), "", SVD_BOUND, ""]
    missing = [f"`{call}`" for key, (call, _) in NEWER.items() if key not in report]
    lines += [f"Not measured in this run: {', '.join(missing)}.", ""] if missing else []
    lines += _single("the baseline: `A + (B − C)`", report["newer_add_difference"], level="###")
    for key, (call, _) in NEWER.items():
        result = report.get(key)
        if isinstance(result, dict):
            lines += [f"### `{call}`", "", *_side_by_side(result), ""]
        elif result is not None:
            lines += _single(f"`{call}`", result, level="###")
    return lines


def _newer_targets(report: dict) -> list[tuple]:
    """Scenario 18's targets: each method against the cold `A + (B - C)` of the
    same run (a multiple, or reported alone for the SVD methods) and against
    mergekit where it has the method."""
    baseline = report["newer_add_difference"].median("wall")
    rows: list[tuple] = []
    for key, (_, bound) in NEWER.items():
        result = report.get(key)
        if result is None:
            continue
        ours = result["sdrecipe"] if isinstance(result, dict) else result
        wall, method = ours.median("wall"), key.removeprefix("newer_")
        measure = f"{method} vs cold `A + (B − C)`"
        if bound is None:
            rows.append((measure, "report", f"{_s(wall)} ({wall / baseline:.1f}×)", None))
        else:
            ratio = wall / baseline
            rows.append((measure, f"≤ {bound}×", f"{ratio:.2f}×", ratio <= bound))
        if isinstance(result, dict) and "mergekit" in result:
            theirs = result["mergekit"].median("wall")
            shown = "failed" if math.isnan(theirs) else f"{theirs / wall:.1f}× as long"
            rows.append((f"{method} vs mergekit", "faster", shown, theirs > wall))
    return rows


def svd_sdxl_section(report: dict) -> list[str]:
    """Scenario 19's section: `python -m bench.run --only svd_sdxl`."""
    lines = _section_head(report, "svd_sdxl", SVD_SDXL_HEADING, "--only svd_sdxl")
    lines += [f"sdrecipe alone, cold, fp16 out. {SVD_BOUND}", ""]
    for method in ("iso_c", "tsv"):
        if f"sdxl_{method}" in report:
            lines += _single(f"`{method}(C, A, B)`", report[f"sdxl_{method}"], level="###")
    return lines


def device_section(report: dict) -> list[str]:
    """Scenario 20's section: `python -m bench.run --only device [--device D]`."""
    device = report.get("device_name", "cuda")
    arguments = f"--only device --device {device}"
    if "device_not_measured" in report:
        machine = report["device_machine"]
        return [
            DEVICE_HEADING,
            "",
            f"Not measured: `python -m bench.run {arguments}` on {machine['date']} "
            f"({machine['cores']} cores, torch {machine['torch']}) found no GPU: "
            f"{report['device_not_measured']}.",
            "",
        ]
    lines = _section_head(report, "device", DEVICE_HEADING, arguments)
    lines += [f"On {report.get('device_card', device)}. {DEVICE_ABOUT}", ""]
    for name, title in DEVICE_TITLES:
        if f"device_{name}" in report:
            lines += [f"### {title}", "", *_side_by_side(report[f"device_{name}"]), ""]
    return lines


DEVICE_TITLES = (
    ("add_difference", "Scenario 1: SD1.5 `A + (B − C)`"),
    ("ties", "Scenario 9a: SD1.5 TIES of four models"),
    ("sdxl_ties", "Scenario 11: SDXL `ties(C, A, B, density=0.2)`"),
    ("sdxl_extract", "A rank-64 LoRA extracted from SDXL A − C"),
    ("dit_flux", "Scenario 15: Flux.1-dev `weighted_sum(A, B)`, fp8 in, bf16 out"),
)


# The opt-in groups' sections, the file's last, in this order: each heading, whether
# a report has the group's figures, and its renderer.
OPT_IN_SECTIONS: tuple[tuple[str, Callable[[dict], bool], Callable[[dict], list[str]]], ...] = (
    (DIT_HEADING, lambda report: any(f"dit_{f}" in report for f in DIT_FAMILIES), dit_section),
    (QUANT_HEADING, lambda report: "quant_machine" in report, quant_section),
    (FLUX_LORA_HEADING, lambda report: "flux_lora_machine" in report, flux_lora_section),
    (NEWER_HEADING, lambda report: "newer_machine" in report, newer_section),
    (SVD_SDXL_HEADING, lambda report: "svd_sdxl_machine" in report, svd_sdxl_section),
    (DEVICE_HEADING, lambda report: "device_machine" in report, device_section),
)


def _top_rows(report: dict) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """The rows an opt-in group's figures give the `## Targets` table, with the
    labels of the rows they replace."""
    rows = []
    if "flux_lora_machine" in report:
        rows.append((FLUX_LORA_LABELS, _flux_lora_targets(report)))
    if "newer_machine" in report:
        labels = tuple(f"{m} vs cold `A + (B − C)`" for m in ("ties", "dare_ties"))
        rows.append((labels, [row for row in _newer_targets(report) if row[0] in labels]))
    return rows


def _with_target_rows(text: str, rows: list[tuple], labels: tuple[str, ...]) -> str:
    """`text` with the rows of its `## Targets` table whose measure starts with one
    of `labels` replaced by `rows` (where the first was, else before the no-op
    rebuild's row)."""
    lines = text.split("\n")
    if "## Targets" not in lines:
        return text
    start = lines.index("## Targets") + 1
    while start < len(lines) and not lines[start].startswith("|"):
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if start == end:
        return text
    ours = tuple(f"| {label}" for label in labels)
    table = lines[start:end]
    old = [i for i, line in enumerate(table) if line.startswith(ours)]
    table = [line for line in table if not line.startswith(ours)]
    rebuild = (i for i, line in enumerate(table) if line.startswith("| no-op rebuild"))
    at = old[0] if old else next(rebuild, len(table))
    table[at:at] = _table(rows)[2:]
    return "\n".join(lines[:start] + table + lines[end:])


def _opt_in_sections(text: str, report: dict) -> str:
    """`text` (BENCHMARKS.md) with the section of each opt-in group `report` has
    replaced (or added) and its rows of the targets table too; the others kept."""
    lines = text.split("\n")
    starts = sorted(
        (i, heading)
        for i, line in enumerate(lines)
        for heading, _, _ in OPT_IN_SECTIONS
        if line.startswith(heading)
    )
    ends = [i for i, _ in starts[1:]] + [len(lines)]
    kept = {
        heading: "\n".join(lines[i:end]) for (i, heading), end in zip(starts, ends, strict=True)
    }
    head = "\n".join(lines[: starts[0][0]] if starts else lines)
    parts = [head.rstrip()] if head.strip() else []
    for heading, present, render in OPT_IN_SECTIONS:
        if present(report):
            parts.append("\n".join(render(report)).rstrip())
        elif heading in kept:
            parts.append(kept[heading].rstrip())
    result = "\n\n".join(parts) + "\n"
    for labels, rows in _top_rows(report):
        result = _with_target_rows(result, rows, labels)
    return result


def write_report(path: Path, report: dict, machine: dict[str, str]) -> None:
    """Write BENCHMARKS.md from a finished run. A report of opt-in groups alone
    (`--only newer`, say, with no earlier full run's figures) replaces their
    sections of the file, its last, and their rows of the targets table."""
    if "io_floor" not in report:
        path.write_text(_opt_in_sections(path.read_text() if path.exists() else "", report))
        return
    io = report["io_floor"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python -m bench.run`) on {machine['date']}.",
        "Do not edit by hand: rerun the command.",
        "",
        f"- Machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory']} RAM, "
        f"Python {machine['python']}, torch {machine['torch']}.",
        "- Inputs: full-size synthetic SD1.5 checkpoints made by `sdrecipe.synthetic` (real key "
        "names and shapes, fp16, 2.13 GB each), warm in the page cache.",
        "- Each figure is the median of the runs listed beside it (a group of scenarios may be "
        "rerun alone with `--only`, with its own `--rounds`); in each round every tool runs "
        "once, in turn, on the same files, so a slow phase of this noisy machine hits all tools "
        "alike.",
        "- Memory: peak `RssAnon` (anonymous memory) and peak `VmRSS` (which also counts "
        "memory-mapped input pages) of the process tree, sampled every 10 ms from /proc.",
        "- sdrecipe runs with its cache on and `--force`; the inputs' fingerprints are already "
        "known, as after any first build (scenario 6 measures the first time).",
        "- Peers: each in its own virtualenv with torch==2.13.0. sd-meh 0.9.5 declares no "
        "dependencies, so safetensors, tqdm, scipy and tensordict are added. mergekit runs "
        "`mergekit-pytorch` (task_arithmetic with base C for scenario 1, linear for scenario 2, "
        "ties, dare_ties and slerp for scenario 9). sd-meh has no TIES of more than two models "
        "and no SLERP, so it sits out scenario 9.",
        "",
        "## Targets",
        "",
        *_targets(report),
        "",
    ]
    for key, title in SCENARIOS.items():
        lines += [f"## {title}", "", *_side_by_side(report[key]), ""]
        if key == "add_difference":
            lines += [
                f"I/O alone on this machine: reading the three inputs from the page cache (`cat`) "
                f"took {io['read']:.2f} s; writing 2.13 GB (`dd`) took {io['write']:.2f} s.",
                "",
            ]
    lines += _single(
        "Scenario 3: five inputs, two named intermediates, default caching",
        report["five_inputs"],
        "`style: B - C`, `detail: D - E`, `merged: A + 0.5 * style + 0.5 * detail`, built "
        "with `--force`. The cost rule keeps element-wise intermediates out of the cache: "
        "reading a float32 object back costs about what recomputing it does.",
    )
    lines += _single(
        "Scenario 3b: the same, with `cache: false` on both intermediates",
        report["five_inputs_uncached"],
    )
    lines += _single("Scenario 4: no-op rebuild (interpreter start included)", report["noop"])
    lines += _single(
        "Scenario 5: alpha change on the output",
        report["alpha_change"],
        "The factor of `style` changes each round; `style` and `detail` are recomputed "
        "(element-wise), the output rewritten.",
    )
    first = report["first_time"].median("wall")
    cold = report["add_difference"]["sdrecipe"].median("wall")
    lines += _single(
        "Scenario 6: first build with new inputs (fingerprinting included)",
        report["first_time"],
        f"Against scenario 1's cold build ({_s(cold)}), first-time hashing adds "
        f"{_s(first - cold)} ({(first - cold) / first:.0%} of the first build). "
        f"Fingerprinting alone (`sdrecipe plan` with an empty cache): "
        f"{_s(report['fingerprint_only'].median('wall'))}.",
    )
    lines += _single("Start-up: `sdrecipe --help`", report["help"])
    for key, title in ADVANCED.items():
        if key in report:
            lines += [f"## {title}", "", *_side_by_side(report[key]), ""]
    if "ties_cold" in report:
        lines += _single(
            "Scenario 10: `tuned: ties(C, A, B, D, density=0.2) - C`, `merged: A + 0.5 * tuned`, "
            "cold",
            report["ties_cold"],
        )
        lines += _single(
            "Scenario 10b: the same after the factor of `tuned` changed",
            report["ties_downstream"],
            "`tuned` calls a whole-tensor method, so the cost rule caches it; only the output's "
            "element-wise arithmetic is redone.",
        )
    if "sdxl" in report:
        lines += [
            "## Scenario 7: SDXL `A + (B − C)`, fp16 out (27.8 GB of inputs and output)",
            "",
            "Three 6.9 GB inputs and a 6.9 GB output do not fit in this machine's page cache; "
            "`read from disk` is the block input of each tool's process tree. Every run "
            "starts from the same page cache: the model files are evicted "
            "(`posix_fadvise`), then, in 7a, the three inputs are read once, as after an "
            "earlier merge of them.",
            "",
            "### 7a: inputs cached at the start",
            "",
            *_side_by_side(report["sdxl"]),
            "",
        ]
        if "sdxl_cold" in report:
            lines += [
                "### 7b: nothing cached at the start",
                "",
                *_side_by_side(report["sdxl_cold"]),
                "",
            ]
    if "sdxl_blocks_cold" in report:
        keys = report["sdxl_block_change_keys"]
        lines += _single(
            "Scenario 8: SDXL block-weighted `weighted_sum`, cold",
            report["sdxl_blocks_cold"],
            "Twenty block values pasted as supermerger writes them, `--force`.",
        )
        lines += _single(
            "Scenario 8b: the same after one block (IN04) changed",
            report["sdxl_block_change"],
            f"{keys['tensors_computed']} keys recomputed, {keys['tensors_from_cache']} copied "
            "from the previous output through the cache.",
        )
    if "sdxl_ties" in report:
        lines += _single(
            "Scenario 11: SDXL `ties(C, A, B, density=0.2)`, cold",
            report["sdxl_ties"],
            "sdrecipe alone: a side-by-side run of the peers on SDXL would take hours here.",
        )
    if "sdxl_lora" in report:
        lines += [
            "## Scenario 12: full-size SDXL + a rank-64 LoRA (986 modules), fp16 out",
            "",
            "`sdrecipe`: `A + 0.8 * L`; `sdrecipe-convert`: `model: A`, the same checkpoint "
            "written without a LoRA (the floor a bake can approach); `sd-mecha`: "
            "`convert(lora, base)` added with `add_difference`.",
            "",
            *_side_by_side(report["sdxl_lora"]),
            "",
        ]
    if "extract_lora" in report:
        lines += _single(
            "Scenario 13: a rank-64 LoRA extracted from full-size SD1.5 `B − C`",
            report["extract_lora"],
            "`format: lora, rank: 64`: kohya's 264 layers (the UNet's transformers and the "
            "text encoder), a truncated SVD each, `--force`.",
        )
    if "sweep" in report:
        lines += sweep_section(report)
    for _, present, render in OPT_IN_SECTIONS:
        if present(report):
            lines += render(report)
    path.write_text("\n".join(lines))
