"""Which keys merge and which keep the base value, and why."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.errors import RecipeError
from sdrecipe.plan.prepare import prepare

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture
def odd_models(tmp_path):
    """A and B share `w`; only A has `a_only`; only B has `b_only`; `n` is int; ids are float."""
    rng = np.random.default_rng(1)
    a = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "a_only": rng.standard_normal(5).astype(np.float32),
        "n": np.arange(6, dtype=np.int64),
        POSITION_IDS: np.arange(77, dtype=np.float32)[None],
    }
    b = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b_only": rng.standard_normal(2).astype(np.float32),
        "n": np.arange(6, dtype=np.int64) * 2,
        POSITION_IDS: np.arange(77, dtype=np.float32)[None] + 1,
    }
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return a, b


def test_base_keys_pass_through_for_each_reason(tmp_path, odd_models):
    a, b = odd_models
    recipe = write_recipe(
        tmp_path,
        """
        inputs: {A: a.safetensors, B: b.safetensors}
        nodes: {out: "weighted_sum(A, B)"}
        outputs: {out: out.safetensors}
        """,
    )
    summary = update_outputs(prepare(recipe), threads=1)
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(a), "output keys are the base's keys"
    np.testing.assert_array_equal(out["w"], 0.5 * a["w"] + 0.5 * b["w"])
    for key in ("a_only", "n", POSITION_IDS):
        np.testing.assert_array_equal(out[key], a[key])
    (result,) = summary.outputs
    assert result.merged == 1
    assert result.passed_through == {
        "missing from B": 1,
        "never merged (CLIP position ids)": 1,
        "not floating point (I64)": 1,
    }
    assert result.dropped == 1


def test_missing_key_in_a_chained_node_keeps_the_computed_base(tmp_path, odd_models):
    a, b = odd_models
    save_file({"w": np.ones((4, 3), np.float32)}, tmp_path / "c.safetensors")
    recipe = write_recipe(
        tmp_path,
        """
        inputs: {A: a.safetensors, B: b.safetensors, C: c.safetensors}
        nodes:
          first: A - B
          second: first + C
        outputs: {second: {path: out.safetensors, dtype: fp32}}
        """,
    )
    summary = update_outputs(prepare(recipe), threads=2)
    out = load_file(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(out["w"], a["w"] - b["w"] + 1)
    np.testing.assert_array_equal(out["a_only"], a["a_only"])
    assert summary.outputs[0].merged == 1
    assert summary.outputs[0].passed_through["missing from C"] == 1


def test_other_shape_mismatches_are_refused_before_any_output(tmp_path):
    save_file({"w": np.zeros((4, 3), np.float32)}, tmp_path / "a.safetensors")
    save_file({"w": np.zeros((3, 4), np.float32)}, tmp_path / "b.safetensors")
    recipe = write_recipe(
        tmp_path,
        """
        inputs: {A: a.safetensors, B: b.safetensors}
        nodes: {out: "weighted_sum(A, B)"}
        outputs: {out: out.safetensors}
        """,
    )
    with pytest.raises(RecipeError, match=r"w: shapes differ: A \[4, 3\], B \[3, 4\]") as info:
        prepare(recipe)
    assert info.value.line == 2
    assert not (tmp_path / "out.safetensors").exists()


def test_inpainting_model_must_be_the_base(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["inpainting"]}}}
        nodes: {{out: "weighted_sum(A, B, alpha=0.5)"}}
        outputs: {{out: out.safetensors}}
        """,
    )
    with pytest.raises(RecipeError, match="must be the first \\(base\\) model"):
        prepare(recipe)
