"""Flux.1 and SD3.5 adapters (kohya, sd-scripts' split, PEFT, XLabs, LyCORIS)
baked into every layout and checked against numpy; Flux LoRA extraction.

The reference maps each adapter name *backward* to a single-file key and its
rows with tables written here from diffusers' conversion scripts and XLabs'
processors (kohya's names are the single-file path flattened, so they are
matched in the flattened space); the formulas are `tests.test_adapters`'.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from sdrecipe.adapters.naming import LORA_LAYERS
from sdrecipe.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model
from tests.conftest import SHRINK, convert, run_in_process, write_recipe
from tests.test_adapters import numpy_delta

STRENGTH = 0.7
MODEL_PREFIX = "model.diffusion_model."
ENCODERS = {
    "flux1": {
        "te1": "text_encoders.clip_l.transformer.",
        "te3": "text_encoders.t5xxl.transformer.",
    },
    "sd35-medium": {
        "te1": "text_encoders.clip_l.transformer.",
        "te2": "text_encoders.clip_g.transformer.",
        "te3": "text_encoders.t5xxl.transformer.",
    },
}
PEFT_ENCODERS = {"text_encoder": "te1", "text_encoder_2": "te3"}
# diffusers' Flux transformer names → (single-file module, part, parts); part
# None: all rows. parts 7: linear1's rows, q, k, v (one each) and the MLP (four).
FLUX_PEFT = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])$", "double_blocks.{0}.img_attn.qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj$", "double_blocks.{0}.txt_attn.qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0$", "double_blocks.{0}.img_attn.proj", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out$", "double_blocks.{0}.txt_attn.proj", 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj$", "double_blocks.{0}.img_mlp.0", 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2$", "double_blocks.{0}.img_mlp.2", 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj$", "double_blocks.{0}.txt_mlp.0", 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2$", "double_blocks.{0}.txt_mlp.2", 1),
    (r"transformer_blocks\.(\d+)\.norm1\.linear$", "double_blocks.{0}.img_mod.lin", 1),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear$", "double_blocks.{0}.txt_mod.lin", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])$", "single_blocks.{0}.linear1", 7),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp$", "single_blocks.{0}.linear1", "mlp"),
    (r"single_transformer_blocks\.(\d+)\.proj_out$", "single_blocks.{0}.linear2", 1),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear$", "single_blocks.{0}.modulation.lin", 1),
]
J = "joint_blocks.{0}."
SD3_PEFT = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])$", J + "x_block.attn.qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])$", J + "x_block.attn2.qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj$", J + "context_block.attn.qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0$", J + "x_block.attn.proj", 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0$", J + "x_block.attn2.proj", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out$", J + "context_block.attn.proj", 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj$", J + "x_block.mlp.fc1", 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2$", J + "x_block.mlp.fc2", 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj$", J + "context_block.mlp.fc1", 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2$", J + "context_block.mlp.fc2", 1),
    (r"transformer_blocks\.(\d+)\.norm1\.linear$", J + "x_block.adaLN_modulation.1", 1),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear$", J + "context_block.adaLN_modulation.1",
     "context"),
]  # fmt: skip
# XLabs' processors (x-flux): module → (single-file module, rows as sevenths or None).
XLABS = [
    (r"double_blocks\.(\d+)\.processor\.qkv_lora1$", "double_blocks.{0}.img_attn.qkv"),
    (r"double_blocks\.(\d+)\.processor\.qkv_lora2$", "double_blocks.{0}.txt_attn.qkv"),
    (r"double_blocks\.(\d+)\.processor\.proj_lora1$", "double_blocks.{0}.img_attn.proj"),
    (r"double_blocks\.(\d+)\.processor\.proj_lora2$", "double_blocks.{0}.txt_attn.proj"),
    (r"single_blocks\.(\d+)\.processor\.qkv_lora$", "single_blocks.{0}.linear1"),
    (r"single_blocks\.(\d+)\.processor\.proj_lora$", "single_blocks.{0}.linear2"),
]


def load(path: Path) -> dict[str, np.ndarray]:
    """A file's tensors in float64 (bf16 and fp8 too), integers as they are."""
    return {
        key: value.double().numpy() if value.is_floating_point() else value.numpy()
        for key, value in load_torch(path).items()
    }


