"""Quantized checkpoints whose stored values need their scales are refused
before any tensor is read, never merged as if the values were weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_in_process, write_recipe
from sdrecipe.synthetic import ModelSpec, model_layout, tensor_value, write_model

SHRINK = 64


def _flux_fp8(path, extra: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """A small Flux.1 file in fp8, with the extra tensors a quantizing tool adds."""
    spec = ModelSpec(family="flux1", shrink=SHRINK, seed=1, dtype=torch.float32)
    tensors = {
        key: tensor_value(spec, key, info).to(torch.float8_e4m3fn)
        for key, info in model_layout(spec).items()
    }
    save_file({**tensors, **extra}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("extra", "metadata", "said"),
    [
        (
            {
                "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                "double_blocks.0.img_attn.qkv.scale_weight": torch.tensor(0.02),
            },
            None,
            "ComfyUI scaled fp8 weights (double_blocks.0.img_attn.qkv.scale_weight)",
        ),
        (
            {"double_blocks.0.img_attn.qkv.weight_scale": torch.tensor(0.02)},
            None,
            "ComfyUI fp8 with per-layer scales weights",
        ),
        (
            {"single_blocks.0.linear1.weight.absmax": torch.ones(4)},
            None,
            "bitsandbytes 4-bit weights",
        ),
        ({}, {"_quantization_metadata": "{}"}, "ComfyUI quantized layers weights"),
    ],
)
def test_a_quantized_input_is_refused_by_name(tmp_path, extra, metadata, said):
    quantized = _flux_fp8(tmp_path / "q.safetensors", extra, metadata)
    recipe = _blend_recipe(tmp_path, quantized)
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert f"{recipe}:1: input 'Q'" in result.stderr
    assert said in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_plain_fp8_input_merges(tmp_path):
    recipe = _blend_recipe(tmp_path, _flux_fp8(tmp_path / "fp8.safetensors", {}))
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr


def _blend_recipe(folder, first):
    """A recipe blending `first` (input Q) with a Flux.1 file into a bf16 out.safetensors."""
    other = write_model(folder / "b.safetensors", ModelSpec(family="flux1", shrink=SHRINK))
    return write_recipe(
        folder,
        f"""
        inputs: {{Q: {first}, B: {other}}}
        nodes:
          blend: {{method: weighted_sum, models: [Q, B], alpha: 0.5}}
        outputs:
          blend: {{path: out.safetensors, dtype: bfloat16}}
        """,
    )
