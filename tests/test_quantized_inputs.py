"""Quantized inputs are dequantized tensor by tensor and merged as the weights
they stand for: ComfyUI's scaled fp8 (legacy and per-layer forms), plain fp8,
bitsandbytes NF4/FP4 and GGUF. References: a numpy fp8 decoder and NF4 table
written here, bitsandbytes' `dequantize_4bit` and gguf's `dequantize`."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_in_process, write_recipe
from sdrecipe.io.readers import open_model
from sdrecipe.synthetic import ModelSpec, model_layout, tensor_value, write_model

SHRINK = 64
# The NF4 code book (Dettmers et al., QLoRA, appendix E), as bitsandbytes stores it.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def fp8_decode(codes: np.ndarray, exponent_bits: int) -> np.ndarray:
    """float32 values of fp8 bytes: e4m3fn (4 exponent bits) or e5m2 (5)."""
    mantissa_bits = 7 - exponent_bits
    bias = (1 << (exponent_bits - 1)) - 1
    codes = codes.astype(np.int64)
    exponent = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = (codes & ((1 << mantissa_bits) - 1)) / (1 << mantissa_bits)
    value = np.where(
        exponent == 0,
        mantissa * 2.0 ** (1 - bias),
        (1 + mantissa) * 2.0 ** (exponent - bias),
    )
    return np.where(codes >> 7, -value, value).astype(np.float32)


def fp8_values(tensor: torch.Tensor) -> np.ndarray:
    bits = 4 if tensor.dtype == torch.float8_e4m3fn else 5
    return fp8_decode(tensor.view(torch.uint8).numpy(), bits)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A small Flux.1 model's float32 values, and a second model B on disk."""
    folder = tmp_path_factory.mktemp("flux")
    spec = ModelSpec(family="flux1", shrink=SHRINK, seed=1, dtype=torch.float32)
    values = {key: tensor_value(spec, key, info) for key, info in model_layout(spec).items()}
    b = write_model(folder / "b.safetensors", ModelSpec(family="flux1", shrink=SHRINK, seed=2))
    return values, b, load_file(str(b))


def build_blend(folder, quantized, b, output="{path: out.safetensors}"):
    """Build weighted_sum(Q, B, alpha=0.5) into `output`: the recipe and the result."""
    recipe = write_recipe(
        folder,
        f"""
        inputs: {{Q: {quantized}, B: {b}}}
        nodes:
          blend: {{method: weighted_sum, models: [Q, B], alpha: 0.5}}
        outputs:
          blend: {output}
        """,
    )
    return recipe, run_in_process("build", str(recipe))


def blend(folder, quantized, b):
    """weighted_sum(Q, B, alpha=0.5) in float32: the output's tensors, and the recipe."""
    recipe, result = build_blend(folder, quantized, b, "{path: out.safetensors, dtype: float32}")
    assert result.returncode == 0, result.stderr
    return load_file(str(folder / "out.safetensors")), recipe


def expected(values: dict[str, np.ndarray], b: dict[str, torch.Tensor], alpha=0.5):
    return {
        key: (1 - alpha) * value + alpha * b[key].float().numpy() for key, value in values.items()
    }


def assert_merged(found, wanted):
    assert found.keys() == wanted.keys()
    for key, value in wanted.items():
        np.testing.assert_allclose(found[key].numpy(), value, rtol=1e-6, atol=1e-7, err_msg=key)


