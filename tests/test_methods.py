"""Every merge method, built end to end, against an independent numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import POSITION_IDS, UNET_IN, as32, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.plan.prepare import prepare


def numpy_reference(method: str, alpha: float, a, b, c=None):
    """The published formulas, written independently in float32 numpy."""
    alpha32 = np.float32(alpha)
    if method == "weighted_sum":
        return (np.float32(1) - alpha32) * a + alpha32 * b
    if method == "add_difference":
        return a + alpha32 * (b - c)
    if method == "sigmoid":
        weight = np.float32(alpha * alpha * (3 - 2 * alpha))
    else:
        weight = np.float32(0.5 - math.sin(math.asin(1 - 2 * alpha) / 3))
    return a + weight * (b - a)


def build_one(tmp_path, models, expression: str, dtype: str = "float16"):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {models["finetune"]}
          B: {models["other"]}
          C: {models["base"]}
        nodes:
          out: "{expression}"
        outputs:
          out: {{path: out.safetensors, dtype: {dtype}}}
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    return load_file(tmp_path / "out.safetensors")


def assert_matches(result, arrays, reference, dtype=np.float16):
    a, b, c = arrays["finetune"], arrays["other"], arrays["base"]
    checked = 0
    for key, value in a.items():
        if key == POSITION_IDS:
            np.testing.assert_array_equal(result[key], value)
            continue
        expected = reference(as32(value), as32(b[key]), as32(c[key])).astype(dtype)
        assert result[key].dtype == dtype, key
        # One rounding step to the output dtype: allow one unit in the last place.
        np.testing.assert_allclose(
            as32(result[key]),
            as32(expected),
            rtol=2e-3 if dtype == np.float16 else 1e-6,
            atol=1e-6,
            err_msg=key,
        )
        checked += 1
    assert checked == len(a) - 1


DEFAULT_ALPHA = {"weighted_sum": 0.5, "add_difference": 1.0, "sigmoid": 0.5, "inv_sigmoid": 0.5}


@pytest.mark.parametrize("alpha", [None, 0.0, 1.0, 0.3, 0.7], ids=lambda a: f"alpha={a}")
@pytest.mark.parametrize("method", list(DEFAULT_ALPHA))
def test_each_method_matches_numpy(tmp_path, models, arrays, method, alpha):
    """At its default (None), at 0 and 1, and in between: a factor applied twice
    or a default read wrong shows in at least two of them."""
    args = "A, B, C" if method == "add_difference" else "A, B"
    parameter = "" if alpha is None else f", alpha={alpha}"
    result = build_one(tmp_path, models, f"{method}({args}{parameter})")
    value = DEFAULT_ALPHA[method] if alpha is None else alpha
    assert_matches(result, arrays, lambda a, b, c: numpy_reference(method, value, a, b, c))


def test_operator_form_of_add_difference_matches_numpy(tmp_path, models, arrays):
    result = build_one(tmp_path, models, "A + 0.5 * (B - C)", dtype="float32")
    assert_matches(result, arrays, lambda a, b, c: a + np.float32(0.5) * (b - c), np.float32)


def test_method_long_form_equals_expression_form(tmp_path, models):
    short = build_one(tmp_path, models, "add_difference(A, B, C, alpha=0.4)")
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}, C: {models["base"]}}}
        nodes:
          out: {{method: add_difference, models: [A, B, C], alpha: 0.4}}
        outputs:
          out: {{path: long.safetensors, dtype: fp16}}
        """,
        name="long.yaml",
    )
    update_outputs(prepare(recipe), threads=1)
    long = load_file(tmp_path / "long.safetensors")
    for key in short:
        np.testing.assert_array_equal(short[key], long[key])


def test_intermediate_nodes_chain_in_float32(tmp_path, models, arrays):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}, C: {models["base"]}}}
        nodes:
          diff: B - C
          half: diff / 2
          out: A + half
        outputs:
          out: out.safetensors
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    result = load_file(tmp_path / "out.safetensors")
    a, b, c = arrays["finetune"], arrays["other"], arrays["base"]
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    expected = (as32(a[key]) + (as32(b[key]) - as32(c[key])) / np.float32(2)).astype(np.float16)
    # Default dtype keeps the base's (float16); nothing was rounded in between.
    np.testing.assert_array_equal(result[key], expected)


