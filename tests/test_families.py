"""Model families as data: the family files, detection of every variant, Flux.1
and SD3/SD3.5 block tables, merges, the Fill transplant and the refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import run_in_process, write_recipe
from sdrecipe.arch import component_of
from sdrecipe.arch.blocks import block_ids, block_of, listed_block_ids
from sdrecipe.arch.detect import detect
from sdrecipe.arch.family import families, family, family_by_name
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.synthetic import ModelSpec, model_layout, write_model

SHRINK = 64
FLUX = "model.diffusion_model."


def _infos(spec: ModelSpec) -> dict[str, TensorInfo]:
    return model_layout(spec)


def test_every_family_file_loads_and_names_itself():
    names = {data.name for data in families()}
    assert {"sd1", "sd2", "sdxl", "sdxl-refiner", "flux1", "sd3", "sd35-medium"} <= names
    assert {"sd35-large", "chroma", "vae16", "t5xxl", "clip-l", "clip-g"} <= names
    assert family_by_name("flux").name == "flux1"
    # An alias is the family's own: chroma extends flux1 without taking `flux`.
    assert family("chroma").aliases == ()


def test_sd_block_tables_are_supermergers():
    sd = ["BASE", *(f"IN{n:02}" for n in range(12)), "M00", *(f"OUT{n:02}" for n in range(12))]
    assert block_ids("sd1") == block_ids("sd2") == tuple(sd)
    xl = ["BASE", *(f"IN{n:02}" for n in range(9)), "M00", *(f"OUT{n:02}" for n in range(9))]
    assert block_ids("sdxl") == (*xl, "VAE")
    assert listed_block_ids("sdxl") == tuple(xl)
    assert block_ids("sdxl-refiner") == ()


def test_flux_block_table_is_supermergers_61():
    ids = ["CLIP", "T5", "IN", *(f"D{n:02}" for n in range(19))]
    ids += [*(f"S{n:02}" for n in range(38)), "OUT"]
    assert listed_block_ids("flux1") == tuple(ids)
    assert len(ids) == 61
    joint = ["CLIP", "T5", "IN", *(f"J{n:02}" for n in range(24)), "OUT"]
    assert listed_block_ids("sd3") == listed_block_ids("sd35-medium") == tuple(joint)
    large = ["CLIP", "T5", "IN", *(f"J{n:02}" for n in range(38)), "OUT"]
    assert listed_block_ids("sd35-large") == tuple(large)


def _flux_block(key: str) -> str | None:
    """supermerger's `blockfromkey` for Flux, written out independently."""
    if "vae" in key:
        return "VAE"
    if "t5xxl" in key:
        return "T5"
    if "text_encoders.clip" in key:
        return "CLIP"
    number = re.search(r"\.(\d+)\.", key)
    if "double_blocks" in key and number:
        return f"D{int(number[1]):02}"
    if "single_blocks" in key and number:
        return f"S{int(number[1]):02}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return None


@pytest.mark.parametrize("layout", ["flux1-dev", "flux1-dev-aio", "flux1-schnell"])
def test_flux_keys_go_to_supermergers_blocks(layout):
    keys = list(_infos(ModelSpec(family="flux1", layout=layout, shrink=SHRINK)))
    assert all(block_of("flux1", key) == _flux_block(key) for key in keys)
    counts = {block: sum(block_of("flux1", k) == block for k in keys) for block in ("D00", "S37")}
    assert counts == {"D00": 24, "S37": 8}


def test_sd3_keys_go_to_joint_blocks():
    keys = list(_infos(ModelSpec(family="sd35-large", shrink=SHRINK)))
    blocks = {key: block_of("sd35-large", key) for key in keys}
    assert blocks[FLUX + "pos_embed"] == "IN"
    assert blocks[FLUX + "joint_blocks.37.x_block.mlp.fc1.weight"] == "J37"
    assert blocks[FLUX + "final_layer.linear.weight"] == "OUT"
    assert blocks["first_stage_model.decoder.conv_in.weight"] == "VAE"
    assert sum(block == "J00" for block in blocks.values()) == 24
    assert sum(block == "J37" for block in blocks.values()) == 18  # the pre-only last block
    assert None not in blocks.values()


