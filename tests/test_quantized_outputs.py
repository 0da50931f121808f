"""Quantized outputs: fp8 (plain and ComfyUI's scaled form) and GGUF files
that ComfyUI-GGUF loads. References: numpy rounding to the nearest fp8 value
written here, and gguf's own `quantize`/`dequantize` and reader."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_quantized_inputs import fp8_decode, write_gguf

from conftest import run_in_process, write_recipe
from sdrecipe.io.readers import open_model
from sdrecipe.io.safetensors_reader import file_digest
from sdrecipe.synthetic import ModelSpec, model_layout, tensor_value, write_model

SHRINK = 64
FP8_BITS = {torch.float8_e4m3fn: 4, torch.float8_e5m2: 5}
# ComfyUI-GGUF's loader: the architectures it loads, the prefix it strips.
COMFY_IMG_ARCH = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid"}


def nearest_fp8(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """`values` rounded to the nearest fp8 value, ties to the even code."""
    bits = FP8_BITS[dtype]
    finite = 0x7F if bits == 4 else 0x7C  # e4m3fn's 0x7f is NaN; e5m2's 0x7c is inf
    table = fp8_decode(np.arange(finite, dtype=np.uint8), bits).astype(np.float64)
    magnitude = np.abs(values.astype(np.float64)).reshape(-1)
    above = np.clip(np.searchsorted(table, magnitude), 1, len(table) - 1)
    below = above - 1
    down, up = magnitude - table[below], table[above] - magnitude
    pick = np.where((down < up) | ((down == up) & (below % 2 == 0)), below, above)
    return (np.sign(values.reshape(-1)) * table[pick]).reshape(values.shape).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two small all-in-one Flux.1 checkpoints (transformer, CLIP-L, T5, VAE)."""
    folder = tmp_path_factory.mktemp("aio")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        spec = ModelSpec(family="flux1", layout="flux1-dev-aio", shrink=SHRINK, seed=seed)
        paths[name] = write_model(folder / f"{name}.safetensors", spec)
    return paths


def merged_values(pair, alpha=0.5):
    a, b = load_file(str(pair["a"])), load_file(str(pair["b"]))
    return {k: (1 - alpha) * a[k].float().numpy() + alpha * b[k].float().numpy() for k in a}


def build(folder, pair, output: str, node="weighted_sum(A, B, alpha=0.5)", inputs=None):
    inputs = inputs or f"{{A: {pair['a']}, B: {pair['b']}}}"
    recipe = write_recipe(
        folder,
        f"""
        inputs: {inputs}
        nodes:
          merged: "{node}"
        outputs:
          merged: {output}
        """,
    )
    return recipe, run_in_process("build", str(recipe))


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_an_fp8_output_rounds_matrices_to_the_nearest_fp8_value(tmp_path, pair, dtype):
    _, result = build(tmp_path, pair, f"{{path: out.safetensors, dtype: {dtype}}}")
    assert result.returncode == 0, result.stderr
    wanted = merged_values(pair)
    target = getattr(torch, dtype.replace("fp8", "float8"))
    found = load_file(str(tmp_path / "out.safetensors"))
    for key, value in found.items():
        if key.startswith("vae.") or value.dim() < 2:
            assert value.dtype == torch.bfloat16, key
            continue
        assert value.dtype == target, key
        decoded = fp8_decode(value.view(torch.uint8).numpy(), FP8_BITS[target])
        assert np.array_equal(decoded, nearest_fp8(wanted[key], target)), key


def test_an_fp8_output_refuses_values_past_the_format(tmp_path, pair):
    recipe, result = build(
        tmp_path, pair, "{path: out.safetensors, dtype: fp8_e4m3fn}", node="A + 20000 * (B - A)"
    )
    assert result.returncode == 1
    assert "past float8_e4m3fn's largest (448), which fp8 would clip" in result.stderr
    assert "`scaled: true`" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
    assert not recipe.with_suffix(".lock").exists()


