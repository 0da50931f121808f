"""Adapters and LoRA extraction given hostile or broken input: factors that do
not fit together or promise unbounded work, non-finite values, and the one-shot
commands' arguments (issue 26's items 5, 10, 12, 15, 17 and 21)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from sdrecipe.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model
from tests.conftest import SHRINK, run_in_process, write_recipe
from tests.test_adapters import expected_bake

# A 10x10 linear layer of the SD1 fixture models, and the key it patches.
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
LINEAR_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
PEFT_LINEAR = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def broken_adapter(
    tmp_path: Path,
    spec: AdapterSpec,
    changes: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    name: str = "broken",
) -> Path:
    """The synthetic adapter of `spec` with `changes` (file key → tensor) made."""
    path = write_adapter(tmp_path / "made.safetensors", spec)
    tensors = {**load_file(path), **changes}
    broken = tmp_path / f"{name}.safetensors"
    save_file(tensors, broken, metadata=metadata)
    return broken


def bake_recipe(tmp_path: Path, base: Path, adapter: Path) -> Path:
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {base}, L: {adapter}}}
        nodes: {{baked: "A + 0.7 * L"}}
        outputs: {{baked: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *named: str) -> None:
    """Exit 2, one paragraph naming each of `named`, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for name in named:
        assert name in result.stderr, (name, result.stderr)


# --- item 5: non-finite alphas are refused as input, at validate time too ----------------

NON_FINITE_ALPHAS = {
    "kohya-nan": (AdapterSpec("sd1", SHRINK), {f"{LINEAR}.alpha": torch.tensor(float("nan"))}, {}),
    "kohya-inf": (AdapterSpec("sd1", SHRINK), {f"{LINEAR}.alpha": torch.tensor(float("-inf"))}, {}),
    "peft-1e308": (
        AdapterSpec("sd1", SHRINK, naming="peft", alpha=None),
        {},
        {"lora_adapter_metadata": json.dumps({"lora_alpha": 1e308, "r": 4})},
    ),
}


