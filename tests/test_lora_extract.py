"""`format: lora` outputs: a LoRA extracted from a difference, checked against
numpy's SVD (the best approximation of each rank) and by baking it back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from sdrecipe.arch.block_presets import LBW_BLOCKS
from sdrecipe.arch.blocks import block_of
from tests.conftest import run_in_process, write_recipe
from tests.test_adapters import expected_bake

RANK = 4


def difference_recipe(tmp_path: Path, models: dict[str, Path], output: str, name: str) -> Path:
    """A recipe writing `diff: B - C` (fine-tune minus base) as `output`."""
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{B: {models["finetune"]}, C: {models["base"]}}}
        nodes: {{diff: B - C}}
        outputs:
          diff: {output}
        """,
        name=name,
    )


def extract(tmp_path: Path, models: dict[str, Path], options: str, name: str = "lora") -> Path:
    """Extract `finetune - base` with the given output options; return the file."""
    output = f"{{path: {name}.safetensors, format: lora, {options}}}"
    recipe = difference_recipe(tmp_path, models, output, f"{name}.yaml")
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    return tmp_path / f"{name}.safetensors"


def test_each_layer_is_the_best_approximation_of_its_rank(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Without clamping, up @ down is the truncated SVD: its error is numpy's optimum."""
    lora = extract(
        tmp_path, models, f"rank: {RANK}, conv_rank: 2, clamp_quantile: 1.0, dtype: fp32"
    )
    factors = load_file(lora)
    baked = expected_bake("sd1", arrays["base"], factors, 1.0)
    checked = 0
    for key, value in baked.items():
        difference = arrays["finetune"][key].astype(np.float64) - arrays["base"][key]
        if np.array_equal(value, arrays["base"][key].astype(np.float64)):
            continue
        is_conv3 = difference.ndim == 4 and difference.shape[2:] != (1, 1)
        rank = 2 if is_conv3 else RANK
        rows = 3 if "in_proj" in key else 1
        best = 0.0
        for part in np.split(difference.reshape(difference.shape[0], -1), rows):
            values = np.linalg.svd(part, compute_uv=False)
            best += float(np.sum(values[min(rank, len(values)) :] ** 2))
        error = float(np.sum((value - arrays["base"][key] - difference) ** 2))
        assert error == pytest.approx(best, rel=1e-3, abs=1e-9), key
        checked += 1
    assert checked == 350  # kohya's attention layers and, with conv_rank, the resnets


def test_round_trip_error_per_block(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Extract rank 4 from B - C, bake it into C: close to B, block by block."""
    lora = extract(tmp_path, models, f"rank: {RANK}")
    baked = expected_bake("sd1", arrays["base"], load_file(lora), 1.0)
    errors: dict[str, list[float]] = {}
    for key, value in baked.items():
        target = arrays["finetune"][key].astype(np.float64)
        if np.array_equal(value, arrays["base"][key].astype(np.float64)):
            continue
        change = np.linalg.norm(target - arrays["base"][key])
        residual = np.linalg.norm(target - value) / change
        errors.setdefault(block_of("sd1", key) or "?", []).append(residual)
    report = {block: round(float(np.mean(found)), 3) for block, found in sorted(errors.items())}
    print("relative error of the rank-4 LoRA per block:", report)
    # Random full-rank differences keep little in 4 directions; a LoRA of the
    # difference is still nearer B than C is.
    assert all(0 < value < 1 for value in report.values())
    assert set(report) == set(LBW_BLOCKS[17])  # kohya's layers: the 17 LBW blocks


def test_file_is_kohya_shaped_and_reproducible(models: dict[str, Path], tmp_path: Path) -> None:
    first = extract(tmp_path, models, "rank: 8, conv_rank: 4")
    built = first.read_bytes()
    again = run_in_process("build", "--force", "--no-cache", str(tmp_path / "lora.yaml"))
    assert again.returncode == 0 and first.read_bytes() == built
    with safe_open(first, "np") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
        up = handle.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")
        conv = handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        alpha = handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert up.dtype == np.float16 and up.shape == (10, 8, 1, 1)  # SD1's proj_in is a 1x1 conv
    assert conv.shape == (4, 10, 3, 3) and float(alpha) == 4.0
    assert any(key.startswith("lora_te_text_model_encoder_layers_11_mlp_fc2") for key in keys)
    assert all(
        re.match(r"^lora_(unet|te)_\w+\.(lora_up\.weight|lora_down\.weight|alpha)$", k)
        for k in keys
    )


def test_unchanged_text_encoder_is_left_out_on_auto(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Text-encoder differences all within 0.01: `auto` drops them, as kohya does."""
    te = [k for k in arrays["base"] if k.startswith("cond_stage_model") and "weight" in k]
    largest = max(np.abs(arrays["finetune"][k] - arrays["base"][k]).max() for k in te)
    assert 0.01 < largest < 0.1
    for name, option in (("auto", ""), ("forced", ", text_encoder: true")):
        recipe = write_recipe(
            tmp_path,
            f"""
            inputs: {{B: {models["finetune"]}, C: {models["base"]}}}
            nodes:
              diff: 0.1 * (B - C)
            outputs:
              diff: {{path: {name}.safetensors, format: lora, rank: 2{option}}}
            """,
            name=f"{name}.yaml",
        )
        assert run_in_process("build", str(recipe)).returncode == 0, name
    auto = load_file(tmp_path / "auto.safetensors")
    forced = load_file(tmp_path / "forced.safetensors")
    assert not any(key.startswith("lora_te") for key in auto)
    assert any(key.startswith("lora_te") for key in forced)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{path: x.safetensors, rank: 8}", "apply to `format: lora` outputs only"),
        ("{path: x.safetensors, format: lora, space: model}", "a LoRA holds a difference"),
        ("{path: x.safetensors, format: lora, rank: 0}", "rank"),
    ],
)
def test_bad_lora_options_are_refused(
    models: dict[str, Path], tmp_path: Path, output: str, message: str
) -> None:
    recipe = difference_recipe(tmp_path, models, output, "recipe.yaml")
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2 and message in result.stderr and "recipe.yaml:4" in result.stderr