def test_float64_operand_computes_in_float64(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal((3, 4)).astype(np.float64)}
    b = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    recipe = write_recipe(
        tmp_path,
        """
        inputs: {A: a.safetensors, B: b.safetensors}
        nodes: {out: "weighted_sum(A, B, alpha=0.1)"}
        outputs: {out: out.safetensors}
        """,
    )
    update_outputs(prepare(recipe), threads=1)
    out = load_file(tmp_path / "out.safetensors")["w"]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, 0.9 * a["w"] + 0.1 * b["w"].astype(np.float64), rtol=1e-15)


def test_inpainting_channel_rule_keeps_the_base_extra_channels(tmp_path, models, arrays):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes: {{inpaint: A + (B - C)}}
        outputs: {{inpaint: {{path: out.safetensors, dtype: float32}}}}
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    out = load_file(tmp_path / "out.safetensors")[UNET_IN]
    a, b, c = (as32(arrays[n][UNET_IN]) for n in ("inpainting", "finetune", "base"))
    assert a.shape[1] == 9 and b.shape[1] == 4
    np.testing.assert_array_equal(out[:, 4:], a[:, 4:])
    np.testing.assert_allclose(out[:, :4], a[:, :4] + (b - c), rtol=1e-6)


def test_pix2pix_channel_rule(tmp_path, models, arrays):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["pix2pix"]}, B: {models["finetune"]}}}
        nodes: {{out: "weighted_sum(A, B, alpha=0.25)"}}
        outputs: {{out: {{path: out.safetensors, dtype: float32}}}}
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    out = load_file(tmp_path / "out.safetensors")[UNET_IN]
    a, b = as32(arrays["pix2pix"][UNET_IN]), as32(arrays["finetune"][UNET_IN])
    assert out.shape == a.shape and a.shape[1] == 8
    np.testing.assert_array_equal(out[:, 4:], a[:, 4:])
    np.testing.assert_allclose(out[:, :4], 0.75 * a[:, :4] + 0.25 * b, rtol=1e-6)


def test_fixture_models_really_differ(arrays):
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    values = {name: arrays[name][key] for name in ("base", "finetune", "other")}
    assert not np.array_equal(values["base"], values["other"])
    delta = as32(values["finetune"]) - as32(values["base"])
    assert 0 < np.abs(delta).max() < 0.1, "a fine-tune is its base plus a small delta"


def test_methods_that_are_not_elementwise_see_whole_tensors(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from sdrecipe.methods import merge_method, registry

    # Register the test's method in a copy of the registry, restored afterwards.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @merge_method(elementwise=False)
    def rescale_to(a, b, *, strength: float = 1.0):
        """A scaled to B's norm: needs the whole tensor."""
        return a.mul(1 + strength * (b.norm() / a.norm() - 1))

    rng = np.random.default_rng(3)
    a = {"big": rng.standard_normal((4096, 192)).astype(np.float32)}  # several row ranges
    # B's rows grow with their index, so the norm of any row range differs from
    # the whole tensor's: computing in ranges would give the wrong answer.
    rows = np.linspace(1, 10, 4096, dtype=np.float32)[:, None]
    b = {"big": rng.standard_normal((4096, 192)).astype(np.float32) * rows}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    recipe = write_recipe(
        tmp_path,
        """
        inputs: {A: a.safetensors, B: b.safetensors}
        nodes: {out: "rescale_to(A, B)"}
        outputs: {out: out.safetensors}
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    out = load_file(tmp_path / "out.safetensors")["big"]
    expected = a["big"] * (np.linalg.norm(b["big"]) / np.linalg.norm(a["big"]))
    np.testing.assert_allclose(out, expected, rtol=1e-4)