@pytest.mark.parametrize(
    ("spec", "described", "prefix"),
    [
        (ModelSpec(family="flux1"), "flux1 dev", ""),
        (ModelSpec(family="flux1", layout="flux1-schnell"), "flux1 schnell", ""),
        (ModelSpec(family="flux1", layout="flux1-dev-aio"), "flux1 dev", FLUX),
        (ModelSpec(family="flux1", variant="fill"), "flux1 dev fill", ""),
        (ModelSpec(family="flux1", variant="depth"), "flux1 dev depth", ""),
        (ModelSpec(family="flux1", layout="flux1-dev-aio", variant="fill"), "flux1 dev fill", FLUX),
        (ModelSpec(family="sd3"), "sd3", FLUX),
        (ModelSpec(family="sd35-medium"), "sd35-medium", FLUX),
        (ModelSpec(family="sd35-large"), "sd35-large", FLUX),
        (ModelSpec(family="vae16"), "vae16", ""),
        (ModelSpec(family="t5xxl"), "t5xxl", ""),
        (ModelSpec(family="clip-l"), "clip-l", ""),
        (ModelSpec(family="sd1", variant="inpainting"), "sd1 inpainting", FLUX),
        (ModelSpec(family="sdxl"), "sdxl", FLUX),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_detection_of_every_variant(spec, described, prefix):
    import dataclasses

    infos = _infos(dataclasses.replace(spec, shrink=SHRINK))
    architecture = detect(infos, {})
    assert architecture.describe() == described
    assert architecture.model_prefix == prefix


def test_chroma_and_bare_transformers_are_told_apart():
    dev = _infos(ModelSpec(family="flux1", shrink=SHRINK))
    chroma = {
        key: info
        for key, info in dev.items()
        if not key.startswith(("time_in.", "vector_in.", "guidance_in."))
    }
    chroma["distilled_guidance_layer.in_proj.weight"] = TensorInfo(torch.bfloat16, (160, 64))
    assert detect(chroma, {}).family == "chroma"
    # SD3 (no q/k norms) and SD3.5 Medium (q/k norms, attn2), bare as well as prefixed.
    bare = {
        key.removeprefix(FLUX): info
        for key, info in _infos(ModelSpec(family="sd35-medium", shrink=SHRINK)).items()
        if key.startswith(FLUX)
    }
    assert detect(bare, {}).family == "sd35-medium"
    clip_g = {
        f"text_model.encoder.layers.{n}.mlp.fc1.weight": TensorInfo(torch.float16, (80, 40))
        for n in range(32)
    }
    clip_g["text_model.final_layer_norm.weight"] = TensorInfo(torch.float16, (40,))
    assert detect(clip_g, {}).family == "clip-g"


def test_components_follow_the_family():
    assert component_of(FLUX + "img_in.weight", "flux1") == "transformer"
    assert component_of("img_in.weight", "flux1") == "transformer"
    assert component_of("text_encoders.t5xxl.transformer.shared.weight", "flux1") == (
        "text_encoder_2"
    )
    assert component_of("text_encoders.t5xxl.transformer.shared.weight", "sd3") == (
        "text_encoder_3"
    )
    assert component_of("vae.decoder.conv_in.weight", "flux1") == "vae"
    assert component_of(FLUX + "input_blocks.0.0.weight", "sd1") == "unet"


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flux")
    specs = {
        "fill": ModelSpec(family="flux1", variant="fill", seed=11, shrink=SHRINK),
        "dev": ModelSpec(family="flux1", seed=12, shrink=SHRINK),
        "mine": ModelSpec(family="flux1", seed=12, delta_seed=13, shrink=SHRINK),
        "schnell": ModelSpec(family="flux1", layout="flux1-schnell", seed=14, shrink=SHRINK),
        "sd35": ModelSpec(family="sd35-medium", seed=15, shrink=SHRINK),
        "sd3": ModelSpec(family="sd3", seed=16, shrink=SHRINK),
        "aio": ModelSpec(family="flux1", layout="flux1-dev-aio", seed=17, shrink=SHRINK),
        "aio2": ModelSpec(family="flux1", layout="flux1-dev-aio", seed=19, shrink=SHRINK),
        "ae": ModelSpec(family="vae16", seed=18, shrink=SHRINK, dtype=torch.float32),
    }
    return {name: write_model(folder / f"{name}.safetensors", spec) for name, spec in specs.items()}


def test_flux_fill_transplant_matches_numpy(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          FluxFill: {flux_models["fill"]}
          MyFlux: {flux_models["mine"]}
          FluxDev: {flux_models["dev"]}
        nodes:
          fill: FluxFill + (MyFlux - FluxDev)
        outputs:
          fill: {{path: out.safetensors, dtype: float32}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    a, b, c = (load_file(flux_models[n]) for n in ("fill", "mine", "dev"))
    f32 = {
        name: {k: v.astype(np.float32) for k, v in m.items()}
        for name, m in zip("abc", (a, b, c), strict=True)
    }
    img_in = out["img_in.weight"]
    assert img_in.shape[1] == 384
    expected = f32["a"]["img_in.weight"].copy()
    expected[:, :64] += f32["b"]["img_in.weight"] - f32["c"]["img_in.weight"]
    np.testing.assert_allclose(img_in, expected, rtol=1e-6, atol=1e-7)
    # The 320 conditioning columns are the Fill model's, bit for bit.
    np.testing.assert_array_equal(img_in[:, 64:], f32["a"]["img_in.weight"][:, 64:])
    for key in ("double_blocks.3.img_attn.qkv.weight", "final_layer.linear.weight"):
        np.testing.assert_allclose(
            out[key], f32["a"][key] + (f32["b"][key] - f32["c"][key]), rtol=1e-6, atol=1e-7
        )
    inspected = json.loads(
        run_in_process("inspect", "--json", str(tmp_path / "out.safetensors")).stdout
    )
    assert (inspected["family"], inspected["variant"], inspected["kind"]) == (
        "flux1",
        "fill",
        "dev",
    )
    assert inspected["components"]["transformer"]["keys"] == 780
    assert inspected["modelspec_architecture"] == "flux-1-dev"
    with safe_open(tmp_path / "out.safetensors", "np") as written:
        assert written.metadata()["modelspec.architecture"] == "flux-1-dev"


def test_a_fill_model_other_than_the_base_is_refused(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          MyFlux: {flux_models["mine"]}
          FluxFill: {flux_models["fill"]}
          FluxDev: {flux_models["dev"]}
        nodes:
          fill: MyFlux + (FluxFill - FluxDev)
        outputs:
          fill: out.safetensors
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "img_in.weight" in result.stderr
    assert "Fill model must be the first (base) model" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_flux_block_weights_match_numpy(flux_models, tmp_path):
    values = [round(0.01 * n, 2) for n in range(61)]
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {flux_models["dev"]}
          B: {flux_models["mine"]}
        nodes:
          blend: {{method: weighted_sum, models: [A, B], alpha: {values}}}
        outputs:
          blend: {{path: out.safetensors, dtype: float32}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    a, b = load_file(flux_models["dev"]), load_file(flux_models["mine"])
    ids = ["CLIP", "T5", "IN", *(f"D{n:02}" for n in range(19))]
    ids += [*(f"S{n:02}" for n in range(38)), "OUT"]
    alpha = dict(zip(ids, values, strict=True))
    for key, merged in out.items():
        weight = alpha[_flux_block(key)]
        expected = (1 - weight) * a[key].astype(np.float32) + weight * b[key].astype(np.float32)
        np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_flux_block_ranges_and_globs(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {flux_models["dev"]}
          B: {flux_models["mine"]}
        nodes:
          blend:
            method: weighted_sum
            models: [A, B]
            alpha: {{D00-D09: 1.0, "S*": 0.5, default: 0.0}}
        outputs:
          blend: {{path: out.safetensors, dtype: float32}}
        """,
    )
    assert run_in_process("build", str(recipe)).returncode == 0
    out = load_file(tmp_path / "out.safetensors")
    b = load_file(flux_models["mine"])
    a = load_file(flux_models["dev"])
    np.testing.assert_array_equal(
        out["double_blocks.9.txt_mlp.0.weight"],
        b["double_blocks.9.txt_mlp.0.weight"].astype(np.float32),
    )
    np.testing.assert_array_equal(
        out["double_blocks.10.txt_mlp.0.weight"],
        a["double_blocks.10.txt_mlp.0.weight"].astype(np.float32),
    )
    half = 0.5 * a["single_blocks.0.linear1.weight"].astype(np.float32) + 0.5 * b[
        "single_blocks.0.linear1.weight"
    ].astype(np.float32)
    np.testing.assert_allclose(out["single_blocks.0.linear1.weight"], half, rtol=1e-6)


def test_a_list_of_the_wrong_family_is_refused(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {flux_models["dev"]}
          B: {flux_models["mine"]}
        nodes:
          blend: {{method: weighted_sum, models: [A, B], alpha: GRAD_V}}
        outputs:
          blend: out.safetensors
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "flux1" in result.stderr and "61 values" in result.stderr


@pytest.mark.parametrize(
    ("first", "second", "named", "forced_exit"),
    [
        ("dev", "sd35", ("flux1", "sd35-medium"), 0),
        # Forced, the keys both have still merge only where the shapes agree.
        ("sd35", "sd3", ("sd35-medium", "sd3"), 2),
    ],
)
def test_cross_family_merges_are_refused_unless_forced(
    flux_models, tmp_path, first, second, named, forced_exit
):
    text = f"""
        inputs:
          A: {flux_models[first]}
          B: {flux_models[second]}
        nodes:
          blend: {{method: weighted_sum, models: [A, B], alpha: 0.5}}
        outputs:
          blend: out.safetensors
        """
    recipe = write_recipe(tmp_path, text)
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert all(name in result.stderr for name in named)
    assert "mixes architectures" in result.stderr
    forced = run_in_process("build", "--force", str(recipe))
    assert forced.returncode == forced_exit, forced.stderr
    if forced_exit:
        assert "adaLN_modulation.1.weight: shapes differ" in forced.stderr


def test_dev_and_schnell_merge_keeping_the_guidance_layers_of_the_base(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          Dev: {flux_models["dev"]}
          Schnell: {flux_models["schnell"]}
        nodes:
          blend: {{method: weighted_sum, models: [Dev, Schnell], alpha: 0.5}}
        outputs:
          blend: out.safetensors
        """,
    )
    assert run_in_process("build", str(recipe)).returncode == 0
    out = load_file(tmp_path / "out.safetensors")
    dev = load_file(flux_models["dev"])
    np.testing.assert_array_equal(
        out["guidance_in.in_layer.weight"], dev["guidance_in.in_layer.weight"]
    )
    assert len(out) == 780


def test_ae_baked_into_a_flux_checkpoint_under_its_vae_prefix(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {flux_models["aio"]}
          AE: {flux_models["ae"]}
        nodes:
          copy: {{method: weighted_sum, models: [A, A], alpha: 0.5}}
        outputs:
          copy: {{path: out.safetensors, vae: AE}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    ae = load_file(flux_models["ae"])
    assert not any(key.startswith("first_stage_model.") for key in out)
    np.testing.assert_array_equal(
        out["vae.decoder.conv_in.weight"], ae["decoder.conv_in.weight"].astype(np.float16)
    )
    assert len(out) == 1442


def test_blocks_command_lists_flux_and_sd35(tmp_path):
    flux = json.loads(run_in_process("blocks", "--json", "flux").stdout)
    assert flux["family"] == "flux1"
    blocks = flux["blocks"]
    assert (blocks["IN"]["keys"], blocks["D00"]["keys"], blocks["S00"]["keys"]) == (16, 24, 8)
    assert blocks["OUT"]["keys"] == 4
    assert sum(entry["parameters"] for entry in blocks.values()) == 11_901_408_320
    large = json.loads(run_in_process("blocks", "--json", "sd35-large").stdout)
    assert large["blocks"]["J37"]["keys"] == 18
    assert large["blocks"]["VAE"]["keys"] == 244


def test_inspect_reports_flux_and_sd3(flux_models):
    flux = json.loads(run_in_process("inspect", "--json", str(flux_models["aio"])).stdout)
    assert flux["family"] == "flux1" and flux["modelspec_architecture"] == "flux-1-dev"
    assert set(flux["components"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    schnell = json.loads(run_in_process("inspect", "--json", str(flux_models["schnell"])).stdout)
    assert (schnell["kind"], schnell["modelspec_architecture"]) == ("schnell", "flux-1-schnell")
    sd3 = json.loads(run_in_process("inspect", "--json", str(flux_models["sd3"])).stdout)
    assert sd3["family"] == "sd3" and set(sd3["components"]) == {"transformer", "vae"}


def test_only_selects_a_flux_component(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {flux_models["aio"]}
          B: {flux_models["aio2"]}
        nodes:
          blend: {{method: weighted_sum, models: [A, B], alpha: 1.0, only: [text_encoder_2]}}
        outputs:
          blend: out.safetensors
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    out, a, b = (
        load_file(p)
        for p in (tmp_path / "out.safetensors", flux_models["aio"], flux_models["aio2"])
    )
    for key, value in out.items():
        expected = b[key] if key.startswith("text_encoders.t5xxl.") else a[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)


def test_init_writes_a_flux_fill_recipe_and_refuses_a_dev_model_as_a(flux_models, tmp_path):
    out = tmp_path / "recipes" / "fill.yaml"
    flags = ["--finetune", str(flux_models["mine"]), "--base", str(flux_models["dev"])]
    wrong = run_in_process(
        "init", "--template", "flux-fill", "--fill", str(flux_models["dev"]), *flags,
        "--out", str(out),
    )  # fmt: skip
    assert wrong.returncode == 2
    assert "is flux1 normal, not a fill model" in wrong.stderr
    assert not out.exists()
    made = run_in_process(
        "init", "--template", "flux-fill", "--fill", str(flux_models["fill"]), *flags,
        "--out", str(out), "--output-model", str(tmp_path / "build" / "fill.safetensors"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "flux1 fill" in made.stdout
    built = run_in_process("build", str(out))
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "build" / "fill.safetensors").exists()


def test_diff_reports_flux_blocks(flux_models, tmp_path):
    result = run_in_process(
        "diff", "--json", "--cache-dir", str(tmp_path / "c"),
        str(flux_models["dev"]), str(flux_models["mine"]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "flux1"
    blocks = report["models"][0]["blocks"]
    assert (blocks["D00"]["keys"], blocks["S37"]["keys"], blocks["IN"]["keys"]) == (24, 8, 16)


@pytest.mark.parametrize("encoder", ["t5xxl", "clip-l"])
def test_a_text_encoder_file_merges_on_its_own(tmp_path, encoder):
    a = write_model(tmp_path / "a.safetensors", ModelSpec(family=encoder, seed=1, shrink=SHRINK))
    b = write_model(tmp_path / "b.safetensors", ModelSpec(family=encoder, seed=2, shrink=SHRINK))
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {a}, B: {b}}}
        nodes:
          blend: {{method: weighted_sum, models: [A, B], alpha: 0.25}}
        outputs:
          blend: {{path: out.safetensors, dtype: float32}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    out, left, right = (load_file(p) for p in (tmp_path / "out.safetensors", a, b))
    assert set(out) == set(left)
    for key in list(out)[:20]:
        expected = 0.75 * left[key].astype(np.float32) + 0.25 * right[key].astype(np.float32)
        np.testing.assert_allclose(out[key], expected, rtol=1e-6, err_msg=key)
    inspected = json.loads(run_in_process("inspect", "--json", str(a)).stdout)
    assert inspected["family"] == encoder
    assert set(inspected["components"]) == {"text_encoder"}


@pytest.mark.parametrize(
    "node",
    [
        "{method: weighted_sum, models: [A, B], alpha: 0.5, only: [unet]}",
        "{method: weighted_sum, models: [A, B], alpha: {unet: 1.0, default: 0.5}}",
    ],
)
def test_a_component_the_family_lacks_is_refused(flux_models, tmp_path, node):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {flux_models["dev"]}, B: {flux_models["mine"]}}}
        nodes:
          blend: {node}
        outputs:
          blend: out.safetensors
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "unet, which its base model's family, flux1, does not have" in result.stderr
    assert "transformer" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("base", ["aio", "bare"])
def test_a_bfl_file_and_an_all_in_one_checkpoint_merge_key_by_key(flux_models, tmp_path, base):
    bare = flux_models["mine"]
    aio = write_model(
        tmp_path / "aio.safetensors",
        ModelSpec(family="flux1", layout="flux1-dev-aio", seed=12, shrink=SHRINK),
    )
    a, b = (aio, bare) if base == "aio" else (bare, aio)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {a}, B: {b}}}
        nodes:
          blend: {{method: weighted_sum, models: [A, B], alpha: 1.0}}
        outputs:
          blend: out.safetensors
        """,
    )
    for _ in range(2):  # the second time, the inputs' fingerprints come from the cache
        result = run_in_process("build", "--force", str(recipe))
        assert result.returncode == 0, result.stderr
        out = load_file(tmp_path / "out.safetensors")
        prefix = FLUX if base == "aio" else ""
        assert len(out) == (1442 if base == "aio" else 780)
        # alpha 1: every transformer key is the second model's, whatever its prefix.
        source = load_file(b)
        for key in (
            "img_in.weight",
            "double_blocks.0.img_attn.qkv.weight",
            "final_layer.linear.bias",
        ):
            stored = FLUX + key if base == "bare" else key
            np.testing.assert_array_equal(out[prefix + key], source[stored])


def test_a_second_fill_model_is_refused_rather_than_cut(flux_models, tmp_path):
    other_fill = write_model(
        tmp_path / "fill2.safetensors",
        ModelSpec(family="flux1", variant="fill", seed=21, shrink=SHRINK),
    )
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {flux_models["fill"]}, B: {other_fill}, C: {flux_models["dev"]}}}
        nodes:
          fill: A + (B - C)
        outputs:
          fill: out.safetensors
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "img_in.weight: B has 384 input channels" in result.stderr
    assert "320 would be dropped" in result.stderr


def test_a_lora_is_not_extracted_from_a_family_without_module_names(flux_models, tmp_path):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {flux_models["ae"]}, B: {flux_models["ae"]}}}
        nodes:
          learned: A - B
        outputs:
          learned: {{path: lora.safetensors, format: lora, rank: 4}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "no layer of A (vae16) has a LoRA module name" in result.stderr
    assert not (tmp_path / "lora.safetensors").exists()


def test_diff_lines_up_a_bfl_file_with_an_all_in_one_checkpoint(flux_models, tmp_path):
    result = run_in_process(
        "diff", "--json", "--cache-dir", str(tmp_path / "c"),
        str(flux_models["dev"]), str(flux_models["aio"]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    compared = json.loads(result.stdout)["models"][0]
    assert compared["total"]["keys"] == 780