def _target(
    family: str, stem: str, base: dict[str, np.ndarray], last: int
) -> tuple[str, slice | None, bool]:
    """(the single-file weight key, its rows or None, whether the row halves are
    exchanged) that the module `stem` patches."""
    prefix = MODEL_PREFIX if any(k.startswith(MODEL_PREFIX) for k in base) else ""
    flat = {key.replace(".", "_"): key for key in base}
    if match := re.fullmatch(r"lora_unet_(.*)", stem):
        return flat[(prefix + match[1]).replace(".", "_") + "_weight"], None, False
    if match := re.fullmatch(r"lora_(te\d)_(.*)", stem):
        return (
            flat[(ENCODERS[family][match[1]] + match[2]).replace(".", "_") + "_weight"],
            None,
            False,
        )
    if match := re.fullmatch(r"(text_encoder(?:_2)?)\.(.*)", stem):
        encoder = ENCODERS[family][PEFT_ENCODERS[match[1]]]
        return encoder + match[2] + ".weight", None, False
    stem = stem.removeprefix("diffusion_model.")
    for pattern, module in XLABS:
        if match := re.fullmatch(pattern, stem):
            key = prefix + module.format(match[1]) + ".weight"
            rows = base[key].shape[0]
            return key, slice(0, 3 * rows // 7) if "linear1" in module else None, False
    stem = stem.removeprefix("transformer.")
    for pattern, module, parts in FLUX_PEFT if family == "flux1" else SD3_PEFT:
        if not (match := re.fullmatch(pattern, stem)):
            continue
        key = prefix + module.format(match[1]) + ".weight"
        rows = base[key].shape[0]
        if parts == "mlp":
            return key, slice(3 * rows // 7, rows), False
        if parts == "context":
            return key, None, int(match[1]) == last
        if parts == 1:
            return key, None, False
        index = "qkv".index(match[2])
        return key, slice(index * rows // parts, (index + 1) * rows // parts), False
    raise AssertionError(f"the reference does not know module {stem}")


def expected_bake(family: str, base: dict[str, np.ndarray], adapter: dict[str, np.ndarray],
                  strength: float) -> dict[str, np.ndarray]:  # fmt: skip
    """The baked model in float64: each module's delta added to its rows."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in adapter.items():
        stem, parameter = re.fullmatch(
            r"(.*?)\.(lora_\w+(?:\.\d+)?\.weight|up\.weight|down\.weight|alpha|hada_\w+|lokr_\w+)",
            key,
        ).groups()
        parameter = {"up.weight": "lora_up.weight", "down.weight": "lora_down.weight"}.get(
            parameter, parameter
        )
        modules.setdefault(stem, {})[parameter] = value
    blocks = [int(m[1]) for k in base if (m := re.search(r"joint_blocks\.(\d+)\.", k))]
    result = {key: value.copy() for key, value in base.items()}
    for stem, module in modules.items():
        key, rows, swapped = _target(family, stem, base, max(blocks, default=-1))
        weight = base[key] if rows is None else base[key][rows]
        if "lora_up.0.weight" in module:  # sd-scripts' split LoRA: one pair per part
            ups = sorted(p for p in module if p.startswith("lora_up."))
            delta = np.concatenate([
                module[up] @ module[up.replace("up", "down")] for up in ups
            ]) * (float(module["alpha"]) / module["lora_down.0.weight"].shape[0])  # fmt: skip
        else:
            delta = numpy_delta(module, weight)["weight"]
        if swapped:
            delta = np.concatenate([delta[len(delta) // 2 :], delta[: len(delta) // 2]])
        result[key][slice(None) if rows is None else rows] += strength * delta
    return result


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small Flux.1 (BFL file, ComfyUI all-in-one, diffusers folder) and SD3.5 models."""
    folder = tmp_path_factory.mktemp("dit_adapters")
    specs = {
        "flux1": ModelSpec(family="flux1", seed=21, shrink=SHRINK),
        "flux1-aio": ModelSpec(family="flux1", layout="flux1-dev-aio", seed=22, shrink=SHRINK),
        "flux1-tuned": ModelSpec(family="flux1", seed=21, delta_seed=23, shrink=SHRINK),
        "sd35-medium": ModelSpec(family="sd35-medium", seed=24, shrink=SHRINK),
        "sd35-medium-tuned": ModelSpec(family="sd35-medium", seed=24, delta_seed=25, shrink=SHRINK),
    }
    paths = {
        name: write_model(folder / f"{name}.safetensors", spec) for name, spec in specs.items()
    }
    paths["flux1-diffusers"] = convert(paths["flux1"], folder / "flux1-diffusers")
    return paths


def bake(
    folder: Path, base: Path, adapter: Path, expression: str = f"A + {STRENGTH} * L"
) -> tuple[dict[str, np.ndarray], str]:
    """Build `expression` over A and L into a float32 file: (its tensors, stderr)."""
    recipe = write_recipe(
        folder,
        f"""
        inputs: {{A: {base}, L: {adapter}}}
        nodes: {{baked: "{expression}"}}
        outputs: {{baked: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    return load(folder / "out.safetensors"), result.stderr


def assert_baked(built: dict, expected: dict, base: dict, least: int) -> None:
    changed = 0
    for key, value in built.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        np.testing.assert_allclose(value, expected[key], rtol=2e-5, atol=2e-6, err_msg=key)
        changed += not np.array_equal(value, base[key])
    assert changed >= least  # the adapter reached the model


# --- baking ------------------------------------------------------------------------------

VARIANTS = {
    # name: (model, adapter spec, keys changed at least)
    "flux-kohya": ("flux1", AdapterSpec("flux1", SHRINK, "lora"), 304),
    "flux-kohya-aio": (
        "flux1-aio",
        AdapterSpec("flux1", SHRINK, "lora", alpha=8.0, layout="flux1-dev-aio"),
        544,
    ),
    "flux-split-qkv": ("flux1", AdapterSpec("flux1", SHRINK, "lora", naming="split"), 304),
    "flux-peft": ("flux1", AdapterSpec("flux1", SHRINK, "lora", naming="peft", alpha=None), 304),
    "flux-peft-diffusers": (
        "flux1-diffusers",
        AdapterSpec("flux1", SHRINK, "lora", naming="peft", alpha=None),
        304,
    ),
    "flux-xlabs": ("flux1", AdapterSpec("flux1", SHRINK, "lora", naming="xlabs", alpha=None), 152),
    "flux-loha": ("flux1", AdapterSpec("flux1", SHRINK, "loha"), 304),
    "flux-lokr": ("flux1", AdapterSpec("flux1", SHRINK, "lokr"), 304),
    "flux-bf16-factors": ("flux1", AdapterSpec("flux1", SHRINK, "lora", dtype=torch.bfloat16), 304),
    "flux-fp8-factors": (
        "flux1",
        AdapterSpec("flux1", SHRINK, "lora", dtype=torch.float8_e4m3fn),
        304,
    ),
    "sd35-kohya": ("sd35-medium", AdapterSpec("sd35-medium", SHRINK, "lora"), 100),
    "sd35-peft": (
        "sd35-medium",
        AdapterSpec("sd35-medium", SHRINK, "lora", naming="peft", alpha=None),
        100,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_baking_matches_numpy(variant: str, models: dict[str, Path], tmp_path: Path) -> None:
    model, spec, least = VARIANTS[variant]
    adapter = write_adapter(tmp_path / "adapter.safetensors", spec)
    built, _ = bake(tmp_path, models[model], adapter)
    # A diffusers folder reads back as the BFL file it was made from.
    base = load(models["flux1" if model == "flux1-diffusers" else model])
    family = "flux1" if model.startswith("flux1") else model
    expected = expected_bake(family, base, load(adapter), STRENGTH)
    assert_baked(built, expected, base, least)


def test_a_slice_no_module_patches_is_unchanged(models: dict[str, Path], tmp_path: Path) -> None:
    """A PEFT file patching only q of a single block's linear1 changes those rows alone."""
    spec = AdapterSpec("flux1", SHRINK, "lora", naming="peft", alpha=None)
    tensors = write_adapter(tmp_path / "full.safetensors", spec)
    kept = {
        key: value
        for key, value in load_torch(tensors).items()
        if key.startswith("transformer.single_transformer_blocks.0.attn.to_q.")
    }
    save_file(kept, tmp_path / "q.safetensors")
    built, _ = bake(tmp_path, models["flux1"], tmp_path / "q.safetensors")
    base = load(models["flux1"])
    key = "single_blocks.0.linear1.weight"
    third = base[key].shape[0] // 7
    assert not np.array_equal(built[key][:third], base[key][:third])
    np.testing.assert_array_equal(built[key][third:], base[key][third:])
    assert sum(not np.array_equal(built[k], base[k]) for k in built) == 1


def test_flux_block_strengths(models: dict[str, Path], tmp_path: Path) -> None:
    """`scale(L, alpha={...})` by Flux's block IDs: D00 full, S* half, the rest 0."""
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("flux1", SHRINK, "lora"))
    strengths = "{D00: 1, 'D01-D18': 0, 'S*': 0.5, IN: 0, OUT: 0}"
    built, _ = bake(tmp_path, models["flux1"], adapter, f"A + scale(L, alpha={strengths})")
    base = load(models["flux1"])
    full = expected_bake("flux1", base, load(adapter), 1.0)
    half = expected_bake("flux1", base, load(adapter), 0.5)
    checks = {
        "double_blocks.0.img_attn.qkv.weight": full,
        "double_blocks.1.img_attn.qkv.weight": base,
        "single_blocks.5.linear1.weight": half,
    }
    for key, expected in checks.items():
        np.testing.assert_allclose(built[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)


def test_lora_into_a_quantized_base(models: dict[str, Path], tmp_path: Path) -> None:
    """An fp8 base is read as its float values; the bake happens in float32."""
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    quantized = convert(models["flux1"], fp8 / "flux-fp8.safetensors", "safetensors", "dtype: fp8")
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("flux1", SHRINK, "lora"))
    built, _ = bake(tmp_path, quantized, adapter)
    base = load(quantized)
    assert_baked(built, expected_bake("flux1", base, load(adapter), STRENGTH), base, 304)


# --- errors ------------------------------------------------------------------------------


def test_an_sdxl_lora_on_flux_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("sdxl", SHRINK, "lora"))
    result = build_with(tmp_path, models["flux1"], adapter)
    assert result.returncode == 2
    assert "match no key of A (flux1)" in result.stderr
    assert "look like a sdxl adapter" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_slice_of_the_wrong_width_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """A PEFT module for `proj_mlp` that is as wide as `to_q` does not fit its slice."""
    rank = 4
    hidden = load(models["flux1"])["single_blocks.0.linear2.weight"].shape[0]
    stem = "transformer.single_transformer_blocks.0.proj_mlp"
    adapter = one_module(
        tmp_path,
        {
            f"{stem}.lora_A.weight": torch.ones(rank, hidden),
            f"{stem}.lora_B.weight": torch.ones(hidden, rank),
        },
    )
    result = build_with(tmp_path, models["flux1"], adapter)
    assert result.returncode == 2
    assert f"module {stem}" in result.stderr
    assert "single_blocks.0.linear1.weight" in result.stderr
    assert f"its slice, rows {3 * hidden}-{7 * hidden - 1}" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_split_module_missing_a_part_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    spec = AdapterSpec("flux1", SHRINK, "lora", naming="split")
    tensors = load_torch(write_adapter(tmp_path / "full.safetensors", spec))
    del tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.1.weight"]
    result = build_with(tmp_path, models["flux1"], one_module(tmp_path, tensors))
    assert result.returncode == 2
    assert "lora_unet_double_blocks_0_img_attn_qkv (split_lora) lacks lora_up.1.weight" in (
        result.stderr
    )


# --- extraction and inspect --------------------------------------------------------------


EXTRACTED = {
    # (model, naming): (modules the file must hold, metadata it must say)
    ("flux1", "kohya"): (
        ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_37_linear1"],
        {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
         "modelspec.architecture": "flux-1-dev/lora"},
    ),
    ("flux1", "peft"): (
        [
            "transformer.transformer_blocks.0.attn.to_q",
            "transformer.single_transformer_blocks.3.proj_mlp",
        ],
        {},
    ),
    ("sd35-medium", "kohya"): (
        ["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"],
        {"ss_network_module": "networks.lora_sd3",
         "modelspec.architecture": "stable-diffusion-3.5-medium/lora"},
    ),
    ("sd35-medium", "peft"): (["transformer.transformer_blocks.23.norm1_context.linear"], {}),
}  # fmt: skip


@pytest.mark.parametrize(("model", "naming"), list(EXTRACTED))
def test_a_full_rank_lora_bakes_back_to_the_tuned_model(
    model: str, naming: str, models: dict[str, Path], tmp_path: Path
) -> None:
    """Extracted at full rank (the layers are at most 96 wide here), the LoRA is
    the difference, in kohya's names and metadata or in diffusers'."""
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models[model + "-tuned"]}, B: {models[model]}}}
        nodes: {{learned: A - B}}
        outputs:
          learned: {{path: lora.safetensors, format: lora, rank: 512, dtype: fp32,
                     clamp_quantile: 1.0, naming: {naming}}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    lora = tmp_path / "lora.safetensors"
    names, wanted = EXTRACTED[model, naming]
    down = "lora_down" if naming == "kohya" else "lora_A"
    keys = set(load_file(lora))
    assert {f"{name}.{down}.weight" for name in names} <= keys
    with safe_open(lora, "np") as handle:
        metadata = handle.metadata()
    assert wanted.items() <= metadata.items()
    if naming == "peft":
        config = json.loads(metadata["lora_adapter_metadata"])
        assert config["transformer.lora_alpha"] == config["transformer.r"]
    (tmp_path / "back").mkdir()
    built, _ = bake(tmp_path / "back", models[model], lora, "A + L")
    tuned, base = load(models[model + "-tuned"]), load(models[model])
    patched = 0
    for key, value in built.items():
        vae = key.startswith("first_stage_model.")
        if key.endswith("weight") and LORA_LAYERS.search(key) and not vae:
            np.testing.assert_allclose(value, tuned[key], atol=2e-3, err_msg=key)
            patched += 1
        else:
            np.testing.assert_array_equal(value, base[key], err_msg=key)
    assert patched == 304 if model == "flux1" else patched > 100


def test_inspect_against_a_flux_model(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = write_adapter(
        tmp_path / "a.safetensors", AdapterSpec("flux1", SHRINK, "lora", naming="peft")
    )
    result = run_in_process("inspect", "--json", str(adapter), "--against", str(models["flux1"]))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["adapter"]
    assert report["family"] == "flux1"
    assert report["naming"] == "peft"
    assert report["ranks"] == [4]
    assert report["against"]["family"] == "flux1"
    assert report["unmatched"] == []
    assert report["matched"] == report["modules"]


@pytest.mark.parametrize(
    ("expression", "strength"),
    [
        ("A - 0.5 * L", -0.5),
        ("A + (L - 0.5 * L)", 0.5),
        ("A + L / 4", 0.25),
        ("A + -L", -1.0),
        ("A + scale(L, alpha=0.3)", 0.3),
        ("weighted_sum(A, A + L, alpha=0.5)", 0.5),
    ],
)
def test_every_way_of_adding_a_lora(
    expression: str, strength: float, models: dict[str, Path], tmp_path: Path
) -> None:
    """The factors are added, scaled or made whole as the expression needs."""
    spec = AdapterSpec("flux1", SHRINK, "lora", naming="split")
    adapter = write_adapter(tmp_path / "a.safetensors", spec)
    built, _ = bake(tmp_path, models["flux1"], adapter, expression)
    base = load(models["flux1"])
    assert_baked(built, expected_bake("flux1", base, load(adapter), strength), base, 304)


# --- hand-made files: alphas, shapes and names ---------------------------------------------

HIDDEN = 3072 // SHRINK


def one_module(tmp_path: Path, tensors: dict, metadata: dict | None = None, name: str = "a"):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata)
    return path


def build_with(tmp_path: Path, base: Path, adapter: Path, expression: str = "A + L", *extra):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {base}, L: {adapter}}}
        nodes: {{baked: "{expression}"}}
        outputs: {{baked: {{path: out.safetensors, dtype: fp32}}}}
        """,
        name=f"{adapter.stem}.yaml",
    )
    return run_in_process("build", *extra, str(recipe))


def lora_pair(rows: int, columns: int, rank: int = 4, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(rows, rank, generator=generator) * 0.01
    down = torch.randn(rank, columns, generator=generator) * 0.01
    return up, down


def test_peft_alpha_applies_under_every_prefix_and_keys_the_cache(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """diffusers' `transformer.lora_alpha` scales a module named `transformer.`,
    `diffusion_model.` or bare alike; the cache never mixes files whose alphas differ."""
    up, down = lora_pair(HIDDEN, HIDDEN)
    base = load(models["flux1"])
    key = "double_blocks.0.img_attn.qkv.weight"
    expected = base[key][:HIDDEN] + 2.0 * (up.double() @ down.double()).numpy()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for prefix, alpha in (("diffusion_model.", 8), ("transformer.", 8), ("", 8), ("", 4)):
        stem = f"{prefix}transformer_blocks.0.attn.to_q"
        metadata = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha})}
        adapter = one_module(
            tmp_path,
            {f"{stem}.lora_B.weight": up, f"{stem}.lora_A.weight": down},
            metadata,
            f"a{prefix.strip('.')}{alpha}",
        )
        result = build_with(tmp_path, models["flux1"], adapter, "A + L", *cache)
        assert result.returncode == 0, result.stderr
        built = load(tmp_path / "out.safetensors")[key][:HIDDEN]
        wanted = (
            expected if alpha == 8 else base[key][:HIDDEN] + (up.double() @ down.double()).numpy()
        )
        np.testing.assert_allclose(built, wanted, rtol=1e-5, atol=1e-7, err_msg=prefix)


def test_rslora_scales_by_the_root_of_the_rank_and_alpha_pattern_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    up, down = lora_pair(HIDDEN, HIDDEN)
    stem = "transformer.transformer_blocks.0.attn.to_q"
    factors = {f"{stem}.lora_B.weight": up, f"{stem}.lora_A.weight": down}
    config = {"transformer.lora_alpha": 16, "transformer.r": 4, "transformer.use_rslora": True}
    adapter = one_module(tmp_path, factors, {"lora_adapter_metadata": json.dumps(config)})
    assert build_with(tmp_path, models["flux1"], adapter).returncode == 0
    key = "double_blocks.0.img_attn.qkv.weight"
    base = load(models["flux1"])[key][:HIDDEN]
    wanted = base + 8.0 * (up.double() @ down.double()).numpy()  # 16 / √4
    np.testing.assert_allclose(load(tmp_path / "out.safetensors")[key][:HIDDEN], wanted, rtol=1e-5)
    config = {"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"to_q": 64}}
    adapter = one_module(tmp_path, factors, {"lora_adapter_metadata": json.dumps(config)}, "b")
    result = build_with(tmp_path, models["flux1"], adapter)
    assert result.returncode == 2
    assert "transformer.alpha_pattern" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("stem", "up_shape", "down_shape"),
    [
        ("single_blocks.0.processor.qkv_lora", (HIDDEN * 3 // 2, 4), (4, HIDDEN * 2)),
        ("transformer.norm_out.linear", (HIDDEN, 4), (4, HIDDEN * 2)),
        ("lora_unet_double_blocks_0_img_attn_proj", (HIDDEN * 2, 4), (4, HIDDEN // 2)),
    ],
    ids=["xlabs-rows", "swapped-rows", "kohya-rows"],
)
def test_factors_of_the_right_size_and_wrong_shape_are_refused(
    stem: str, up_shape: tuple, down_shape: tuple, models: dict[str, Path], tmp_path: Path
) -> None:
    up, down = torch.zeros(up_shape), torch.zeros(down_shape)
    parameters = (
        ("lora_B", "lora_A")
        if "lora_" not in stem and "transformer." in stem
        else (("up", "down") if "processor" in stem else ("lora_up", "lora_down"))
    )
    adapter = one_module(
        tmp_path, {f"{stem}.{parameters[0]}.weight": up, f"{stem}.{parameters[1]}.weight": down}
    )
    result = build_with(tmp_path, models["flux1"], adapter)
    assert result.returncode == 2, result.stderr
    assert f"module {stem} makes a delta of {up_shape[0]} rows" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("tensors", "metadata", "named"),
    [
        (
            {"Q.lora_up.0.weight": (HIDDEN, 4), "Q.lora_down.0.weight": (4, HIDDEN),
             "Q.lora_up.00.weight": (HIDDEN, 4), "Q.lora_down.00.weight": (4, HIDDEN),
             "Q.lora_up.1.weight": (HIDDEN, 4), "Q.lora_down.1.weight": (4, HIDDEN)},
            None,
            "look like factors sdrecipe does not know (Q.lora_down.00.weight",
        ),
        (
            {"lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": (HIDDEN, 4),
             "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": (4, HIDDEN),
             "lora_unet_double_blocks_0_img_attn_proj.lora_B.weight": (HIDDEN, 4),
             "lora_unet_double_blocks_0_img_attn_proj.lora_A.weight": (4, HIDDEN)},
            None,
            "one convention",
        ),
        (
            {"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (HIDDEN, 4),
             "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, HIDDEN)},
            {"lora_adapter_metadata": '{"transformer.lora_alpha": 1' + "0" * 400 + "}"},
            "not a finite number",
        ),
    ],
    ids=["split-leading-zero", "two-conventions", "huge-alpha"],
)  # fmt: skip
def test_malformed_adapters_are_refused_clearly(
    tensors: dict, metadata: dict | None, named: str, models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = one_module(tmp_path, {k: torch.zeros(s) for k, s in tensors.items()}, metadata)
    result = build_with(tmp_path, models["flux1"], adapter)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and str(adapter) in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def test_nan_in_an_fp8_factor_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    up, down = lora_pair(HIDDEN, HIDDEN)
    up[0, 0] = float("nan")
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    factors = {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down}
    adapter = one_module(tmp_path, {k: v.to(torch.float8_e4m3fn) for k, v in factors.items()})
    result = build_with(tmp_path, models["flux1"], adapter)
    assert result.returncode == 2, result.stderr
    assert f"module {stem}: lora_up.weight holds infinite or NaN values" in result.stderr


def test_a_strength_beyond_float32_fails_the_build_by_name(
    models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("flux1", SHRINK, "lora"))
    result = build_with(tmp_path, models["flux1"], adapter, "A + 1e39 * L")
    assert result.returncode == 1, result.stderr
    assert "infinite or NaN values" in result.stderr and "internal error" not in result.stderr


def test_modules_of_two_conventions_on_one_layer_both_apply(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """A kohya module and a PEFT one patching the same layer add up, as on fused keys."""
    first, second = lora_pair(4 * HIDDEN, HIDDEN, seed=1), lora_pair(4 * HIDDEN, HIDDEN, seed=2)
    kohya, peft = (
        "lora_unet_double_blocks_0_img_mlp_0",
        "transformer.transformer_blocks.0.ff.net.0.proj",
    )
    adapter = one_module(
        tmp_path,
        {
            f"{kohya}.lora_up.weight": first[0], f"{kohya}.lora_down.weight": first[1],
            f"{peft}.lora_B.weight": second[0], f"{peft}.lora_A.weight": second[1],
        },
    )  # fmt: skip
    assert build_with(tmp_path, models["flux1"], adapter).returncode == 0
    key = "double_blocks.0.img_mlp.0.weight"
    wanted = load(models["flux1"])[key] + sum(
        (up.double() @ down.double()).numpy() for up, down in (first, second)
    )
    np.testing.assert_allclose(
        load(tmp_path / "out.safetensors")[key], wanted, rtol=1e-5, atol=1e-9
    )


def test_simpletuner_lycoris_names_match(models: dict[str, Path], tmp_path: Path) -> None:
    up, down = lora_pair(HIDDEN, HIDDEN)
    stem = "lycoris_single_transformer_blocks_0_attn_to_k"
    adapter = one_module(tmp_path, {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down})
    result = run_in_process("inspect", "--json", str(adapter), "--against", str(models["flux1"]))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adapter"]["matched"] == 1


def test_bake_leaves_text_encoder_modules_out_of_a_transformer_file_when_asked(
    models: dict[str, Path], tmp_path: Path
) -> None:
    spec = AdapterSpec("flux1", SHRINK, "lora", layout="flux1-dev-aio")
    adapter = write_adapter(tmp_path / "aio.safetensors", spec)
    out = tmp_path / "baked.safetensors"
    refused = run_in_process("bake", str(models["flux1"]), str(adapter), "-o", str(out))
    assert refused.returncode == 2 and "--allow-unmatched" in refused.stderr
    result = run_in_process(
        "bake", str(models["flux1"]), str(adapter), "-o", str(out), "--allow-unmatched"
    )
    assert result.returncode == 0, result.stderr
    assert "allow_unmatched: true" in (tmp_path / "baked.recipe.yaml").read_text()


def test_an_fp8_base_without_dtype_gets_a_note(models: dict[str, Path], tmp_path: Path) -> None:
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    base = convert(models["flux1"], fp8 / "flux-fp8.safetensors", "safetensors", "dtype: fp8")
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("flux1", SHRINK, "lora"))
    result = run_in_process(
        "bake", str(base), f"{adapter}=0.8", "-o", str(tmp_path / "o.safetensors")
    )
    assert result.returncode == 0, result.stderr
    assert "rounded to fp8" in result.stderr and "dtype: bfloat16" in result.stderr


def test_inspect_against_an_adapter_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("flux1", SHRINK, "lora"))
    result = run_in_process("inspect", str(adapter), "--against", str(adapter))
    assert result.returncode == 2 and "names an adapter" in result.stderr