def scaled_fp8(values, fp8=torch.float8_e4m3fn, newer=False, per_row=False):
    """ComfyUI's scaled fp8 of `values` (matrices; the rest in bf16), and the
    float32 values the file stands for (decoded with numpy)."""
    tensors: dict[str, torch.Tensor] = {}
    meant = {}
    for key, value in values.items():
        if value.dim() == 2 and key.endswith(".weight"):
            stem = key.removesuffix(".weight")
            largest = value.abs().amax(dim=1, keepdim=True) if per_row else value.abs().max()
            scale = (largest / 448).float()
            tensors[key] = (value / scale).to(fp8)
            if newer:
                tensors[f"{stem}.weight_scale"] = scale
                tensors[f"{stem}.input_scale"] = torch.tensor(1.0)
                fmt = json.dumps({"format": str(fp8).removeprefix("torch.")}).encode()
                tensors[f"{stem}.comfy_quant"] = torch.tensor(list(fmt), dtype=torch.uint8)
            else:
                tensors[f"{stem}.scale_weight"] = scale.reshape(()) if not per_row else scale
                tensors[f"{stem}.scale_input"] = torch.tensor(1.0)
            meant[key] = fp8_values(tensors[key]) * scale.numpy()
        else:
            tensors[key] = value.to(torch.bfloat16)
            meant[key] = tensors[key].float().numpy()
    if not newer:
        tensors["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return tensors, meant


@pytest.mark.parametrize(
    ("fp8", "newer", "per_row"),
    [
        (torch.float8_e4m3fn, False, False),
        (torch.float8_e5m2, False, False),
        (torch.float8_e4m3fn, True, False),
        (torch.float8_e4m3fn, False, True),
    ],
)
def test_scaled_fp8_weights_merge_as_weight_times_scale(tmp_path, flux, fp8, newer, per_row):
    """The defect: the raw fp8 values were merged and the scales passed through."""
    values, b_path, b = flux
    tensors, meant = scaled_fp8(values, fp8, newer, per_row)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    merged, recipe = blend(tmp_path, tmp_path / "q.safetensors", b_path)
    assert_merged(merged, expected(meant, b))
    consumed = ("scale_weight", "scale_input", "weight_scale", "input_scale", "comfy_quant")
    assert not [key for key in merged if key.endswith((*consumed, "scaled_fp8"))]
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert "scaled fp8" in lock["inputs"]["Q"]["quantization"]
    assert "quantization" not in lock["inputs"]["B"]


def test_the_newer_header_table_names_the_fp8_layers(tmp_path, flux):
    values, b_path, b = flux
    tensors, meant = scaled_fp8(values, newer=True)
    layers = {}
    for key in list(tensors):
        if key.endswith(".comfy_quant"):
            del tensors[key]
            layers[key.removesuffix(".comfy_quant")] = {"format": "float8_e4m3fn"}
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(tensors, str(tmp_path / "q.safetensors"), metadata=metadata)
    merged, _ = blend(tmp_path, tmp_path / "q.safetensors", b_path)
    assert_merged(merged, expected(meant, b))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_fp8_inputs_merge_as_their_values(tmp_path, flux, fp8):
    values, b_path, b = flux
    tensors = {key: value.to(fp8) for key, value in values.items()}
    save_file(tensors, str(tmp_path / "q.safetensors"))
    merged, recipe = blend(tmp_path, tmp_path / "q.safetensors", b_path)
    assert_merged(merged, expected({k: fp8_values(t) for k, t in tensors.items()}, b))
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert lock["inputs"]["Q"]["quantization"].startswith("fp8 (float8_")


def nf4_by_hand(value: torch.Tensor, blocksize: int = 64) -> tuple[dict, np.ndarray]:
    """A bitsandbytes NF4 weight made with numpy: nearest code per value,
    one absmax per block, two codes a byte (the first high); and its values."""
    flat = value.float().numpy().reshape(-1)
    pad = -len(flat) % blocksize
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    normed = blocks / np.where(absmax == 0, 1, absmax)[:, None]
    codes = np.abs(normed[..., None] - NF4).argmin(axis=-1).reshape(-1)[: len(flat)]
    padded = np.concatenate([codes, np.zeros(len(codes) % 2, np.int64)])
    packed = (padded[0::2] << 4 | padded[1::2]).astype(np.uint8)
    state = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": "bfloat16",
        "shape": list(value.shape),
    }
    tensors = {
        "": torch.from_numpy(packed).reshape(-1, 1),
        ".absmax": torch.from_numpy(absmax.astype(np.float32)),
        ".quant_map": torch.from_numpy(NF4.copy()),
        ".quant_state.bitsandbytes__nf4": torch.tensor(
            list(json.dumps(state).encode()), dtype=torch.uint8
        ),
    }
    meant = NF4[codes] * np.repeat(absmax, blocksize)[: len(flat)]
    return tensors, meant.reshape(value.shape).astype(np.float32)


