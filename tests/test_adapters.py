"""Adapters (LoRA, LyCORIS, PEFT) baked into checkpoints, checked against numpy.

The reference here maps adapter names *backward* to checkpoint keys, with the
rules A1111's `convert_diffusers_name_to_compvis` uses, in the `_`-flattened
space where they are unambiguous; sdrecipe maps checkpoint keys forward. The
delta formulas are numpy transcriptions of kohya's, LyCORIS' and A1111's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from sdrecipe.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model
from tests.conftest import SHRINK, UNET_IN, invoke, run_in_process, write_recipe

STRENGTH = 0.7
RESNET_PARTS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
}
OPEN_CLIP_PARTS = {"self_attn_out_proj": "attn_out_proj", "mlp_fc1": "mlp_c_fc"}
OPEN_CLIP_PARTS |= {"mlp_fc2": "mlp_c_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}


# --- the reference: names backward, formulas in numpy ----------------------------------


def _resnet(rest: str) -> str:
    for diffusers, ldm in RESNET_PARTS.items():
        if rest.startswith(diffusers):
            return ldm + rest[len(diffusers) :]
    return rest


def _sd_unet(name: str) -> str:
    """A diffusers-style flattened UNet path → the single-file flattened path."""
    if m := re.match(r"down_blocks_(\d)_(attentions|resnets)_(\d)_(.*)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks_{1 + 3 * i + j}_{int(kind == 'attentions')}_" + (
            rest if kind == "attentions" else _resnet(rest)
        )
    if m := re.match(r"down_blocks_(\d)_downsamplers_0_conv", name):
        return f"input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"mid_block_attentions_0_(.*)", name):
        return f"middle_block_1_{m[1]}"
    if m := re.match(r"mid_block_resnets_(\d)_(.*)", name):
        return f"middle_block_{2 * int(m[1])}_{_resnet(m[2])}"
    if m := re.match(r"up_blocks_(\d)_(attentions|resnets)_(\d)_(.*)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks_{3 * i + j}_{int(kind == 'attentions')}_" + (
            rest if kind == "attentions" else _resnet(rest)
        )
    if m := re.match(r"up_blocks_(\d)_upsamplers_0_conv", name):
        i = int(m[1])
        return f"output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv"
    raise AssertionError(f"unexpected UNet module {name}")


def _open_clip(prefix: str, name: str) -> tuple[str, int | None]:
    m = re.match(r"text_model_encoder_layers_(\d+)_(.*)", name)
    assert m, name
    layer, rest = m[1], m[2]
    if q := re.match(r"self_attn_([qkv])_proj", rest):
        return f"{prefix}transformer_resblocks_{layer}_attn_in_proj", "qkv".index(q[1])
    for hf, ldm in OPEN_CLIP_PARTS.items():
        rest = rest.replace(hf, ldm)
    return f"{prefix}transformer_resblocks_{layer}_{rest}", None


def checkpoint_target(family: str, stem: str) -> tuple[str, int | None]:
    """(flattened checkpoint path without the parameter, q/k/v slice or None)."""
    stem = re.sub(r"^(unet|text_encoder|text_encoder_2)\.", lambda m: f"{m[1]}_", stem)
    stem = stem.replace(".", "_")
    stem = stem.replace("text_encoder_2_", "lora_te2_").replace("text_encoder_", "lora_te_")
    stem = re.sub(r"^unet_", "lora_unet_", stem)
    if family == "sdxl":
        stem = stem.replace("lora_te_", "lora_te1_")
    if stem.startswith("lora_unet_"):
        rest = stem.removeprefix("lora_unet_")
        sgm = family == "sdxl" and not rest.startswith(("down_blocks", "mid_block", "up_blocks"))
        path = rest if sgm else _sd_unet(rest)
        return "model_diffusion_model_" + path, None
    if family == "sd1":
        return "cond_stage_model_transformer_" + stem.removeprefix("lora_te_"), None
    if family == "sd2":
        return _open_clip("cond_stage_model_model_", stem.removeprefix("lora_te_"))
    if stem.startswith("lora_te1_"):
        return "conditioner_embedders_0_transformer_" + stem.removeprefix("lora_te1_"), None
    return _open_clip("conditioner_embedders_1_model_", stem.removeprefix("lora_te2_"))


def _tucker(core: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    return np.einsum("ijkl,ip,jq->pqkl", core, rows, columns)


def numpy_delta(module: dict[str, np.ndarray], weight: np.ndarray) -> dict[str, np.ndarray]:
    """One module's deltas for a layer holding `weight`, by parameter (weight, bias)."""
    m = {name: value.astype(np.float64) for name, value in module.items()}
    bias = next(({"bias": m[p]} for p in ("diff_b", "b_norm") if p in m), {})
    alpha = m.get("alpha")
    if "lora_up.weight" in m or "lora_B.weight" in m:
        up = m.get("lora_up.weight", m.get("lora_B.weight"))
        down = m.get("lora_down.weight", m.get("lora_A.weight"))
        rank = down.shape[0]
        if "lora_mid.weight" in m:
            delta = _tucker(
                m["lora_mid.weight"], up.reshape(up.shape[0], -1).T, down.reshape(rank, -1)
            )
        else:
            delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
        scale = 1.0 if alpha is None else float(alpha) / rank
    elif "hada_w1_a" in m:
        rank = m["hada_w1_b"].shape[0]
        if "hada_t1" in m:
            first = _tucker(m["hada_t1"], m["hada_w1_a"], m["hada_w1_b"])
            second = _tucker(m["hada_t2"], m["hada_w2_a"], m["hada_w2_b"])
        else:
            first, second = m["hada_w1_a"] @ m["hada_w1_b"], m["hada_w2_a"] @ m["hada_w2_b"]
        delta, scale = first * second, 1.0 if alpha is None else float(alpha) / rank
    elif any(name.startswith("lokr") for name in m):
        scale = 1.0
        w1 = m.get("lokr_w1")
        if w1 is None:
            w1 = m["lokr_w1_a"] @ m["lokr_w1_b"]
            scale = float(alpha) / m["lokr_w1_b"].shape[0]
        w2 = m.get("lokr_w2")
        if w2 is None:
            rank = m["lokr_w2_b"].shape[0]
            scale = float(alpha) / rank
            if "lokr_t2" in m:
                w2 = _tucker(m["lokr_t2"], m["lokr_w2_a"], m["lokr_w2_b"])
            else:
                w2 = (m["lokr_w2_a"] @ m["lokr_w2_b"].reshape(rank, -1)).reshape(
                    m["lokr_w2_a"].shape[0], *m["lokr_w2_b"].shape[1:]
                )
        w1 = w1.reshape(*w1.shape, *(1,) * (w2.ndim - w1.ndim))
        delta = np.kron(w1, w2)
    elif "diff" in m or "w_norm" in m:
        delta, scale = m.get("diff", m.get("w_norm")), 1.0
    else:
        return bias
    delta = (delta * scale).reshape(weight.shape)
    if "dora_scale" in m:  # A1111/ComfyUI: W + s·(m·W'/|W'| - W), W' = W + dW
        magnitude = m["dora_scale"]
        combined = weight + delta
        axis = 1 if magnitude.shape[0] == 1 and magnitude.shape[1] > 1 else 0
        others = tuple(d for d in range(combined.ndim) if d != axis)
        norm = np.sqrt((combined**2).sum(axis=others, keepdims=True))
        delta = combined * magnitude.reshape(norm.shape) / norm - weight
    return {"weight": delta, **bias}