def test_a_scaled_fp8_output_is_comfyuis_form(tmp_path, pair):
    """Each transformer matrix over its scale, the scale beside it, the marker
    under the model prefix; read back, every value is within fp8's rounding."""
    _, result = build(
        tmp_path,
        pair,
        "{path: out.safetensors, dtype: fp8, scaled: true}",
        node="A + 20000 * (B - A)",  # values fp8 could not hold without a scale
    )
    assert result.returncode == 0, result.stderr
    a, b = load_file(str(pair["a"])), load_file(str(pair["b"]))
    wanted = {
        k: a[k].float().numpy() + 20000 * (b[k].float().numpy() - a[k].float().numpy()) for k in a
    }
    found = load_file(str(tmp_path / "out.safetensors"))
    marker = found.pop("model.diffusion_model.scaled_fp8")
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 0
    scales = {k: v for k, v in found.items() if k.endswith(".scale_weight")}
    assert len(scales) == 314
    for key, scale in scales.items():
        weight = key.replace(".scale_weight", ".weight")
        assert key.startswith("model.diffusion_model.") and scale.dtype == torch.float32
        assert scale.shape == ()
        largest = np.abs(wanted[weight]).max()
        assert scale.item() == pytest.approx(largest / 448, rel=1e-6)
        stored = found[weight]
        assert stored.dtype == torch.float8_e4m3fn
        decoded = fp8_decode(stored.view(torch.uint8).numpy(), 4)
        quotient = (wanted[weight] / scale.numpy()).astype(np.float32)
        assert np.array_equal(decoded, nearest_fp8(np.clip(quotient, -448, 448), stored.dtype))
    others = [k for k, v in found.items() if k not in scales and v.dtype != torch.bfloat16]
    assert [k for k in others if not k.startswith("model.diffusion_model.")] == []
    reader = open_model(tmp_path / "out.safetensors")
    for key in scales:
        weight = key.replace(".scale_weight", ".weight")
        back = reader.tensor(weight).numpy()
        error = np.abs(back - wanted[weight])
        scale = found[key].item()
        assert (error <= np.maximum(np.abs(wanted[weight]) * 2**-4, scale * 2**-9)).all(), key


def test_fp8_inputs_round_trip_into_fp8(tmp_path, pair):
    a, b = load_file(str(pair["a"])), load_file(str(pair["b"]))
    inputs = {}
    for name, tensors in (("a", a), ("b", b)):
        fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v for k, v in tensors.items()}
        save_file(fp8, str(tmp_path / f"{name}8.safetensors"))
        inputs[name] = fp8
    _, result = build(
        tmp_path,
        pair,
        "{path: out.safetensors, dtype: fp8_e4m3fn}",
        inputs=f"{{A: {tmp_path / 'a8.safetensors'}, B: {tmp_path / 'b8.safetensors'}}}",
    )
    assert result.returncode == 0, result.stderr
    found = load_file(str(tmp_path / "out.safetensors"))

    def value(tensor):
        if tensor.dtype == torch.float8_e4m3fn:
            return fp8_decode(tensor.view(torch.uint8).numpy(), 4)
        return tensor.float().numpy()

    for key, stored in found.items():
        if stored.dtype != torch.float8_e4m3fn:
            continue
        wanted = 0.5 * value(inputs["a"][key]) + 0.5 * value(inputs["b"][key])
        assert np.array_equal(value(stored), nearest_fp8(wanted, torch.float8_e4m3fn)), key


def comfy_gguf_load(path):
    """What ComfyUI-GGUF's loader makes of a file: checked architecture,
    `model.diffusion_model.` stripped, shapes reversed (or as recorded), each
    tensor dequantized by gguf."""
    reader = gguf.GGUFReader(str(path))
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    assert architecture in COMFY_IMG_ARCH
    prefix = "model.diffusion_model."
    state = {}
    for tensor in reader.tensors:
        name = tensor.name.removeprefix(prefix)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        state[name] = (tensor.tensor_type.name, values.reshape(shape))
    return architecture, state


@pytest.mark.parametrize("quant", ["Q8_0", "Q5_1", "Q4_0", "F16", "BF16"])
def test_a_gguf_output_is_what_gguf_makes_of_the_merge(tmp_path, pair, quant):
    _, result = build(tmp_path, pair, f"{{path: out.gguf, format: gguf, quant: {quant}}}")
    assert result.returncode == 0, result.stderr
    assert "a GGUF holds the transformer alone" in result.stderr + result.stdout
    wanted = {
        key.removeprefix("model.diffusion_model."): value
        for key, value in merged_values(pair).items()
        if key.startswith("model.diffusion_model.")
    }
    architecture, state = comfy_gguf_load(tmp_path / "out.gguf")
    assert architecture == "flux"
    assert state.keys() == wanted.keys()
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    assert reader.fields["general.file_type"].parts[-1][0] == int(
        gguf.LlamaFileType[f"MOSTLY_{quant}"]
    )
    provenance = reader.fields["sdrecipe.quantization"].contents()
    assert json.loads(provenance)["output"] == f"GGUF {quant}"
    types = set()
    for tensor in reader.tensors:
        value = wanted[tensor.name].astype(np.float32)
        kind = tensor.tensor_type
        types.add(kind.name)
        if value.ndim < 2 or value.size <= 1024:
            assert kind == gguf.GGMLQuantizationType.F32, tensor.name
        rows = value.reshape(-1, value.shape[-1])
        assert np.array_equal(
            np.asarray(tensor.data).reshape(-1).view(np.uint8),
            gguf.quants.quantize(rows, kind).reshape(-1).view(np.uint8),
        ), tensor.name
        _, loaded = state[tensor.name]
        assert loaded.shape == value.shape
    assert quant in types


