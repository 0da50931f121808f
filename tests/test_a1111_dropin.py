"""Drop-in with AUTOMATIC1111: its merger re-merges sdrecipe outputs, schedule
buffers stay the base's, and `sd_merge_recipe` has the types A1111 writes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from conftest import SHRINK, invoke, write_recipe
from sdrecipe.arch import DDPM_SCHEDULE_BUFFERS
from sdrecipe.io.readers import open_model
from sdrecipe.synthetic import ModelSpec, write_model
from sdrecipe.views.model_report import inspect_model

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def a1111_read_metadata(path: Path) -> dict[str, object]:
    """`modules/sd_models.py` `read_metadata_from_safetensors`: every value that
    starts with `{` is parsed as JSON."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    metadata: dict[str, object] = {}
    for key, value in header.get("__metadata__", {}).items():
        metadata[key] = value
        if isinstance(value, str) and value[0:1] == "{":
            with contextlib.suppress(Exception):
                metadata[key] = json.loads(value)
    return metadata


def a1111_remerge(inputs: list[Path], out: Path) -> dict[str, str]:
    """`modules/extras.py` `run_modelmerger`'s metadata path with "Copy metadata
    from merged models" and "Add merge recipe metadata" on (the UI defaults):
    copy every input's metadata, re-serialise only the two lineage fields, and
    save with safetensors, which requires every value to be a string."""
    metadata: dict[str, object] = {}
    infos = [a1111_read_metadata(path) for path in inputs]
    for info in infos:
        metadata.update(info)
    metadata["format"] = "pt"
    merge_models: dict[str, object] = {}
    for path, info in zip(inputs, infos, strict=True):
        merge_models[path.name] = {
            "name": path.name,
            "legacy_hash": "00000000",
            "sd_merge_recipe": info.get("sd_merge_recipe"),
        }
        merge_models.update(info.get("sd_merge_models", {}))
    metadata["sd_merge_recipe"] = json.dumps({"type": "webui", "interp_method": "Weighted sum"})
    metadata["sd_merge_models"] = json.dumps(merge_models)
    save_file({"x": torch.zeros(1)}, out, metadata=metadata)
    return metadata


def build(folder: Path, models: dict[str, Path], node: str, output: str) -> Path:
    recipe = write_recipe(
        folder,
        f"""
        inputs:
          A: {models["base"]}
          B: {models["finetune"]}
          C: {models["other"]}
        nodes:
          out: '{node}'
        outputs:
          out: {output}
        """,
    )
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    return folder


OUTPUT_KINDS = {
    "single file": ("{path: out.safetensors}", Path("out.safetensors")),
    "baked VAE": ("{path: out.safetensors, vae: vae-ft.safetensors}", Path("out.safetensors")),
    "diffusers": ("{path: out-diffusers, format: diffusers}", Path("out-diffusers") / UNET_FILE),
}


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_a1111_re_merges_every_kind_of_sdrecipe_output(tmp_path, models, standalone_vae, kind):
    output, written = OUTPUT_KINDS[kind]
    build(tmp_path, models, "weighted_sum(A, B, alpha=0.3)", output)
    ours = tmp_path / written
    remerged = a1111_remerge([ours, models["other"]], tmp_path / "a1111.safetensors")
    assert all(isinstance(value, str) for value in remerged.values())
    with safe_open(tmp_path / "a1111.safetensors", "np") as handle:
        copied = handle.metadata()
    assert "inputs:" in copied["sdrecipe.recipe"], "sdrecipe's recipe survives as text"
    lineage = json.loads(copied["sd_merge_models"])
    assert lineage[ours.name]["sd_merge_recipe"]["type"] == "sdrecipe"


def test_the_old_json_object_field_is_what_broke_a1111(tmp_path, models):
    """The emulation is faithful: the form earlier sdrecipe versions wrote fails in it."""
    legacy = tmp_path / "legacy.safetensors"
    save_file({"x": torch.zeros(1)}, legacy, metadata={"sdrecipe": json.dumps({"node": "out"})})
    with pytest.raises(TypeError):
        a1111_remerge([legacy], tmp_path / "a1111.safetensors")