def expected_bake(
    family: str, base: dict[str, np.ndarray], adapter: dict[str, np.ndarray], strength: float
) -> dict[str, np.ndarray]:
    """The baked model, in float64: every module's delta added where it belongs."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in adapter.items():
        stem, parameter = re.match(
            r"(.*?)\.(lora_\w+\.weight|alpha|dora_scale|hada_\w+|lokr_\w+|diff_b|diff|[wb]_norm)$",
            key,
        ).groups()
        modules.setdefault(stem, {})[parameter] = value
    flat = {key.replace(".", "_"): key for key in base}
    result = {key: value.astype(np.float64) for key, value in base.items()}
    for stem, module in modules.items():
        path, part = checkpoint_target(family, stem)
        weight_key = flat.get(path + "_weight")
        assert weight_key is not None, f"{stem} -> {path}: no such key"
        weight = base[weight_key].astype(np.float64)
        if part is not None:
            size = weight.shape[0] // 3
            weight = weight[part * size : (part + 1) * size]
        rows = slice(None) if part is None else slice(part * size, (part + 1) * size)
        for parameter, delta in numpy_delta(module, weight).items():
            key = weight_key if parameter == "weight" else flat[path + "_bias"]
            result[key][rows] += strength * delta
    return result


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small model of each family (widths / 32)."""
    folder = tmp_path_factory.mktemp("family_models")
    return {
        family: write_model(
            folder / f"{family}.safetensors", ModelSpec(family, shrink=SHRINK, seed=7)
        )
        for family in ("sd1", "sd2", "sdxl")
    }