@pytest.mark.parametrize("case", list(NON_FINITE_ALPHAS))
def test_a_non_finite_alpha_is_refused_by_validate_and_build(
    case: str, models: dict[str, Path], tmp_path: Path
) -> None:
    spec, changes, metadata = NON_FINITE_ALPHAS[case]
    adapter = broken_adapter(tmp_path, spec, changes, metadata)
    recipe = bake_recipe(tmp_path, models["base"], adapter)
    named = (str(adapter), LINEAR if case.startswith("kohya") else "lora_alpha")
    assert_refused(run_in_process("validate", str(recipe)), *named)
    assert_refused(run_in_process("build", str(recipe)), *named)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_factor_holding_nan_is_refused_naming_its_module(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Factor values are read when the build computes the delta: still exit 2,
    naming the module and factor, and nothing is written (DoRA's magnitude too)."""
    spec = AdapterSpec("sd1", SHRINK, dora=True)
    magnitude = load_file(write_adapter(tmp_path / "dora.safetensors", spec))[
        f"{LINEAR}.dora_scale"
    ]
    for parameter, tensor in (
        ("lora_up.weight", torch.full((10, 4), float("nan"), dtype=torch.float16)),
        ("dora_scale", torch.full_like(magnitude, float("inf"))),
    ):
        changes = {f"{LINEAR}.{parameter}": tensor}
        adapter = broken_adapter(tmp_path, spec, changes, name=parameter)
        result = run_in_process("build", str(bake_recipe(tmp_path, models["base"], adapter)))
        assert_refused(result, str(adapter), LINEAR, parameter)
        assert not (tmp_path / "out.safetensors").exists()


def test_finite_factors_whose_delta_overflows_fail_the_build(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """alpha 3e38 is finite in float32; (alpha/r)·up is not: exit 1, nothing written."""
    changes = {
        f"{LINEAR}.alpha": torch.tensor(3e38),
        f"{LINEAR}.lora_up.weight": torch.full((10, 4), 100.0, dtype=torch.float16),
    }
    adapter = broken_adapter(tmp_path, AdapterSpec("sd1", SHRINK), changes)
    recipe = bake_recipe(tmp_path, models["base"], adapter)
    assert run_in_process("validate", str(recipe)).returncode == 0
    result = run_in_process("build", str(recipe))
    assert result.returncode == 1, result.stderr
    assert LINEAR in result.stderr and LINEAR_KEY in result.stderr
    assert "from finite factors" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_extracted_factors_beyond_float16_fail_the_build(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """A difference of a million on a layer gives factors beyond float16 (the
    LoRA's dtype): exit 1, and no LoRA with infinities is written."""
    tuned = {key: value.astype(np.float32) for key, value in arrays["base"].items()}
    tuned[LINEAR_KEY] = tuned[LINEAR_KEY] + 1e6 * np.eye(10, dtype=np.float32)
    save_numpy(tuned, tmp_path / "tuned.safetensors")
    output = tmp_path / "lora.safetensors"
    result = run_in_process(
        "extract", str(tmp_path / "tuned.safetensors"), str(models["base"]), "-o", str(output)
    )
    assert result.returncode == 1, result.stderr
    assert LINEAR_KEY in result.stderr and "float16" in result.stderr
    assert not output.exists()


# --- items 10 and 12: factor shapes checked against each other and the layer ------------


def _lokr_module(spec: AdapterSpec) -> str:
    from sdrecipe.synthetic import adapter_tensors

    return next(k for k in adapter_tensors(spec) if k.endswith(".lokr_w1_a")).rsplit(".", 1)[0]


LOKR = AdapterSpec("sd1", SHRINK, "lokr")
HALF = torch.float16
SHAPE_CASES = {
    "ranks-disagree": (
        AdapterSpec("sd1", SHRINK),
        LINEAR,
        {
            f"{LINEAR}.lora_down.weight": torch.zeros(3, 10, dtype=HALF),
            f"{LINEAR}.lora_up.weight": torch.zeros(10, 4, dtype=HALF),
        },
        "lora_up.weight",
    ),
    "rank-0": (
        AdapterSpec("sd1", SHRINK),
        LINEAR,
        {
            f"{LINEAR}.lora_down.weight": torch.zeros(0, 10, dtype=HALF),
            f"{LINEAR}.lora_up.weight": torch.zeros(10, 0, dtype=HALF),
        },
        "rank 0",
    ),
    "alpha-of-two-values": (
        AdapterSpec("sd1", SHRINK),
        LINEAR,
        {f"{LINEAR}.alpha": torch.tensor([2.0, 2.0])},
        "alpha",
    ),
    "dora-scale-of-7-for-10-rows": (
        AdapterSpec("sd1", SHRINK, dora=True),
        LINEAR,
        {f"{LINEAR}.dora_scale": torch.ones(7, 1, dtype=HALF)},
        "dora_scale",
    ),
    "loha-ranks-disagree": (
        AdapterSpec("sd1", SHRINK, "loha"),
        LINEAR,
        {f"{LINEAR}.hada_w2_b": torch.zeros(5, 10, dtype=HALF)},
        "hada_w2_b",
    ),
    "lokr-ranks-disagree": (
        LOKR,
        _lokr_module(LOKR),
        {f"{_lokr_module(LOKR)}.lokr_w1_b": torch.zeros(3, 2, dtype=HALF)},
        "lokr_w1_b",
    ),
    "rank-far-above-the-layer": (
        AdapterSpec("sd1", SHRINK),
        LINEAR,
        {
            f"{LINEAR}.lora_down.weight": torch.zeros(1000, 10, dtype=HALF),
            f"{LINEAR}.lora_up.weight": torch.zeros(10, 1000, dtype=HALF),
        },
        "rank 1000",
    ),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_factors_that_do_not_fit_are_refused_by_validate(
    case: str, models: dict[str, Path], tmp_path: Path
) -> None:
    spec, module, changes, named = SHAPE_CASES[case]
    adapter = broken_adapter(tmp_path, spec, changes)
    recipe = bake_recipe(tmp_path, models["base"], adapter)
    assert_refused(run_in_process("validate", str(recipe)), str(adapter), module, named)
    assert_refused(run_in_process("build", str(recipe)), str(adapter), module, named)
    assert not (tmp_path / "out.safetensors").exists()


def test_peft_metadata_nested_past_32_levels_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    spec = AdapterSpec("sd1", SHRINK, naming="peft", alpha=None)
    adapter = broken_adapter(tmp_path, spec, {}, {"lora_adapter_metadata": nested})
    result = run_in_process("validate", str(bake_recipe(tmp_path, models["base"], adapter)))
    assert_refused(result, str(adapter), "lora_adapter_metadata", "32 levels")


# --- item 15: bake and extract with non-ASCII file names ---------------------------------


def test_bake_and_extract_take_non_ascii_file_names(
    models: dict[str, Path], tmp_path: Path
) -> None:
    base = str(shutil.copy(models["base"], tmp_path / "basé.safetensors"))
    tuned = str(shutil.copy(models["finetune"], tmp_path / "réglé_ü.safetensors"))
    style = write_adapter(tmp_path / "стиль_ü.safetensors", AdapterSpec("sd1", SHRINK))
    baked = run_in_process("bake", base, f"{style}=0.5", "-o", str(tmp_path / "baked.safetensors"))
    assert baked.returncode == 0, baked.stderr
    assert "baked: base + 0.5 * _u" in (tmp_path / "baked.recipe.yaml").read_text()
    learned = tmp_path / "learned.safetensors"
    extracted = run_in_process("extract", tuned, base, "-o", str(learned), "--rank", "2")
    assert extracted.returncode == 0, extracted.stderr
    assert "learned: regle_u - base" in (tmp_path / "learned.recipe.yaml").read_text()


# --- item 17: the one-shot commands say what is wrong -------------------------------------


def test_one_shot_commands_name_what_is_wrong(models: dict[str, Path], tmp_path: Path) -> None:
    base, tuned = str(models["base"]), str(models["finetune"])
    style = str(write_adapter(tmp_path / "style.safetensors", AdapterSpec("sd1", SHRINK)))
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    output = str(tmp_path / "out.safetensors")
    cases = [
        (("bake", base, f"{style}=nan"), "strength 'nan'", "not a finite number"),
        (("bake", base, tuned), tuned, "is a full model"),
        (("bake", base, str(empty)), str(empty), "no tensors"),
        (("bake", style, style), style, "is an adapter"),
        (("extract", style, base), style, "is an adapter"),
        (("extract", tuned, style), style, "is an adapter"),
    ]
    for args, *named in cases:
        result = run_in_process(*args, "-o", output)
        assert_refused(result, *named)
        assert "coefficients sum" not in result.stderr and "product" not in result.stderr
    assert not list(tmp_path.glob("*.recipe.yaml"))


def test_a_failed_one_shot_cites_the_command_not_the_removed_recipe(
    models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = broken_adapter(
        tmp_path, AdapterSpec("sd1", SHRINK), {f"{LINEAR}.alpha": torch.tensor(float("nan"))}
    )
    output = str(tmp_path / "baked.safetensors")
    result = run_in_process("bake", str(models["base"]), str(adapter), "-o", output, "--json")
    assert_refused(result, "sdrecipe bake", str(adapter), LINEAR)
    assert ".recipe.yaml" not in result.stderr
    assert json.loads(result.stdout)["error"].startswith("sdrecipe bake: ")
    assert not list(tmp_path.glob("*.recipe.yaml"))


def test_recipe_option_at_a_model_says_it_is_not_a_recipe(
    models: dict[str, Path], tmp_path: Path
) -> None:
    style = write_adapter(tmp_path / "style.safetensors", AdapterSpec("sd1", SHRINK))
    model = str(shutil.copy(models["finetune"], tmp_path / "model.safetensors"))
    before = Path(model).read_bytes()
    args = ["bake", str(models["base"]), str(style), "-o", str(tmp_path / "out.safetensors")]
    result = run_in_process(*args, "--recipe", model)
    assert_refused(result, model, "is not a recipe")
    assert "other settings" not in result.stderr
    assert Path(model).read_bytes() == before


def test_extract_records_the_ranks_it_used(models: dict[str, Path], tmp_path: Path) -> None:
    """--rank 100000 on layers of 10 to 40 rows: the metadata says the largest
    rank a layer got, as alpha does per module."""
    output = tmp_path / "learned.safetensors"
    args = ["extract", str(models["finetune"]), str(models["base"]), "-o", str(output)]
    result = run_in_process(*args, "--rank", "100000", "--conv-rank", "100000")
    assert result.returncode == 0, result.stderr
    with safe_open(output, "np") as handle:
        metadata = handle.metadata()
        ranks = {
            key: handle.get_tensor(key).shape
            for key in handle.keys()  # noqa: SIM118 (safe_open is no mapping)
            if key.endswith("down.weight")
        }
    linear = max(shape[0] for shape in ranks.values() if len(shape) == 2 or shape[2:] == (1, 1))
    conv = max(shape[0] for shape in ranks.values() if len(shape) == 4 and shape[2:] != (1, 1))
    assert linear < 100000 and conv < 100000
    assert metadata["ss_network_dim"] == str(linear)
    assert metadata["ss_network_alpha"] == str(float(linear))
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == str(conv)


# --- item 21: the quantile clamp of extracted factors, against numpy ----------------------

CLAMPED = {
    LINEAR: LINEAR_KEY,
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    ),
}


def test_extracted_factors_are_clamped_at_the_quantile(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """kohya's clamp: both factors of the truncated SVD (up = U·S, down = Vᵀ),
    clipped at the 0.9 quantile of their signed values; numpy's SVD, its signs
    matched to the file's, is the reference."""
    output = tmp_path / "learned.safetensors"
    args = ["extract", str(models["finetune"]), str(models["base"]), "-o", str(output)]
    options = ["--rank", "4", "--clamp-quantile", "0.9", "--text-encoder", "true"]
    result = run_in_process(*args, *options, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    factors = load_numpy(output)
    for name, key in CLAMPED.items():
        difference = arrays["finetune"][key].astype(np.float32) - arrays["base"][key]
        left, values, right = np.linalg.svd(difference.astype(np.float64))
        up, down = left[:, :4] * values[:4], right[:4]
        built_up = factors[f"{name}.lora_up.weight"].reshape(up.shape)
        built_down = factors[f"{name}.lora_down.weight"].reshape(down.shape)
        signs = np.sign(np.sum(down * built_down, axis=1))
        up, down = up * signs, down * signs[:, None]
        high = np.quantile(np.concatenate([up.ravel(), down.ravel()]), 0.9)
        both = np.concatenate([up.ravel(), down.ravel()])
        assert np.sum(np.abs(both) > 1.1 * high) > 2  # the clamp changes this layer
        np.testing.assert_allclose(built_up, np.clip(up, -high, high), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(built_down, np.clip(down, -high, high), rtol=1e-4, atol=1e-5)


# --- SDXL's two text encoders, told apart by values --------------------------------------

# kohya's names of an OpenCLIP layer's modules → (the checkpoint parameter, q/k/v slice).
OPEN_CLIP_MODULES = {
    "self_attn_q_proj": ("attn.in_proj_weight", 0),
    "self_attn_k_proj": ("attn.in_proj_weight", 1),
    "self_attn_v_proj": ("attn.in_proj_weight", 2),
    "self_attn_out_proj": ("attn.out_proj.weight", None),
    "mlp_fc1": ("mlp.c_fc.weight", None),
    "mlp_fc2": ("mlp.c_proj.weight", None),
}
SECOND_ENCODER = "conditioner.embedders.1.model.transformer.resblocks."


def test_a_lora_of_the_second_text_encoder_changes_only_its_keys(tmp_path: Path) -> None:
    """`lora_te2_` modules, named here from kohya's scheme, for OpenCLIP layers
    12-31 (which CLIP-L, the first encoder, lacks) patch `conditioner.embedders.1`
    alone, with the numpy reference's values; were te1 and te2 swapped, they
    would match nothing."""
    base = write_model(tmp_path / "sdxl.safetensors", ModelSpec("sdxl", shrink=SHRINK, seed=3))
    original = load_numpy(base)
    generator = np.random.default_rng(0)
    adapter: dict[str, np.ndarray] = {}
    touched = set()
    for layer in range(12, 32):
        for name, (parameter, part) in OPEN_CLIP_MODULES.items():
            key = f"{SECOND_ENCODER}{layer}.{parameter}"
            rows, columns = (
                original[key].shape[0] // (1 if part is None else 3),
                original[key].shape[1],
            )
            stem = f"lora_te2_text_model_encoder_layers_{layer}_{name}"
            adapter[f"{stem}.lora_down.weight"] = (
                0.1 * generator.standard_normal((2, columns))
            ).astype(np.float16)
            adapter[f"{stem}.lora_up.weight"] = (0.1 * generator.standard_normal((rows, 2))).astype(
                np.float16
            )
            adapter[f"{stem}.alpha"] = np.array(1.0, dtype=np.float16)
            touched.add(key)
    save_numpy(adapter, tmp_path / "te2.safetensors")
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {base}, L: {tmp_path / "te2.safetensors"}}}
        nodes: {{baked: {{expression: "A + 0.7 * L", allow_unmatched: true}}}}
        outputs: {{baked: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    built = load_numpy(tmp_path / "out.safetensors")
    changed = {k for k, v in built.items() if not np.array_equal(v, original[k].astype(v.dtype))}
    assert changed == touched and len(touched) == 80
    expected = expected_bake("sdxl", original, adapter, 0.7)
    for key in touched:
        np.testing.assert_allclose(built[key], expected[key], rtol=2e-5, atol=2e-6, err_msg=key)


# --- CLI audit: PEFT metadata that is not a LoRA's, and --recipe at a text file ------------


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"lora_alpha": "eight", "r": 4}, ("lora_alpha", '"eight"', "not a number")),
        ({"lora_alpha": True, "r": 4}, ("lora_alpha", "true", "not a number")),
        ({"lora_alpha": 8, "r": 0}, ("r in", "0", "not a positive whole number")),
        ({"lora_alpha": 8, "r": 2.5}, ("r in", "2.5", "not a positive whole number")),
        ({"lora_alpha": 8, "r": True}, ("r in", "true", "not a positive whole number")),
    ],
    ids=["alpha-text", "alpha-bool", "r-zero", "r-fraction", "r-bool"],
)
def test_peft_metadata_with_a_bad_alpha_or_rank_is_refused(
    models: dict[str, Path], tmp_path: Path, config: dict, named: tuple[str, ...]
) -> None:
    spec = AdapterSpec("sd1", SHRINK, naming="peft", alpha=None)
    metadata = {"lora_adapter_metadata": json.dumps(config)}
    adapter = broken_adapter(tmp_path, spec, {}, metadata)
    recipe = bake_recipe(tmp_path, models["base"], adapter)
    for command in ("validate", "build"):
        assert_refused(run_in_process(command, str(recipe)), str(adapter), *named)
    assert not (tmp_path / "out.safetensors").exists()


def test_recipe_option_at_a_text_file_says_bake_did_not_write_it(
    models: dict[str, Path], tmp_path: Path
) -> None:
    style = write_adapter(tmp_path / "style.safetensors", AdapterSpec("sd1", SHRINK))
    notes = tmp_path / "notes.txt"
    notes.write_text("my shopping list\n")
    args = ["bake", str(models["base"]), str(style), "-o", str(tmp_path / "out.safetensors")]
    result = run_in_process(*args, "--recipe", str(notes))
    assert_refused(result, str(notes), "is not a recipe that `sdrecipe bake` or")
    assert "other settings" not in result.stderr
    assert notes.read_text() == "my shopping list\n"
    assert not (tmp_path / "out.safetensors").exists()
    # A recipe bake wrote, with other settings, is still described as such.
    recipe = tmp_path / "mine.recipe.yaml"
    assert run_in_process(*args, "--recipe", str(recipe)).returncode == 0
    result = run_in_process(*args[:2], f"{style}=0.3", *args[3:], "--recipe", str(recipe))
    assert_refused(result, str(recipe), "other settings")