def test_a_gguf_input_round_trips_into_gguf(tmp_path, pair):
    a = {
        k.removeprefix("model.diffusion_model."): v
        for k, v in load_file(str(pair["a"])).items()
        if k.startswith("model.diffusion_model.")
    }
    meant = write_gguf(tmp_path / "a.gguf", a, "Q8_0")
    b = write_model(tmp_path / "b.safetensors", ModelSpec(family="flux1", shrink=SHRINK, seed=2))
    b_values = load_file(str(b))
    _, result = build(
        tmp_path,
        pair,
        "{path: out.gguf, format: gguf, quant: Q8_0}",
        inputs=f"{{A: {tmp_path / 'a.gguf'}, B: {b}}}",
    )
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    for tensor in reader.tensors:
        value = 0.5 * meant[tensor.name] + 0.5 * b_values[tensor.name].float().numpy()
        rows = value.astype(np.float32).reshape(-1, value.shape[-1])
        oracle = gguf.quants.quantize(rows, tensor.tensor_type).reshape(-1).view(np.uint8)
        assert np.array_equal(np.asarray(tensor.data).reshape(-1).view(np.uint8), oracle)


def test_the_output_identity_includes_its_quantization(tmp_path, pair):
    recipe, result = build(tmp_path, pair, "{path: out.gguf, format: gguf, quant: Q8_0}")
    assert result.returncode == 0, result.stderr
    first = (tmp_path / "out.gguf").read_bytes()
    # The digest the build took from its tensors is the one read from the file.
    locked = yaml.safe_load(recipe.with_suffix(".lock").read_text())["outputs"]["merged"]
    assert locked["digest"] == file_digest(tmp_path / "out.gguf")
    assert file_digest(tmp_path / "out.gguf") != file_digest(pair["a"])
    again = run_in_process("build", str(recipe))
    assert "up to date" in again.stdout
    recipe.write_text(recipe.read_text().replace("Q8_0", "Q4_0"))
    changed = run_in_process("build", str(recipe))
    assert changed.returncode == 0 and "up to date" not in changed.stdout
    assert (tmp_path / "out.gguf").read_bytes() != first
    recipe.write_text(recipe.read_text().replace("Q4_0", "Q8_0"))
    assert run_in_process("build", str(recipe)).returncode == 0
    assert (tmp_path / "out.gguf").read_bytes() == first


@pytest.mark.parametrize(
    ("output", "said"),
    [
        (
            "{path: out.safetensors, format: lora, dtype: fp8}",
            "an fp8 dtype applies to a safetensors model",
        ),
        (
            "{path: out, format: diffusers, dtype: fp8_e5m2}",
            "an fp8 dtype applies to a safetensors model",
        ),
        ("{path: out.safetensors, scaled: true}", "`scaled: true` applies to an fp8 dtype"),
        ("{path: out.gguf, format: gguf, dtype: bf16}", "types come from `quant`"),
        ("{path: out.gguf, format: gguf, quant: Q3_K}", "Q3_K"),
        ("{path: out.gguf}", "a GGUF output's file ends in .gguf"),
        ("{path: out.safetensors, format: gguf}", "a GGUF output's file ends in .gguf"),
        ("{path: out.safetensors, quant: Q8_0}", "`quant` applies to `format: gguf` outputs only"),
    ],
)
def test_quantized_output_options_are_checked(tmp_path, pair, output, said):
    recipe, result = build(tmp_path, pair, output)
    assert result.returncode == 2
    assert said in result.stderr and str(recipe) in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_a_gguf_of_a_family_comfyui_gguf_cannot_load_is_refused(tmp_path):
    paths = {
        n: write_model(
            tmp_path / f"{n}.safetensors", ModelSpec(family="sd2", shrink=SHRINK, seed=s)
        )
        for n, s in (("a", 1), ("b", 2))
    }
    _, result = build(tmp_path, paths, "{path: out.gguf, format: gguf}")
    assert result.returncode == 2
    assert "ComfyUI-GGUF has no architecture for sd2 models" in result.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_the_embedded_recipe_records_the_quantized_output(tmp_path, pair):
    _, result = build(tmp_path, pair, "{path: out.safetensors, dtype: fp8, scaled: true}")
    assert result.returncode == 0, result.stderr
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert "dtype: fp8_e4m3fn" in metadata["sdrecipe.recipe"]
    assert "scaled: true" in metadata["sdrecipe.recipe"]
    assert json.loads(metadata["sdrecipe.quantization"]) == {
        "inputs": {},
        "output": "fp8_e4m3fn scaled (ComfyUI)",
    }