def bake(tmp_path: Path, base: Path, adapter: Path, expression: str = f"A + {STRENGTH} * L"):
    """Build `expression` over A and L into a float32 file; return its tensors."""
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {base}, L: {adapter}}}
        nodes: {{baked: "{expression}"}}
        outputs: {{baked: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    return load_file(tmp_path / "out.safetensors")


VARIANTS = {
    "sd1-locon": AdapterSpec("sd1", SHRINK, "lora", convs=True),
    "sd1-locon-tucker": AdapterSpec("sd1", SHRINK, "lora", convs=True, tucker=True),
    "sd2-lora": AdapterSpec("sd2", SHRINK, "lora"),
    "sdxl-lora": AdapterSpec("sdxl", SHRINK, "lora", alpha=None),
    "sd1-loha-tucker": AdapterSpec("sd1", SHRINK, "loha", convs=True, tucker=True),
    "sdxl-loha": AdapterSpec("sdxl", SHRINK, "loha"),
    "sd1-lokr-tucker": AdapterSpec("sd1", SHRINK, "lokr", convs=True, tucker=True),
    "sd2-lokr": AdapterSpec("sd2", SHRINK, "lokr", convs=True),
    "sd1-full": AdapterSpec("sd1", SHRINK, "full"),
    "sdxl-full": AdapterSpec("sdxl", SHRINK, "full"),
    "sd1-lora-dora": AdapterSpec("sd1", SHRINK, "lora", convs=True, dora=True),
    "sd2-loha-dora": AdapterSpec("sd2", SHRINK, "loha", dora=True),
    "sd1-peft": AdapterSpec("sd1", SHRINK, "lora", naming="peft", alpha=None),
    "sdxl-peft": AdapterSpec("sdxl", SHRINK, "lora", naming="peft", alpha=None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_baking_matches_numpy(variant: str, family_models: dict[str, Path], tmp_path: Path) -> None:
    spec = VARIANTS[variant]
    adapter = write_adapter(tmp_path / "adapter.safetensors", spec)
    built = bake(tmp_path, family_models[spec.family], adapter)
    base = load_file(family_models[spec.family])
    expected = expected_bake(spec.family, base, load_file(adapter), STRENGTH)
    changed = 0
    for key, value in built.items():
        if not np.issubdtype(base[key].dtype, np.floating):
            continue
        np.testing.assert_allclose(value, expected[key], rtol=2e-5, atol=2e-6, err_msg=key)
        changed += not np.array_equal(value, base[key].astype(np.float32))
    assert changed > 50  # the adapter reached the model, not just nothing


def test_deltas_match_lycoris_functional(family_models: dict[str, Path], tmp_path: Path) -> None:
    """Every LoRA, LoHa and LoKr form against LyCORIS' own functional API."""
    functional = pytest.importorskip("lycoris.functional")
    from sdrecipe.io.adapter_reader import AdapterReader
    from sdrecipe.io.readers import open_adapter, open_model

    base = open_model(family_models["sd1"])
    compared = set()
    for algorithm in ("lora", "loha", "lokr"):
        spec = AdapterSpec("sd1", SHRINK, algorithm, convs=True, tucker=True, alpha=3.0)
        path = write_adapter(tmp_path / f"{algorithm}.safetensors", spec)
        reader = AdapterReader(open_adapter(path), base.infos(), base, "sd1")
        tensors = {k: torch.from_numpy(v).float() for k, v in load_file(path).items()}
        for key, patches in reader._patches.items():
            module = patches[0].module
            p = {name: tensors[file_key] for name, file_key in module.keys.items()}
            if algorithm == "lora":
                rank = p["lora_down.weight"].shape[0]
                expected = functional.locon.diff_weight(
                    p["lora_down.weight"],
                    p["lora_up.weight"],
                    p.get("lora_mid.weight"),
                    gamma=3.0 / rank,
                )
            elif algorithm == "loha":
                rank = p["hada_w1_b"].shape[0]
                expected = functional.loha.diff_weight(
                    p["hada_w1_b"],
                    p["hada_w1_a"],
                    p["hada_w2_b"],
                    p["hada_w2_a"],
                    p.get("hada_t1"),
                    p.get("hada_t2"),
                    gamma=3.0 / rank,
                )
            else:
                names = (
                    "lokr_w1",
                    "lokr_w1_a",
                    "lokr_w1_b",
                    "lokr_w2",
                    "lokr_w2_a",
                    "lokr_w2_b",
                    "lokr_t2",
                )
                factors = [p.get(name) for name in names]
                # functional.lokr divides gamma by w1_a's or w2_a's dim 1: the rank, except
                # in CP form, where w2_a is [rank, rows]; give it alpha scaled to match.
                gamma = 3.0
                if "lokr_t2" in p:
                    gamma = 3.0 * p["lokr_w2_a"].shape[1] / p["lokr_w2_b"].shape[0]
                expected = functional.lokr.diff_weight(*factors, gamma=gamma)
                compared.add(("lokr", "lokr_w1_a" in p, "lokr_w2_a" in p, "lokr_t2" in p))
            got = reader.tensor(key)
            torch.testing.assert_close(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-6)
    # both halves whole, the first a product, the second a product, and its CP form
    assert {c[1:] for c in compared} >= {
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (False, True, True),
    }


def test_two_adapters_where_only_one_patches_a_key(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    """A key the second adapter leaves alone still gets the first one's delta."""
    base_path = family_models["sd1"]
    full = write_adapter(
        tmp_path / "full.safetensors", AdapterSpec("sd1", SHRINK, "lora", convs=True)
    )
    unet_only = {
        k: v
        for k, v in load_file(
            write_adapter(tmp_path / "x.safetensors", AdapterSpec("sd1", SHRINK, "lora", seed=3))
        ).items()
        if k.startswith("lora_unet")
    }
    partial = tmp_path / "partial.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in unet_only.items()}, partial)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {base_path}, L1: {full}, L2: {partial}}}
        nodes: {{baked: A + 0.7 * L1 + 0.3 * L2}}
        outputs: {{baked: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    assert run_in_process("build", str(recipe)).returncode == 0
    built = load_file(tmp_path / "out.safetensors")
    base = load_file(base_path)
    first = expected_bake("sd1", base, load_file(full), 0.7)
    both = {k: v for k, v in first.items()}
    second = expected_bake("sd1", base, unet_only, 0.3)
    for key in both:
        if np.issubdtype(base[key].dtype, np.floating):
            both[key] = first[key] + second[key] - base[key].astype(np.float64)
    text_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    resnet_key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    for key in (text_key, resnet_key, "model.diffusion_model.input_blocks.1.1.proj_in.weight"):
        np.testing.assert_allclose(built[key], both[key], rtol=2e-5, atol=2e-6)
    assert not np.array_equal(built[text_key], base[text_key].astype(np.float32))


def test_fused_projection_gets_its_slices_and_zero_for_a_missing_one(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    spec = AdapterSpec("sd2", SHRINK, "lora")
    tensors = load_file(write_adapter(tmp_path / "all.safetensors", spec))
    without_k = {k: v for k, v in tensors.items() if "_k_proj" not in k}
    adapter = tmp_path / "no_k.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in without_k.items()}, adapter)
    built = bake(tmp_path, family_models["sd2"], adapter)
    base = load_file(family_models["sd2"])
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    width = base[key].shape[0] // 3
    np.testing.assert_array_equal(
        built[key][width : 2 * width], base[key][width : 2 * width].astype(np.float32)
    )
    assert not np.array_equal(built[key][:width], base[key][:width].astype(np.float32))
    expected = expected_bake("sd2", base, without_k, STRENGTH)
    np.testing.assert_allclose(built[key], expected[key], rtol=2e-5, atol=2e-6)


def test_inpainting_base_gets_the_delta_on_its_leading_channels(
    models: dict[str, Path], tmp_path: Path
) -> None:
    rank, channels = 2, 4
    rows = load_file(models["inpainting"])[UNET_IN].shape[0]
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(rank, channels, 3, 3, generator=generator)
    up = torch.randn(rows, rank, 1, 1, generator=generator)
    adapter = tmp_path / "conv_in.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": down,
            "lora_unet_conv_in.lora_up.weight": up,
            "lora_unet_conv_in.alpha": torch.tensor(1.0),
        },
        adapter,
    )
    built = bake(tmp_path, models["inpainting"], adapter)
    base = load_file(models["inpainting"])[UNET_IN].astype(np.float64)
    delta = (up.reshape(rows, rank).double() @ down.reshape(rank, -1).double()).numpy() / rank
    expected = base.copy()
    expected[:, :channels] += STRENGTH * delta.reshape(rows, channels, 3, 3)
    np.testing.assert_allclose(built[UNET_IN], expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(
        built[UNET_IN][:, channels:], base[:, channels:].astype(np.float32)
    )


def test_unmatched_modules_are_refused_unless_allowed(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    tensors = load_file(
        write_adapter(tmp_path / "a.safetensors", AdapterSpec("sd1", SHRINK, "lora"))
    )
    tensors["lora_unet_nowhere_to_q.lora_down.weight"] = np.ones((2, 10), np.float16)
    tensors["lora_unet_nowhere_to_q.lora_up.weight"] = np.ones((10, 2), np.float16)
    adapter = tmp_path / "extra.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, adapter)
    text = f"""
        inputs: {{A: {family_models["sd1"]}, L: {adapter}}}
        nodes:
          baked: {{expression: A + L{{allow}}}}
        outputs: {{baked: out.safetensors}}
        """
    recipe = write_recipe(tmp_path, text.replace("{allow}", ""))
    refused = run_in_process("build", str(recipe))
    assert refused.returncode == 2
    assert "1 of the adapter's" in refused.stderr and "lora_unet_nowhere_to_q" in refused.stderr
    assert "allow_unmatched: true" in refused.stderr and not (tmp_path / "out.safetensors").exists()
    recipe = write_recipe(tmp_path, text.replace("{allow}", ", allow_unmatched: true"))
    assert run_in_process("build", str(recipe)).returncode == 0


def test_adapter_for_another_family_is_refused(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "sd1.safetensors", AdapterSpec("sd1", SHRINK, "lora"))
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {family_models["sd2"]}, L: {adapter}}}
        nodes: {{baked: A + L}}
        outputs: {{baked: out.safetensors}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "does not fit a sd2 model" in result.stderr and "like a sd1" in result.stderr
    assert "input 'L'" in result.stderr and "Traceback" not in result.stderr


def test_unsupported_algorithm_is_named(family_models: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "ia3.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.weight": torch.ones(10), f"{stem}.on_input": torch.tensor(0)}, adapter)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {family_models["sd1"]}, L: {adapter}}}
        nodes: {{baked: A + L}}
        outputs: {{baked: out.safetensors}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert (
        result.returncode == 2 and "(IA)^3" in result.stderr and "ia3.safetensors" in result.stderr
    )


def test_lora_block_weights(family_models: dict[str, Path], tmp_path: Path) -> None:
    """17 LBW values: BASE (text encoder) 0, IN01 1, OUT11 0.5; unlisted blocks 0."""
    adapter = write_adapter(
        tmp_path / "a.safetensors", AdapterSpec("sd1", SHRINK, "lora", convs=True)
    )
    weights = ["0"] * 17
    weights[1], weights[16] = "1", "0.5"
    built = bake(
        tmp_path, family_models["sd1"], adapter, f"A + scale(L, alpha='{','.join(weights)}')"
    )
    base = load_file(family_models["sd1"])
    full = expected_bake("sd1", base, load_file(adapter), 1.0)
    half = expected_bake("sd1", base, load_file(adapter), 0.5)
    checks = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": full,  # IN01
        "model.diffusion_model.output_blocks.11.1.proj_in.weight": half,  # OUT11
        "model.diffusion_model.input_blocks.3.0.op.weight": None,  # IN03, not in the 17
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": full,  # IN01 resnet
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": None,  # BASE
    }
    for key, expected in checks.items():
        wanted = base[key].astype(np.float32) if expected is None else expected[key]
        np.testing.assert_allclose(built[key], wanted, rtol=2e-5, atol=2e-6, err_msg=key)


def test_changed_adapter_rebuilds_and_unchanged_is_up_to_date(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("sd1", SHRINK, "lora"))
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {family_models["sd1"]}, L: {adapter}}}
        nodes: {{baked: A + 0.5 * L}}
        outputs: {{baked: out.safetensors}}
        """,
    )
    assert run_in_process("build", str(recipe)).returncode == 0
    first = (tmp_path / "out.safetensors").read_bytes()
    again = run_in_process("build", "--json", str(recipe))
    assert json.loads(again.stdout)["outputs"][0]["result"] == "up to date"
    write_adapter(adapter, AdapterSpec("sd1", SHRINK, "lora", seed=9))
    assert run_in_process("build", str(recipe)).returncode == 0
    assert (tmp_path / "out.safetensors").read_bytes() != first


def test_inspect_reports_an_adapter(tmp_path: Path, family_models: dict[str, Path]) -> None:
    adapter = write_adapter(tmp_path / "a.safetensors", AdapterSpec("sdxl", SHRINK, "loha", rank=3))
    result = invoke("inspect", "--json", str(adapter), "--against", str(family_models["sdxl"]))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "lora"
    assert report["adapter"]["algorithms"] == {"loha": 986}
    assert report["adapter"]["ranks"] == [3] and report["adapter"]["alphas"] == [2.0]
    assert report["adapter"]["family"] == "sdxl"
    assert report["adapter"]["matched"] == 986 and report["adapter"]["unmatched"] == []