def test_nf4_weights_merge_as_the_code_book_times_absmax(tmp_path, flux):
    values, b_path, b = flux
    tensors, meant = {}, {}
    for key, value in values.items():
        if value.dim() == 2 and key.endswith(".weight"):
            parts, meant[key] = nf4_by_hand(value)
            tensors.update({key + suffix: part for suffix, part in parts.items()})
        else:
            tensors[key] = value.to(torch.bfloat16)
            meant[key] = tensors[key].float().numpy()
    save_file(tensors, str(tmp_path / "q.safetensors"))
    merged, recipe = blend(tmp_path, tmp_path / "q.safetensors", b_path)
    assert_merged(merged, expected(meant, b))
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert lock["inputs"]["Q"]["quantization"].startswith("bitsandbytes nf4 in 314 of 780")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_4bit_weights_equal_bitsandbytes_dequantize(tmp_path, quant_type, nested):
    functional = pytest.importorskip("bitsandbytes.functional")
    tensors, oracle = {}, {}
    generator = torch.Generator().manual_seed(3)
    for index, shape in enumerate([(64, 128), (30, 50), (300, 64)]):
        weight = torch.randn(shape, generator=generator).to(torch.bfloat16)
        packed, state = functional.quantize_4bit(
            weight, quant_type=quant_type, blocksize=64, compress_statistics=nested
        )
        key = f"layer{index}.weight"
        tensors[key] = packed
        tensors.update({f"{key}.{n}": t for n, t in state.as_dict(packed=True).items()})
        oracle[key] = functional.dequantize_4bit(packed, state)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    reader = open_model(tmp_path / "q.safetensors")
    assert sorted(reader.keys()) == sorted(oracle)
    for key, value in oracle.items():
        ours = reader.tensor(key)
        assert ours.dtype == torch.float32 and ours.shape == value.shape
        # bitsandbytes on the CPU gives bf16; ours is float32 rounded once more.
        assert torch.equal(ours.to(torch.bfloat16), value)


GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"]


def write_gguf(path, values, matrix_type, architecture="flux", reshape=()):
    """A GGUF as city96's tools write one, made with the gguf package: matrices
    in `matrix_type`, the rest F32; tensors in `reshape` stored as rows of 256
    with their shape in `comfy.gguf.orig_shape.*`. Returns what gguf dequantizes."""
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    meant = {}
    for key, value in values.items():
        array = value.float().numpy()
        kind = gguf.GGMLQuantizationType.F32
        if value.dim() == 2 and value.shape[-1] % 32 == 0 and value.numel() > 1024:
            kind = gguf.GGMLQuantizationType[matrix_type]
        if key in reshape:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(value.shape))
            array = array.reshape(-1, 256)
        data = gguf.quants.quantize(array, kind)
        writer.add_tensor(key, data, raw_dtype=kind)
        meant[key] = gguf.quants.dequantize(data, kind).reshape(value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return meant


@pytest.mark.parametrize("matrix_type", GGUF_TYPES)
def test_gguf_tensors_merge_as_gguf_dequantizes_them(tmp_path, flux, matrix_type):
    values, b_path, b = flux
    reshaped = "double_blocks.0.img_attn.qkv.weight"
    meant = write_gguf(tmp_path / "q.gguf", values, matrix_type, reshape=(reshaped,))
    merged, recipe = blend(tmp_path, tmp_path / "q.gguf", b_path)
    assert_merged(merged, expected(meant, b))
    assert merged[reshaped].shape == values[reshaped].shape
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert (lock["inputs"]["Q"].get("quantization") is None) == (
        matrix_type in ("F32", "F16", "BF16")
    )


@pytest.mark.parametrize("k_type", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_k_quants_read_as_gguf_dequantizes_them(tmp_path, k_type):
    kind = gguf.GGMLQuantizationType[k_type]
    elements, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, size=(8, size), dtype=np.uint8)
    # The block's fp16 super-scales (d, and dmin where there is one) come last,
    # or first for Q4_K/Q5_K: set them to small finite values.
    halves = {"Q2_K": [size - 4, size - 2], "Q3_K": [size - 2], "Q6_K": [size - 2]}
    for offset in halves.get(k_type, [0, 2]):
        blocks[:, offset : offset + 2] = (
            rng.uniform(0.001, 0.01, 8).astype(np.float16).view(np.uint8).reshape(8, 2)
        )
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="flux")
    writer.add_tensor("w", blocks.reshape(4, 2 * size), raw_dtype=kind)  # a byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_model(tmp_path / "k.gguf")
    oracle = gguf.quants.dequantize(blocks, kind).reshape(4, 2 * elements)
    assert np.array_equal(reader.tensor("w").numpy(), oracle)
    assert reader.quantization() == f"GGUF {k_type} 1 of 1 tensors"


