"""The engine's room to grow: typed, variadic and key-aware methods, per-key
parameter values, and merge spaces."""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from conftest import POSITION_IDS, as32, invoke, write_recipe
from sdrecipe.methods import merge_method, registry
from sdrecipe.plan.assess import assess
from sdrecipe.plan.prepare import prepare
from sdrecipe.recipe.expr import Call, PerKey, Ref, format_expression, parse_expression
from sdrecipe.recipe.per_key import KeyContext, resolve

TEXT_ENCODER = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
UNET = "model.diffusion_model.out.2.weight"


@pytest.fixture
def methods_for_tests(monkeypatch):
    """Methods registered for one test, in a copy of the registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @merge_method()
    def scaled_blend(
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        alpha: float = 0.5,
        times: int = 1,
        negate: bool = False,
        mode: Literal["plain", "swap"] = "plain",
        weights: list[float] = [1.0, 1.0],  # noqa: B006  (read only)
    ) -> torch.Tensor:
        """A test method with every kind of parameter."""
        first, second = (b, a) if mode == "swap" else (a, b)
        result = first.mul(weights[0] * (1 - alpha)).add_(second.mul(weights[1] * alpha))
        result.mul_(times)
        return result.neg_() if negate else result

    @merge_method(min_models=2)
    def mean_of(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
        """The mean of all models."""
        total = base.clone()
        for model in models:
            total.add_(model)
        return total.div_(1 + len(models))

    @merge_method(elementwise=False)
    def seeded_noise(
        a: torch.Tensor, *, seed: int = 0, scale: float = 0.01, context: KeyContext
    ) -> torch.Tensor:
        """A plus noise drawn from (seed, key): a key-aware method."""
        generator = torch.Generator().manual_seed(hash((seed, context.key)) % (2**31))
        noise = torch.randn(a.shape, generator=generator, dtype=a.dtype)
        return a.add(noise.mul_(scale))

    @merge_method(elementwise=False)
    def plain_copy(a: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        """A times scale: a pure method."""
        return a.mul(scale)


def recipe(models, nodes: str, outputs: str = "out: out.safetensors") -> str:
    node_lines = "\n".join(f"  {line}" for line in nodes.strip().splitlines())
    return (
        f"inputs:\n  A: {models['finetune']}\n  B: {models['other']}\n  C: {models['base']}\n"
        f"nodes:\n{node_lines}\noutputs:\n  {outputs}\n"
    )


# --- typed parameters


def test_typed_parameters_in_both_forms(tmp_path, models, arrays, methods_for_tests):
    long_form = (
        "out: {method: scaled_blend, models: [A, B], alpha: 0.25, times: 2, negate: true, "
        "mode: swap, weights: [0.5, 2]}"
    )
    path = write_recipe(
        tmp_path, recipe(models, long_form, "out: {path: out.safetensors, dtype: fp32}")
    )
    built = invoke("build", str(path))
    assert built.exit_code == 0, built.stderr
    long = load_file(tmp_path / "out.safetensors")
    short = parse_expression(
        'scaled_blend(A, B, alpha=1, times=2, negate=true, mode="swap", weights=[0.5, 2])'
    )
    assert isinstance(short, Call) and dict(short.params)["times"] == 2
    a, b = as32(arrays["finetune"][UNET]), as32(arrays["other"][UNET])
    # mode swap: first = B, second = A; then 0.5·0.75·B + 2·0.25·A, times 2, negated
    np.testing.assert_allclose(long[UNET], -2 * (0.375 * b + 0.5 * a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("{method: scaled_blend, models: [A, B], times: 1.5}", "parameter 'times'"),
        ("{method: scaled_blend, models: [A, B], mode: other}", "parameter 'mode'"),
        ("{method: scaled_blend, models: [A, B], negate: 1}", "parameter 'negate'"),
        ("{method: scaled_blend, models: [A, B], weights: [1, x]}", "parameter 'weights'"),
        ('"scaled_blend(A, B, times=2.5)"', "parameter 'times'"),
    ],
)
def test_wrong_parameter_types_name_the_line_and_parameter(
    tmp_path, models, methods_for_tests, node, message
):
    path = write_recipe(tmp_path, recipe(models, f"out: {node}"))
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    assert message in result.stderr and "recipe.yaml:6" in result.stderr


# --- variadic methods


def test_a_variadic_method_takes_any_number_of_models(tmp_path, models, arrays, methods_for_tests):
    path = write_recipe(
        tmp_path, recipe(models, "out: mean_of(A, B, C)", "out: {path: o.safetensors, dtype: fp32}")
    )
    assert invoke("build", str(path)).exit_code == 0
    out = load_file(tmp_path / "o.safetensors")[UNET]
    expected = sum(as32(arrays[name][UNET]) for name in ("finetune", "other", "base")) / 3
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    too_few = write_recipe(tmp_path, recipe(models, "out: mean_of(A)"), "few.yaml")
    result = invoke("validate", str(too_few))
    assert result.exit_code == 2 and "takes at least 2 models, got 1" in result.stderr
    listed = json.loads(invoke("methods", "--json").stdout)["methods"]
    mean = next(method for method in listed if method["name"] == "mean_of")
    assert mean["signature"] == "mean_of(base, *models)" and mean["min_models"] == 2


# --- key-aware methods: the key is part of the identity


def twin_model(tmp_path):
    """A model whose keys x and y hold the same tensor."""
    value = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    save_file({"x": value, "y": value.copy()}, tmp_path / "twin.safetensors")
    return tmp_path / "twin.safetensors"


@pytest.mark.parametrize(("method", "differ"), [("seeded_noise", True), ("plain_copy", False)])
def test_key_aware_methods_give_each_key_its_own_result_and_identity(
    tmp_path, methods_for_tests, isolated_cache, method, differ
):
    twin = twin_model(tmp_path)
    path = write_recipe(
        tmp_path,
        f"inputs: {{A: {twin}}}\nnodes:\n  mid: {method}(A)\n  out: weighted_sum(mid, A, alpha=0)\n"
        "outputs: {out: out.safetensors}\n",
    )
    assert invoke("build", str(path)).exit_code == 0
    out = load_file(tmp_path / "out.safetensors")
    assert (not np.array_equal(out["x"], out["y"])) is differ
    prepared = prepare(path)
    identities = assess(prepared, None, threads=1).identities.values["mid"]
    assert (identities["x"] != identities["y"]) is differ
    objects = list(isolated_cache.glob("objects/*/*.safetensors"))
    assert len(objects) == (2 if differ else 1)


# --- per-key parameter values


def test_per_key_values_resolve_most_specific_first():
    value = PerKey((("default", 0.5), ("text_encoder", 0.2), ("re:fc1", 0.9), ("re:layers", 0.7)))
    assert resolve(value, KeyContext(TEXT_ENCODER, "text_encoder")) == 0.9  # first regex
    assert resolve(value, KeyContext("cond_stage_model.x.layers.3", "text_encoder")) == 0.7
    assert resolve(value, KeyContext("cond_stage_model.final", "text_encoder")) == 0.2
    assert resolve(value, KeyContext(UNET, "unet")) == 0.5
    assert resolve(value, KeyContext(UNET, "unet", block="OUT02")) == 0.5


PER_KEY_NODE = (
    "out: {method: weighted_sum, models: [A, B], alpha: {default: 0.5, text_encoder: 0.2}}"
)


def test_a_per_key_value_merges_each_component_with_its_own_alpha(tmp_path, models, arrays):
    path = write_recipe(
        tmp_path, recipe(models, PER_KEY_NODE, "out: {path: out.safetensors, dtype: fp32}")
    )
    assert invoke("build", str(path)).exit_code == 0
    out = load_file(tmp_path / "out.safetensors")
    for key, alpha in ((UNET, 0.5), (TEXT_ENCODER, 0.2)):
        a, b = as32(arrays["finetune"][key]), as32(arrays["other"][key])
        np.testing.assert_allclose(out[key], (1 - np.float32(alpha)) * a + np.float32(alpha) * b)
    np.testing.assert_array_equal(out[POSITION_IDS], arrays["finetune"][POSITION_IDS])


def test_changing_one_components_value_rebuilds_only_its_keys(tmp_path, models):
    path = write_recipe(tmp_path, recipe(models, PER_KEY_NODE, "out: out/x.safetensors"))
    assert invoke("build", str(path)).exit_code == 0
    path.write_text(path.read_text().replace("text_encoder: 0.2", "text_encoder: 0.3"))
    planned = json.loads(invoke("plan", "--json", str(path)).stdout)["nodes"][0]
    assert planned["status"] == "rebuild"
    assert planned["reason"].startswith("alpha changed for text_encoder 0.2 -> 0.3 (196 keys)")
    summary = json.loads(invoke("build", "--json", str(path)).stdout)
    assert summary["cache"]["tensors_computed"] == 196
    assert summary["cache"]["tensors_from_cache"] == 1130 - 196
    built = (tmp_path / "out" / "x.safetensors").read_bytes()
    assert invoke("build", "--no-cache", "--force", str(path)).exit_code == 0
    assert built == (tmp_path / "out" / "x.safetensors").read_bytes()


def test_provenance_records_the_mapping_and_rebuilds_the_same_bytes(tmp_path, models):
    path = write_recipe(tmp_path, recipe(models, PER_KEY_NODE))
    assert invoke("build", str(path)).exit_code == 0
    output = tmp_path / "out.safetensors"
    from sdrecipe.io.safetensors_reader import SafetensorsReader

    metadata = SafetensorsReader(output).metadata
    merge_recipe = json.loads(metadata["sd_merge_recipe"])
    assert merge_recipe["multiplier"] is None, "a per-key alpha is no A1111 multiplier"
    assert "text_encoder: 0.2" in merge_recipe["interp_method"]
    embedded = metadata["sdrecipe.recipe"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for model in models.values():
        (elsewhere / model.name).symlink_to(model)
    (elsewhere / "again.yaml").write_text(embedded)
    assert invoke("build", "--no-cache", str(elsewhere / "again.yaml")).exit_code == 0
    assert (elsewhere / "out.safetensors").read_bytes() == output.read_bytes()


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        ("{default: 0.5, vea: 0.2}", "'vea' is not default, a component"),
        ('{default: 0.5, "re:(": 0.2}', "not a valid regex"),
        ("{default: 0.5, unet: high}", "must be a number"),
    ],
)
def test_bad_per_key_values_are_refused(tmp_path, models, alpha, message):
    node = f"out: {{method: weighted_sum, models: [A, B], alpha: {alpha}}}"
    result = invoke("validate", str(write_recipe(tmp_path, recipe(models, node))))
    assert result.exit_code == 2 and message in result.stderr


numbers = st.floats(-10, 10, allow_nan=False).map(lambda x: round(x, 3))
labels = st.sampled_from(["default", "unet", "vae", "text_encoder", "re:attn", "re:^a.b"])
values = st.one_of(
    numbers,
    st.integers(-5, 5),
    st.booleans(),
    st.sampled_from(["sum", "count", "it's"]),
    st.lists(numbers, max_size=3).map(tuple),
    st.dictionaries(labels, numbers, min_size=1, max_size=4).map(
        lambda d: PerKey(tuple(d.items()))
    ),
)


@given(st.dictionaries(st.sampled_from(["alpha", "beta", "seed", "sign"]), values, max_size=3))
def test_typed_parameters_format_and_parse_back(params):
    call = Call("m", (Ref("A"),), tuple(params.items()))
    assert parse_expression(format_expression(call)) == call


# --- merge spaces


@pytest.mark.parametrize(
    ("node", "output", "message"),
    [
        ("out: A + B", "out: o.safetensors", "in 'A + B' the model coefficients sum to 2"),
        ("out: 2 * A", "out: o.safetensors", "sum to 2"),
        ("out: A - B - C", "out: o.safetensors", "sum to -1"),
        ("out: B - C", "out: o.safetensors", "output 'out': node 'out' is a difference"),
        ("out: weighted_sum(A, B - C)", "out: o.safetensors", "operand 'B - C' is a diff"),
        ("out: add_difference(A, B - C, C)", "out: o.safetensors", "operand 'C' is a mod"),
        ("out: A + (B - C)", "out: {path: o.safetensors, space: difference}", "output 'out'"),
    ],
)
def test_values_that_are_neither_models_nor_differences_are_refused(
    tmp_path, models, node, output, message
):
    result = invoke("validate", str(write_recipe(tmp_path, recipe(models, node, output))))
    assert result.exit_code == 2
    line = 8 if message.startswith("output") else 6
    assert message in result.stderr and f"recipe.yaml:{line}" in result.stderr


@pytest.mark.parametrize(
    "node",
    [
        "out: A + (B - C)",
        "out: 0.7 * A + 0.3 * B",
        "out: add_difference(A, B, C, alpha=0.5)",
        "out: weighted_sum(A - C, B - C)\nmodel: A + out",
        "out: {expression: A + B, force: true}",
    ],
)
def test_models_differences_and_forced_nodes_are_accepted(tmp_path, models, node):
    output = (
        "out: {path: o.safetensors, space: difference}" if "A - C" in node else "out: o.safetensors"
    )
    result = invoke("validate", str(write_recipe(tmp_path, recipe(models, node, output))))
    assert result.exit_code == 0, result.stderr


def test_a_difference_output_holds_the_deltas(tmp_path, models, arrays):
    path = write_recipe(
        tmp_path,
        recipe(
            models, "out: B - C", "out: {path: delta.safetensors, space: difference, dtype: fp32}"
        ),
    )
    assert invoke("build", str(path)).exit_code == 0
    out = load_file(tmp_path / "delta.safetensors")[UNET]
    np.testing.assert_allclose(out, as32(arrays["other"][UNET]) - as32(arrays["base"][UNET]))


def test_a_difference_node_that_lacks_a_key_adds_nothing_there(tmp_path, models, arrays):
    """`A + diff` where C lacks a key: diff holds no difference there, so A's value
    passes through (and is not A + B, a doubled model)."""
    partial = {k: v for k, v in arrays["base"].items() if k != UNET}
    save_file(partial, tmp_path / "partial.safetensors")
    path = write_recipe(
        tmp_path,
        recipe(
            models, "diff: B - P\nout: A + diff", "out: {path: o.safetensors, dtype: fp32}"
        ).replace("inputs:\n", f"inputs:\n  P: {tmp_path / 'partial.safetensors'}\n"),
    )
    assert invoke("build", str(path)).exit_code == 0
    out = load_file(tmp_path / "o.safetensors")[UNET]
    np.testing.assert_array_equal(out, as32(arrays["finetune"][UNET]))
