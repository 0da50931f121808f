"""Builds on a device (`--device`): the device path run on the CPU gives the
direct path's bytes; the device class is in the identities and the lock of
methods whose bytes follow it; devices this torch cannot use are clear errors.
Tests marked `cuda` run the same builds on a GPU and are skipped without one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml

from conftest import invoke, write_recipe
from sdrecipe import api
from sdrecipe.cache.store import Cache
from sdrecipe.engine.devices import DeviceMemory, Lane, Placement, place
from sdrecipe.errors import RecipeError
from sdrecipe.plan.assess import assess
from sdrecipe.plan.prepare import prepare
from sdrecipe.plan.status import proven_current
from sdrecipe.plan.tensor_plan import Compute
from sdrecipe.recipe.loader import load_recipe
from sdrecipe.recipe.lock import read_lock
from sdrecipe.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Every method that runs on a device with the CPU's bytes, the selection methods
# with device paths, and methods that run on the CPU in a device build.
SAME_BYTES_NODES = {
    "inpaint": "I + (F - B)",
    "divided": "(F + O + B) / 3",
    "weighted": "weighted_sum(F, O, alpha=0.3)",
    "added": "add_difference(B, F, O, alpha=0.7)",
    "scaled": "B + scale(F - B, alpha=1.5)",
    "smooth": "sigmoid(F, O, alpha=0.3)",
    "inverse": "inv_sigmoid(F, O, alpha=0.3)",
    "triple": "triple_sum(B, F, O)",
    "twice": "sum_twice(B, F, O)",
    "train": "train_difference(B, F, O)",
    "similar": "similarity_add_difference(B, F, O)",
    "ties": "ties(B, F, O, density=0.3)",
    "dare": "dare(B, F, O, drop=0.4, seed=3)",
    "dare_ties": "dare_ties(B, F, O, drop=0.5, density=0.5)",
    "crumbs": "breadcrumbs_ties(B, F, O, density=0.8)",
    "della": "della(B, F, O)",
    "baked": "F + 0.8 * L",
}
DEVICE_NODES = {"multiplied": "multiply_difference(F, O, B, alpha=0.3)"}


@pytest.fixture(scope="module")
def lora(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    return write_adapter(folder / "style.safetensors", AdapterSpec(shrink=32, seed=7))


def recipe_text(models: dict[str, Path], lora: Path, nodes: dict[str, str], out: str) -> str:
    inputs = {
        "B": models["base"],
        "F": models["finetune"],
        "O": models["other"],
        "I": models["inpainting"],
        "L": lora,
    }
    return yaml.safe_dump(
        {
            "inputs": {name: str(path) for name, path in inputs.items()},
            "nodes": nodes,
            "outputs": {name: f"{out}/{name}.safetensors" for name in nodes},
        }
    )


def built_bytes(folder: Path, names) -> dict[str, bytes]:
    return {name: (folder / f"{name}.safetensors").read_bytes() for name in names}


@pytest.mark.parametrize(
    "memory", [None, 3 << 20, 1_000_000], ids=["whole keys", "row ranges", "small row ranges"]
)
def test_the_device_path_on_the_cpu_gives_the_direct_paths_bytes(tmp_path, models, lora, memory):
    nodes = {**SAME_BYTES_NODES, **DEVICE_NODES}
    recipe = write_recipe(tmp_path, recipe_text(models, lora, nodes, "direct"))
    staged = write_recipe(tmp_path, recipe_text(models, lora, nodes, "staged"), "staged.yaml")
    assert api.build([recipe], api.Options(cache_dir=tmp_path / "cache", no_cache=True)).ok
    options = api.Options(
        cache_dir=tmp_path / "cache", no_cache=True, device="cpu", device_memory=memory, threads=2
    )
    assert api.build([staged], options).ok
    assert built_bytes(tmp_path / "staged", nodes) == built_bytes(tmp_path / "direct", nodes)


def test_cached_intermediates_and_fp8_outputs_take_the_device_path(tmp_path, models):
    """Intermediates stored in (and read back from) the cache, a float8 input
    widened on the device, and a scaled fp8 output encoded from device values."""
    fp8 = tmp_path / "fp8.safetensors"
    convert = write_recipe(
        tmp_path,
        f"inputs: {{F: {models['finetune']}}}\nnodes: {{c: F * 1}}\n"
        f"outputs: {{c: {{path: {fp8}, dtype: fp8_e4m3fn}}}}\n",
        "cast.yaml",
    )
    assert api.build([convert], api.Options(cache_dir=tmp_path / "cache", no_cache=True)).ok

    def text(out: str, weight: float) -> str:
        return (
            f"inputs: {{B: {models['base']}, F: {fp8}, O: {models['other']}}}\n"
            "nodes:\n  d: F - B\n  t: ties(B, F, O, density=0.4)\n"
            f"  m: B + 0.5 * d + {weight} * (t - B)\n"
            f"outputs:\n  m: {out}/m.safetensors\n"
            f"  t: {{path: {out}/t.safetensors, dtype: fp8, scaled: true}}\n"
        )

    names = ("m", "t")
    for weight in (0.1, 0.2):  # the second build reads `d` and `t` from the cache
        direct = write_recipe(tmp_path, text("direct", weight), "direct.yaml")
        staged = write_recipe(tmp_path, text("staged", weight), "staged.yaml")
        assert api.build([direct], api.Options(cache_dir=tmp_path / "c1")).ok
        report = api.build([staged], api.Options(cache_dir=tmp_path / "c2", device="cpu"))
        assert report.ok
        assert built_bytes(tmp_path / "staged", names) == built_bytes(tmp_path / "direct", names)
    assert report.cache.tensors_from_cache > 0


def test_a_lora_baked_under_a_memory_cap_keeps_the_direct_paths_row_ranges(tmp_path):
    """A LoRA's product is BLAS's, whose rounding depends on how many rows it
    multiplies at once: a cap of 1 MB would split the demo's [80, 320] keys in
    39 rows."""
    nodes = {"baked": "B + 0.8 * L"}
    base = write_model(tmp_path / "base.safetensors", ModelSpec(seed=1, shrink=8))
    spec = AdapterSpec(shrink=8, rank=8, alpha=4.0, seed=7, convs=True)
    style = write_adapter(tmp_path / "style.safetensors", spec)

    def text(out: str) -> str:
        return (
            f"inputs: {{B: {base}, L: {style}}}\n"
            f"nodes: {{baked: B + 0.8 * L}}\noutputs: {{baked: {out}/baked.safetensors}}\n"
        )

    recipe = write_recipe(tmp_path, text("direct"))
    staged = write_recipe(tmp_path, text("staged"), "staged.yaml")
    assert api.build(
        [recipe], api.Options(cache_dir=tmp_path / "cache", no_cache=True, threads=2)
    ).ok
    options = api.Options(
        cache_dir=tmp_path / "cache",
        no_cache=True,
        threads=2,
        device="cpu",
        device_memory=1_000_000,
    )
    assert api.build([staged], options).ok
    assert built_bytes(tmp_path / "staged", nodes) == built_bytes(tmp_path / "direct", nodes)


def test_a_lora_extracted_on_the_device_path_is_the_direct_paths(tmp_path, models):
    def text(out: str) -> str:
        return (
            f"inputs: {{B: {models['base']}, F: {models['finetune']}}}\n"
            "nodes: {learned: F - B}\n"
            f"outputs: {{learned: {{path: {out}/learned.safetensors, format: lora, rank: 8}}}}\n"
        )

    direct = write_recipe(tmp_path, text("direct"), "direct.yaml")
    staged = write_recipe(tmp_path, text("staged"), "staged.yaml")
    assert api.build([direct], api.Options(cache_dir=tmp_path / "cache", no_cache=True)).ok
    assert api.build(
        [staged], api.Options(cache_dir=tmp_path / "cache", no_cache=True, device="cpu")
    ).ok
    assert built_bytes(tmp_path / "staged", ["learned"]) == built_bytes(
        tmp_path / "direct", ["learned"]
    )
    lock = yaml.safe_load(staged.with_suffix(".lock").read_text())
    assert lock["outputs"]["learned"]["device"] == "cpu"  # factors follow the device's SVD


def test_only_methods_with_bytes_of_their_own_carry_the_device_class(tmp_path, models, lora):
    nodes = {"added": SAME_BYTES_NODES["added"], **DEVICE_NODES}
    recipe = write_recipe(tmp_path, recipe_text(models, lora, nodes, "out"))
    prepared = prepare(recipe)
    on_cpu = assess(prepared, None, 1).identities
    on_cuda = assess(prepared, None, 1, device_class="cuda").identities
    assert on_cpu.values["added"] == on_cuda.values["added"]
    assert on_cpu.values["multiplied"].keys() == on_cuda.values["multiplied"].keys()
    computed = {
        plan.key for plan in prepared.plan.keys if isinstance(plan.steps.get("multiplied"), Compute)
    }
    differing = {
        k for k, v in on_cuda.values["multiplied"].items() if on_cpu.values["multiplied"][k] != v
    }
    assert differing == computed and len(computed) > 1000


def test_the_lock_records_the_device_class_and_status_follows_it(tmp_path, models, lora):
    nodes = {"added": SAME_BYTES_NODES["added"], **DEVICE_NODES}
    recipe = write_recipe(tmp_path, recipe_text(models, lora, nodes, "out"))
    assert api.build([recipe], api.Options(cache_dir=tmp_path / "cache")).ok
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert "device" not in lock["outputs"]["added"]
    assert lock["outputs"]["multiplied"]["device"] == "cpu"
    loaded = load_recipe(recipe)
    cache = Cache(tmp_path / "cache")
    assert set(proven_current(loaded, None, cache) or {}) == {"added", "multiplied"}
    # On a GPU, the output whose bytes follow the device class is not current.
    assert proven_current(loaded, None, cache, "cuda") is None
    assert set(proven_current(loaded, ["added"], cache, "cuda") or {}) == {"added"}
    statuses = assess(prepare(recipe), cache, 1, lock=read_lock(recipe), device_class="cuda")
    reasons = {status.node: status.reason for status in statuses.statuses}
    assert reasons["multiplied"].startswith(
        "built on another device class (cpu; this run computes on cuda)"
    )
    assert reasons["added"] == "output matches the lock"
    # A lock of another class's bytes: the CPU's status says rebuild, verify says why.
    lock["outputs"]["multiplied"]["device"] = "cuda"
    lock["outputs"]["multiplied"]["digest"] = "0" * 64
    recipe.with_suffix(".lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    assert proven_current(loaded, None, cache) is None
    result = invoke("verify", str(recipe))
    assert result.exit_code == 1
    assert "the lock's are cuda's, this rebuild ran on cpu; verify with --device cuda" in (
        result.stdout
    )


def test_a_rebuild_names_the_device_classes_only_where_they_differ(tmp_path, models):
    """A device-dependent intermediate's reason names the class its downstream
    output was built on; on that class a changed identity is sdrecipe's arithmetic."""
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}}}
        nodes: {{blended: "slerp(A, B, t=0.3)", out: 0.5 * blended + 0.5 * A}}
        outputs: {{out: out.safetensors}}
        """,
    )
    assert api.build([recipe], api.Options(cache_dir=tmp_path / "cache")).ok

    def reasons(device_class: str) -> dict[str, str]:
        assessed = assess(
            prepare(recipe), Cache(tmp_path / "cache"), 1, lock=read_lock(recipe),
            device_class=device_class,
        )  # fmt: skip
        return {status.node: status.reason for status in assessed.statuses}

    assert reasons("cuda")["blended"] == (
        "built on another device class (cpu; this run computes on cuda): "
        "its methods' bytes follow it; see --device"
    )
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    lock["nodes"]["blended"]["identity"] = "0" * 64
    recipe.with_suffix(".lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    (tmp_path / "out.safetensors").unlink()
    api.cache_clear(api.Options(cache_dir=tmp_path / "cache"))
    assert reasons("cpu")["blended"] == "sdrecipe's arithmetic changed"


def test_verify_says_which_device_class_it_reproduces(tmp_path, models, lora):
    nodes = {"added": SAME_BYTES_NODES["added"], **DEVICE_NODES}
    recipe = write_recipe(tmp_path, recipe_text(models, lora, nodes, "out"))
    assert invoke("build", str(recipe), "--device", "cpu").exit_code == 0
    result = invoke("verify", str(recipe), "--device", "cpu", "--json")
    assert result.exit_code == 0
    found = {r["name"]: r for r in yaml.safe_load(result.stdout)["outputs"]}
    assert found["multiplied"]["device"] == "cpu" and found["multiplied"]["reproducible"]
    assert found["added"]["device"] is None and found["added"]["reproducible"]
    shown = invoke("verify", str(recipe))
    assert "multiplied: reproducible on cpu" in shown.stdout
    assert "added: reproducible (" in shown.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_cuda_on_a_cpu_torch_is_a_usage_error_that_says_how_to_install(tmp_path, models, lora):
    recipe = write_recipe(tmp_path, recipe_text(models, lora, {"a": "B * 1"}, "out"))
    for command in ("build", "verify", "status", "plan"):
        result = invoke(command, str(recipe), "--device", "cuda")
        assert result.exit_code == 2, command
        assert "built for the CPU only" in result.stderr
        assert "pip install torch==2.13.0 --index-url" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="built for the CPU only"):
        place("cuda:1")


def test_device_names_are_checked_before_anything_runs(tmp_path, models, lora):
    recipe = write_recipe(tmp_path, recipe_text(models, lora, {"a": "B * 1"}, "out"))
    result = invoke("build", str(recipe), "--device", "gpu")
    assert result.exit_code == 2
    assert "'gpu' is not a device; use cpu, cuda, cuda:N, mps or auto" in result.stderr
    for memory in ("lots", "0", "999KB"):
        bad_size = invoke("build", str(recipe), "--device", "cpu", "--device-memory", memory)
        assert bad_size.exit_code == 2, memory
    alone = invoke("build", str(recipe), "--device-memory", "8GB")
    assert alone.exit_code == 2 and "name the --device too" in alone.stderr
    huge = invoke("build", str(recipe), "--device", "cuda:99999999999999999999999")
    assert huge.exit_code == 2 and "internal error" not in huge.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="not a device"):
        api.Options(device="cuda:")
    with pytest.raises(RecipeError, match="not a device"):
        api.Options(device=5)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="at least"):
        api.Options(device="cpu", device_memory="8GB")  # type: ignore[arg-type]
    if not torch.backends.mps.is_available():
        with pytest.raises(RecipeError, match="no Metal"):
            place("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_auto_without_a_gpu_takes_the_direct_cpu_path():
    assert place("auto") is None
    assert place(None) is None
    assert place("cpu", 1 << 30) == Placement(torch.device("cpu"), 1 << 30)


def test_a_lane_copies_through_its_own_buffers():
    lane = Lane(Placement(torch.device("cpu")))
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    placed = lane.upload(source, "x")
    assert torch.equal(placed, source) and placed.data_ptr() != source.data_ptr()
    again = lane.upload(source * 2, "x")  # the slot's buffer is reused; the copy is new
    assert torch.equal(placed, source) and torch.equal(again, source * 2)
    fetched = lane.download(again[1:])
    assert torch.equal(fetched, source[1:] * 2)
    assert lane.download(source[:1]).data_ptr() == fetched.data_ptr()


def test_device_memory_holds_keys_within_the_cap():
    memory = DeviceMemory(100)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with memory.holding(60):
            order.append("first in")
            first_in.set()
            release_first.wait(10)
            order.append("first out")

    def second() -> None:
        first_in.wait(10)
        with memory.holding(60):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    first_in.wait(10)
    with memory.holding(40):  # fits beside the first
        order.append("small in")
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert order.index("small in") < order.index("first out") < order.index("second in")
    assert memory.held == 0
    with DeviceMemory(10).holding(1000):  # larger than the cap: runs, alone
        pass


@CUDA
def test_cuda_builds_give_the_cpus_bytes_where_arithmetic_allows(tmp_path, models, lora):
    recipe = write_recipe(tmp_path, recipe_text(models, lora, SAME_BYTES_NODES, "cpu"))
    gpu = write_recipe(tmp_path, recipe_text(models, lora, SAME_BYTES_NODES, "gpu"), "gpu.yaml")
    assert api.build([recipe], api.Options(cache_dir=tmp_path / "cache", no_cache=True)).ok
    assert api.build(
        [gpu], api.Options(cache_dir=tmp_path / "cache", no_cache=True, device="cuda")
    ).ok
    names = list(SAME_BYTES_NODES)
    assert built_bytes(tmp_path / "gpu", names) == built_bytes(tmp_path / "cpu", names)
    lock = yaml.safe_load(gpu.with_suffix(".lock").read_text())
    assert all("device" not in entry for entry in lock["outputs"].values())


@CUDA
def test_cuda_builds_record_the_device_class_of_their_own_bytes(tmp_path, models, lora):
    recipe = write_recipe(tmp_path, recipe_text(models, lora, DEVICE_NODES, "out"))
    on_gpu = api.Options(cache_dir=tmp_path / "cache", device="cuda")
    assert api.build([recipe], on_gpu).ok
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert lock["outputs"]["multiplied"]["device"] == "cuda"
    status = api.status([recipe], on_gpu)
    assert [line.status for line in status.outputs] == ["up to date"]
    on_cpu = api.status([recipe], api.Options(cache_dir=tmp_path / "cache"))
    assert [line.status for line in on_cpu.outputs] == ["rebuild"]
    report = api.verify([recipe], on_gpu)
    assert report.reproducible and report.outputs[0].device == "cuda"