def test_a_bare_sdxl_gguf_is_read_as_the_checkpoint_unet(tmp_path):
    spec = ModelSpec(family="sdxl", shrink=SHRINK, seed=1, dtype=torch.float32)
    prefix = "model.diffusion_model."
    unet = {
        key.removeprefix(prefix): tensor_value(spec, key, info)
        for key, info in model_layout(spec).items()
        if key.startswith(prefix)
    }
    write_gguf(tmp_path / "u.gguf", unet, "Q8_0", architecture="sdxl")
    report = json.loads(run_in_process("inspect", "--json", str(tmp_path / "u.gguf")).stdout)
    assert report["family"] == "sdxl"
    assert set(report["components"]) == {"unet"}
    # Shrunken widths leave no row of whole Q8_0 blocks: everything is F32 here.
    assert set(report["storage"]["unet"]) == {"F32"}


def test_inspect_reports_the_stored_types(tmp_path, flux):
    values, _, _ = flux
    tensors, _ = scaled_fp8(values)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    result = run_in_process("inspect", "--json", str(tmp_path / "q.safetensors"))
    report = json.loads(result.stdout)
    assert report["storage"]["transformer"]["F8_E4M3 scaled"]["keys"] == 314
    assert report["storage"]["transformer"]["BF16"]["keys"] == 466
    assert report["quantization"] == "ComfyUI scaled fp8 (F8_E4M3) in 314 of 780 tensors"
    assert 0.9 < report["quantized_share"] < 1
    text = run_in_process("inspect", str(tmp_path / "q.safetensors")).stdout
    assert "quantized: ComfyUI scaled fp8 (F8_E4M3) in 314 of 780 tensors" in text


# --- errors: one paragraph naming the file and tensor, exit 2, nothing written ---


def refused(tmp_path, flux, quantized) -> str:
    recipe, result = build_blend(tmp_path, quantized, flux[1])
    assert result.returncode == 2, result.stderr
    assert f"{recipe}:1: input 'Q': {quantized}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
    return result.stderr


def test_a_scaled_fp8_file_missing_a_scale_is_refused(tmp_path, flux):
    values, _, _ = flux
    tensors, _ = scaled_fp8(values)
    del tensors["double_blocks.1.img_mlp.0.scale_weight"]
    save_file(tensors, str(tmp_path / "q.safetensors"))
    said = refused(tmp_path, flux, tmp_path / "q.safetensors")
    assert "'double_blocks.1.img_mlp.0.weight' is fp8 in a scaled-fp8 file" in said