@pytest.mark.parametrize(
    ("output", "said"),
    [
        ("{path: out.gguf, format: gguf}", "GGUF Q8_0 cannot hold"),
        ("{path: out.safetensors, dtype: fp8, scaled: true}", "scaled float8_e4m3fn cannot hold"),
    ],
)
def test_an_input_nan_fails_an_encoded_output(tmp_path, pair, output, said):
    key = "model.diffusion_model.img_in.weight"  # Q8_0 in the GGUF: 64 columns
    tensors = load_file(str(pair["a"]))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    inputs = f"{{A: {tmp_path / 'nan.safetensors'}, B: {pair['b']}}}"
    _, result = build(tmp_path, pair, output, inputs=inputs)
    assert result.returncode == 1
    assert f"{key} has infinite or NaN values from an input, which {said}" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


@pytest.mark.parametrize(("family", "architecture"), [("sd35-medium", "sd3"), ("sdxl", "sdxl")])
def test_sd35_and_sdxl_quantize_and_read_back(tmp_path, family, architecture):
    """fp8 and GGUF outputs of other families read back as that family, with
    the architecture ComfyUI-GGUF knows it by."""
    paths = {
        n: write_model(
            tmp_path / f"{n}.safetensors", ModelSpec(family=family, shrink=SHRINK, seed=s)
        )
        for n, s in (("a", 1), ("b", 2))
    }
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {paths["a"]}, B: {paths["b"]}}}
        nodes:
          merged: "weighted_sum(A, B, alpha=0.5)"
          again: merged
        outputs:
          merged: {{path: out.safetensors, dtype: fp8}}
          again: {{path: out.gguf, format: gguf, quant: Q8_0}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    for name in ("out.safetensors", "out.gguf"):
        report = json.loads(run_in_process("inspect", "--json", str(tmp_path / name)).stdout)
        assert report["family"] == family, name
    fp8 = load_file(str(tmp_path / "out.safetensors"))
    vae = [k for k in fp8 if k.startswith("first_stage_model.")]
    assert vae and all(fp8[k].dtype == torch.bfloat16 for k in vae)
    architecture_found, state = comfy_gguf_load(tmp_path / "out.gguf")
    assert architecture_found == architecture
    assert not [name for name in state if name.startswith(("model.", "first_stage_model."))]


def test_a_lora_bakes_into_a_scaled_fp8_base_in_float32(tmp_path):
    """`bake --dtype fp8_e4m3fn` over a scaled-fp8 SDXL base: the base is
    dequantized, the LoRA added in float32, the sum rounded once to fp8."""
    from test_quantized_inputs import scaled_fp8

    from sdrecipe.synthetic import AdapterSpec, write_adapter

    spec = ModelSpec(family="sdxl", shrink=SHRINK, seed=1, dtype=torch.float32)
    values = {key: tensor_value(spec, key, info) for key, info in model_layout(spec).items()}
    tensors, meant = scaled_fp8(values)
    save_file(tensors, str(tmp_path / "base.safetensors"))
    save_file(
        {k: torch.from_numpy(v) for k, v in meant.items()}, str(tmp_path / "plain.safetensors")
    )
    lora = write_adapter(tmp_path / "lora.safetensors", AdapterSpec(family="sdxl", shrink=SHRINK))
    for base, dtype, out in (("base", "fp8_e4m3fn", "fp8"), ("plain", "float32", "f32")):
        result = run_in_process(
            "bake",
            str(tmp_path / f"{base}.safetensors"),
            str(lora),
            "-o",
            str(tmp_path / f"{out}.safetensors"),
            "--dtype",
            dtype,
        )
        assert result.returncode == 0, result.stderr
    fp8, wanted = (
        load_file(str(tmp_path / "fp8.safetensors")),
        load_file(str(tmp_path / "f32.safetensors")),
    )
    patched = 0
    for key, stored in fp8.items():
        if stored.dtype != torch.float8_e4m3fn:
            continue
        rounded = nearest_fp8(wanted[key].numpy(), torch.float8_e4m3fn)
        assert np.array_equal(fp8_decode(stored.view(torch.uint8).numpy(), 4), rounded), key
        patched += not np.array_equal(wanted[key].numpy(), meant[key])
    assert patched > 0
