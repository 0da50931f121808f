"""Node key selection and output options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from conftest import as32, run_in_process, write_recipe


def build_recipe(tmp_path, node: str, output: str = "{path: out.safetensors, dtype: fp32}"):
    recipe = write_recipe(
        tmp_path,
        f"inputs: {{A: A.safetensors, B: B.safetensors, C: C.safetensors}}\n"
        f"nodes:\n  out: {node}\noutputs:\n  out: {output}\n",
    )
    return recipe, run_in_process("build", "--no-cache", "--json", str(recipe))


@pytest.fixture
def inputs(tmp_path, models):
    for name, source in (("A", "finetune"), ("B", "other"), ("C", "base")):
        (tmp_path / f"{name}.safetensors").symlink_to(models[source])
    return {name: load_file(tmp_path / f"{name}.safetensors") for name in "ABC"}


def expected(arrays, key):
    a, b, c = (as32(arrays[name][key]) for name in "ABC")
    return a + (b - c)


def test_only_unet_merges_the_unet_and_passes_the_rest(tmp_path, inputs):
    _, result = build_recipe(tmp_path, "{expression: A + (B - C), only: [unet]}")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["outputs"][0]
    assert summary["merged"] == 686
    assert summary["passed_through"] == {"outside the node's selection": 1131 - 686}
    out = load_file(tmp_path / "out.safetensors")
    unet = "model.diffusion_model.out.2.weight"
    vae = "first_stage_model.decoder.conv_out.weight"
    np.testing.assert_allclose(out[unet], expected(inputs, unet), rtol=1e-6)
    np.testing.assert_array_equal(out[vae], as32(inputs["A"][vae]))


def test_exclude_and_key_regexes(tmp_path, inputs):
    node = (
        "{expression: A + (B - C), exclude: [vae], include_keys: ['attn'], exclude_keys: ['attn2']}"
    )
    _, result = build_recipe(tmp_path, node)
    assert result.returncode == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    for key, value in out.items():
        selected = "attn" in key and "attn2" not in key and not key.startswith("first_stage")
        if selected:
            np.testing.assert_allclose(value, expected(inputs, key), rtol=1e-6, err_msg=key)
        elif value.dtype != np.int64:
            np.testing.assert_array_equal(value, as32(inputs["A"][key]), err_msg=key)
    assert any("attn1" in key for key in out)


def test_bad_selection_options_are_recipe_errors(tmp_path, inputs):
    recipe, result = build_recipe(tmp_path, "{expression: A + B, include_keys: ['(']}")
    assert result.returncode == 2
    assert f"{recipe}:3: node 'out': include_keys: '(' is not a valid regex" in result.stderr
    _, result = build_recipe(tmp_path, "{expression: A + B, only: [unett]}")
    assert result.returncode == 2
    assert "nodes.out.only.0" in result.stderr and "unett" in result.stderr


def test_prune_ema_metadata_and_modelspec(tmp_path, models):
    tensors = {k: torch.from_numpy(v) for k, v in load_file(models["base"]).items()}
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.diffusion_modelout2bias"] = torch.zeros(4, dtype=torch.float16)
    save_file(tensors, tmp_path / "A.safetensors")
    (tmp_path / "B.safetensors").symlink_to(models["finetune"])
    (tmp_path / "C.safetensors").symlink_to(models["base"])
    output = "{path: out.safetensors, prune_ema: true, metadata: {author: me, license: mit}}"
    _, result = build_recipe(tmp_path, "A + (B - C)", output)
    assert result.returncode == 0, result.stderr
    with safe_open(tmp_path / "out.safetensors", "np") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert not any(key.startswith("model_ema.") for key in keys) and len(keys) == 1131
    assert (metadata["author"], metadata["license"]) == ("me", "mit")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.title"] == "out"
    _, kept = build_recipe(tmp_path, "A + (B - C)", "{path: kept.safetensors}")
    assert kept.returncode == 0, kept.stderr
    with safe_open(tmp_path / "kept.safetensors", "np") as handle:
        assert "model_ema.decay" in set(handle.keys())


def test_reserved_metadata_is_refused(tmp_path, inputs):
    output = "{path: out.safetensors, metadata: {sd_merge_models: x}}"
    recipe, result = build_recipe(tmp_path, "A + (B - C)", output)
    assert result.returncode == 2
    assert f"{recipe}:5: outputs.out.metadata: sdrecipe writes sd_merge_models" in result.stderr


def test_embedded_recipe_with_options_reproduces_the_output(tmp_path, inputs):
    node = "{expression: A + (B - C), only: [unet], exclude_keys: ['time_embed']}"
    output = "{path: out.safetensors, dtype: bf16, metadata: {author: me}}"
    _, result = build_recipe(tmp_path, node, output)
    assert result.returncode == 0, result.stderr
    with safe_open(tmp_path / "out.safetensors", "np") as handle:
        embedded = handle.metadata()["sdrecipe.recipe"]
    again = tmp_path / "again"
    again.mkdir()
    for name in "ABC":
        (again / f"{name}.safetensors").symlink_to(tmp_path / f"{name}.safetensors")
    (again / "recipe.yaml").write_text(embedded)
    rebuilt = run_in_process("build", "--no-cache", str(again / "recipe.yaml"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (again / "out.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()


def test_changing_the_selection_is_a_reason_to_rebuild(tmp_path, inputs):
    recipe, result = build_recipe(tmp_path, "{expression: A + (B - C), only: [unet]}")
    assert result.returncode == 0, result.stderr
    assert run_in_process("build", str(recipe)).returncode == 0
    recipe.write_text(recipe.read_text().replace("only: [unet]", "only: [vae]"))
    plan = json.loads(run_in_process("plan", "--json", str(recipe)).stdout)["nodes"][0]
    assert plan["status"] == "rebuild"
    assert "only: unet" in plan["reason"] and "only: vae" in plan["reason"]


def test_pruned_and_unpruned_outputs_build_together(tmp_path, models):
    tensors = {k: torch.from_numpy(v) for k, v in load_file(models["base"]).items()}
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    save_file(tensors, tmp_path / "A.safetensors")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "inputs: {A: A.safetensors}\n"
        "nodes: {pruned: A, kept: A}\n"
        "outputs:\n"
        "  pruned: {path: pruned.safetensors, prune_ema: true}\n"
        "  kept: kept.safetensors\n"
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    with safe_open(tmp_path / "pruned.safetensors", "np") as handle:
        assert "model_ema.decay" not in set(handle.keys())
    with safe_open(tmp_path / "kept.safetensors", "np") as handle:
        assert handle.get_tensor("model_ema.decay") == np.float32(0.9999)