def test_an_unknown_comfy_quant_format_is_refused(tmp_path, flux):
    values, _, _ = flux
    tensors, _ = scaled_fp8(values, newer=True)
    layer = "double_blocks.0.img_attn.qkv"
    fmt = json.dumps({"format": "nvfp4"}).encode()
    tensors[f"{layer}.comfy_quant"] = torch.tensor(list(fmt), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    said = refused(tmp_path, flux, tmp_path / "q.safetensors")
    assert f"layer '{layer}' is quantized as 'nvfp4'" in said


def test_a_4bit_weight_missing_its_absmax_is_refused(tmp_path, flux):
    values, _, _ = flux
    key = "double_blocks.0.img_attn.qkv.weight"
    parts, _ = nf4_by_hand(values[key])
    tensors = {k: v.to(torch.bfloat16) for k, v in values.items() if k != key}
    tensors.update({key + s: p for s, p in parts.items() if s != ".absmax"})
    save_file(tensors, str(tmp_path / "q.safetensors"))
    said = refused(tmp_path, flux, tmp_path / "q.safetensors")
    assert f"bitsandbytes 4-bit weight '{key}': '{key}.absmax' is missing" in said


def test_a_truncated_gguf_is_refused(tmp_path, flux):
    values, _, _ = flux
    write_gguf(tmp_path / "q.gguf", values, "Q8_0")
    data = (tmp_path / "q.gguf").read_bytes()
    (tmp_path / "q.gguf").write_bytes(data[: len(data) // 2])
    said = refused(tmp_path, flux, tmp_path / "q.gguf")
    assert "lies past the end of the file: the file is truncated" in said
    (tmp_path / "q.gguf").write_bytes(data[:200])
    assert "truncated inside its header" in refused(tmp_path, flux, tmp_path / "q.gguf")
    (tmp_path / "q.gguf").write_bytes(b"GGUX" + data[4:])
    assert "not a GGUF file" in refused(tmp_path, flux, tmp_path / "q.gguf")


def test_a_gguf_type_sdrecipe_cannot_read_is_refused_by_tensor(tmp_path, flux):
    kind = gguf.GGMLQuantizationType.IQ2_XXS
    _, size = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), arch="flux")
    blocks = np.zeros((2, size), dtype=np.uint8)
    writer.add_tensor("img_in.weight", blocks.reshape(1, 2 * size), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    said = refused(tmp_path, flux, tmp_path / "q.gguf")
    assert "tensor 'img_in.weight' is stored as GGML IQ2_XXS" in said


def test_a_mislabelled_gguf_is_refused(tmp_path, flux):
    values, _, _ = flux
    write_gguf(tmp_path / "q.gguf", values, "Q8_0", architecture="sdxl")
    said = refused(tmp_path, flux, tmp_path / "q.gguf")
    assert "general.architecture is 'sdxl', and its tensors are a flux1 model's" in said


def test_an_output_without_dtype_over_a_quantized_base_is_pointed_out(tmp_path, flux):
    values, b_path, _ = flux
    write_gguf(tmp_path / "q.gguf", values, "Q8_0")
    _, result = build_blend(tmp_path, tmp_path / "q.gguf", b_path)
    assert result.returncode == 0, result.stderr
    assert "output 'blend' has no `dtype`, and 42 tensor(s) of its base Q are" in result.stderr
    assert {t.dtype for t in load_file(str(tmp_path / "out.safetensors")).values()} == {
        torch.float32
    }


def test_a_gguf_header_that_reads_on_without_end_is_refused(tmp_path, flux, monkeypatch):
    """A damaged count keeps gguf's parser reading item by item: it stops at a cap."""
    monkeypatch.setattr("sdrecipe.io.gguf_reader.MAX_HEADER_READS", 1000)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), arch="flux")
    writer.add_array("padding", list(range(2000)))
    writer.add_tensor("img_in.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "the header holds more than 1,000 values" in refused(tmp_path, flux, tmp_path / "q.gguf")


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("target", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fp8_widens_by_table_exactly(fp8, target):
    from sdrecipe.io.dtypes import widened

    codes = torch.arange(256, dtype=torch.uint8).view(fp8)
    found, wanted = widened(codes, target), codes.to(target)
    assert found.dtype == target
    assert torch.equal(found.isnan(), wanted.isnan())
    assert torch.equal(found[~wanted.isnan()], wanted[~wanted.isnan()])
    rows = torch.randn(64, 32).to(fp8)[10:20]  # a row range of a larger tensor
    assert torch.equal(widened(rows, target), rows.to(target))
    decoded = fp8_decode(codes.view(torch.uint8).numpy(), 4 if fp8 == torch.float8_e4m3fn else 5)
    finite = ~wanted.isnan() & ~wanted.isinf()
    assert np.array_equal(widened(codes, torch.float32)[finite].numpy(), decoded[finite.numpy()])