def test_a_model_node_cannot_be_a_lora(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{B: {models["finetune"]}, C: {models["base"]}}}
        nodes: {{merged: 'weighted_sum(B, C)'}}
        outputs:
          merged: {{path: x.safetensors, format: lora}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2 and "node 'merged' is a model" in result.stderr


def test_randomised_svd_of_large_layers_is_near_optimal_and_seeded() -> None:
    """Large layers go through the seeded randomised SVD: its rank-32 residual is
    numpy's optimum to 1e-4, and the same seed gives the same bits."""
    import torch

    from sdrecipe.adapters.extract import RANDOMISED_SVD_ELEMENTS, extract

    generator = np.random.default_rng(0)
    rows, columns = 1024, 768
    assert rows * columns >= RANDOMISED_SVD_ELEMENTS
    spectrum = np.logspace(0, -3, 256)
    matrix = (generator.standard_normal((rows, 256)) * spectrum) @ generator.standard_normal(
        (256, columns)
    ) + 1e-4 * generator.standard_normal((rows, columns))
    delta = torch.from_numpy(matrix.astype(np.float32))
    up, down = extract(delta, 32, 1.0, seed=7)
    again = extract(delta, 32, 1.0, seed=7)
    assert torch.equal(up, again[0]) and torch.equal(down, again[1])
    values = np.linalg.svd(matrix.astype(np.float32).astype(np.float64), compute_uv=False)
    best = np.sqrt(np.sum(values[32:] ** 2))
    residual = np.linalg.norm(matrix - (up @ down).double().numpy())
    assert residual == pytest.approx(best, rel=1e-4)


def test_peft_names_bake_to_what_kohya_names_bake(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """`naming: peft` writes diffusers' names (`unet.`, `text_encoder.`, lora_A and
    lora_B, its config in the metadata) for the same factors as kohya's."""
    options = f"rank: {RANK}, conv_rank: 2, dtype: fp32, text_encoder: true"
    kohya = extract(tmp_path, models, options, "kohya")
    peft = extract(tmp_path, models, options + ", naming: peft", "peft")
    with safe_open(peft, "np") as handle:
        keys = set(handle.keys())
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.11.mlp.fc2.lora_B.weight" in keys
    assert config["unet.lora_alpha"] == config["unet.r"] == RANK
    assert "^down_blocks.0.resnets.0.conv1" in config["unet.rank_pattern"]  # conv_rank 2
    assert "encoder.layers.11.mlp.fc2" in config["text_encoder.target_modules"]
    baked = {}
    for name, lora in (("kohya", kohya), ("peft", peft)):
        recipe = write_recipe(
            tmp_path,
            f"""
            inputs: {{C: {models["base"]}, L: {lora}}}
            nodes: {{baked: C + L}}
            outputs: {{baked: {{path: {name}-baked.safetensors, dtype: fp32}}}}
            """,
            name=f"{name}-bake.yaml",
        )
        assert run_in_process("build", str(recipe)).returncode == 0, name
        baked[name] = load_file(tmp_path / f"{name}-baked.safetensors")
    changed = 0
    for key, value in baked["kohya"].items():
        np.testing.assert_allclose(baked["peft"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        changed += not np.array_equal(value, arrays["base"][key].astype(np.float32))
    assert changed == 350  # the UNet's layers and the text encoder's, as kohya's file