def test_inspect_reads_both_forms_and_ignores_a_copied_record(tmp_path, models):
    build(tmp_path, models, "weighted_sum(A, B, alpha=0.3)", "{path: out.safetensors}")
    own = inspect_model(tmp_path / "out.safetensors", None)["lineage"]["sdrecipe"]
    assert own["node"] == "out"
    assert own["expression"] == "weighted_sum(A, B, alpha=0.3)"
    assert own["inputs"]["B"]["file"] == "finetune.safetensors"
    assert len(own["inputs"]["B"]["sha256"]) == 64
    legacy = tmp_path / "legacy.safetensors"
    record = {"version": "0.1.0", "node": "old", "expression": "A", "inputs": {}}
    save_file({"x": torch.zeros(1)}, legacy, metadata={"sdrecipe": json.dumps(record)})
    assert open_model(legacy).metadata["sdrecipe"].startswith("{")
    from sdrecipe.plan.provenance import read_provenance

    assert read_provenance(open_model(legacy).metadata).node == "old"
    a1111_remerge([tmp_path / "out.safetensors"], tmp_path / "a1111.safetensors")
    copied = open_model(tmp_path / "a1111.safetensors").metadata
    assert "sdrecipe.recipe" in copied
    assert read_provenance(copied) is None, "A1111's output is not described by its input's record"


def merge_recipe(folder: Path) -> dict[str, object]:
    return json.loads(open_model(folder / "out.safetensors").metadata["sd_merge_recipe"])


@pytest.mark.parametrize(
    ("node", "method", "multiplier"),  # method: how interp_method starts
    [
        ("weighted_sum(A, B, alpha=0.3)", "Weighted sum", 0.3),
        ("add_difference(A, B, C)", "Add difference", 1.0),
        ("add_difference(A, B, C, alpha=0.5)", "Add difference", 0.5),
        ("A + (B - C)", "A + (B - C)", None),
        ("weighted_sum(A, B, alpha={default: 0.5, unet: 0.2})", "weighted_sum(A, B, alpha={", None),
        ("sigmoid(A, B, alpha=0.3)", "sigmoid(A, B, alpha=0.3)", None),
    ],
)
def test_merge_recipe_fields_have_a1111s_types(tmp_path, models, node, method, multiplier):
    build(tmp_path, models, node, "{path: out.safetensors, dtype: fp16}")
    recipe = merge_recipe(tmp_path)
    assert recipe["interp_method"].startswith(method)
    assert recipe["multiplier"] == multiplier
    assert recipe["config_source"] == 0 and type(recipe["config_source"]) is int
    assert recipe["bake_in_vae"] == "None"
    assert recipe["save_as_half"] is True
    assert recipe["type"] == "sdrecipe"
    assert recipe["discard_weights"] == ""
    models_field = json.loads(open_model(tmp_path / "out.safetensors").metadata["sd_merge_models"])
    names = {entry["name"] for entry in models_field.values()}
    assert names <= {"base.safetensors", "finetune.safetensors", "other.safetensors"}
    assert "finetune.safetensors" in names


def test_baked_vae_is_named_by_its_file(tmp_path, models, standalone_vae):
    build(tmp_path, models, "A", "{path: out.safetensors, vae: vae-ft.safetensors}")
    assert merge_recipe(tmp_path)["bake_in_vae"] == "vae-ft.safetensors"


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three models whose DDPM schedules differ (SD's, and two others)."""
    folder = tmp_path_factory.mktemp("scheduled")
    ends = {"base": 0.012, "finetune": 0.02, "other": 0.03}
    return {
        name: write_model(
            folder / f"{name}.safetensors",
            ModelSpec(shrink=SHRINK, seed=1, delta_seed=index or None, beta_end=end),
        )
        for index, (name, end) in enumerate(ends.items())
    }


@pytest.mark.parametrize("node", ["A + (B - C)", "weighted_sum(A, B, alpha=0.5)"])
def test_schedule_buffers_pass_through_from_the_base(tmp_path, scheduled, node):
    base = load_file(scheduled["base"])
    assert not np.array_equal(base["betas"], load_file(scheduled["finetune"])["betas"])
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {scheduled["base"]}, B: {scheduled["finetune"]}, C: {scheduled["other"]}}}
        nodes: {{out: '{node}'}}
        outputs: {{out: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    assert "12 never merged (sampler schedule buffer)" in result.stdout
    out = load_file(tmp_path / "out.safetensors")
    for key in DDPM_SCHEDULE_BUFFERS:
        np.testing.assert_array_equal(out[key], base[key], err_msg=key)
    key = "model.diffusion_model.out.2.weight"
    assert not np.array_equal(out[key], base[key].astype(np.float32)), "weights are merged"
