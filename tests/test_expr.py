"""The expression parser: grammar, algebra checks, safety, and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrecipe.engine.evaluate import evaluate
from sdrecipe.recipe.expr import (
    BinOp,
    Call,
    ExpressionError,
    Neg,
    Num,
    Ref,
    format_expression,
    parse_expression,
    references,
)


def test_inpainting_transplant_parses_to_the_expected_tree():
    assert parse_expression("A + (B - C)") == BinOp("+", Ref("A"), BinOp("-", Ref("B"), Ref("C")))


def test_scalars_fold_and_bind_tighter_than_sums():
    assert parse_expression("A + (1 - 0.5) * (B - C)") == BinOp(
        "+", Ref("A"), BinOp("*", Num(0.5), BinOp("-", Ref("B"), Ref("C")))
    )


def test_calls_take_models_then_keyword_numbers():
    assert parse_expression("weighted_sum(A, B - C, alpha=1/4)") == Call(
        "weighted_sum", (Ref("A"), BinOp("-", Ref("B"), Ref("C"))), (("alpha", 0.25),)
    )


def test_subtraction_is_left_associative():
    assert parse_expression("A - B - C") == BinOp("-", BinOp("-", Ref("A"), Ref("B")), Ref("C"))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("A * B", "product of two models"),
        ("(A - B) * (C - A)", "product of two models"),
        ("A + 1", "cannot add a number and a model"),
        ("2 / A", "division by a model"),
        ("A / 0", "division by zero"),
        ("A / (1 - 1)", "division by zero"),
        ("0.5", "at least one model"),
        ("A +", "expected a name"),
        ("(A", "expected ')'"),
        ("A B", "unexpected 'B'"),
        ("__import__('os').system('x')", "unexpected character"),
        ("A.weight", "unexpected character '.'"),
        ("A ** 2", "expected a name"),
        ("f(B, alpha=A + B)", "must be a number"),
        ("f(alpha=1, A)", "follows a keyword"),
        ("f(1)", "positional arguments"),
        ("f(A, alpha=1, alpha=2)", "given twice"),
        ("A()", "needs at least one model"),
        ("weighted_sum(alpha=0.5)", "needs at least one model"),
        ("1e999 * A", "out of range"),
    ],
)
def test_malformed_expressions_are_rejected_with_a_column(source, message):
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert message in info.value.message
    assert 1 <= info.value.column <= len(source) + 1


def test_references_are_listed_once_left_to_right():
    assert references(parse_expression("B + weighted_sum(A, B, alpha=0.3) - C")) == ["B", "A", "C"]


# --- property-based tests -------------------------------------------------------

NAMES = st.sampled_from(["A", "B", "C", "D"])
SCALARS = st.floats(min_value=-4, max_value=4, allow_nan=False).filter(lambda x: abs(x) > 1e-3)


def model_expressions(max_leaves: int = 8) -> st.SearchStrategy:
    return st.recursive(
        NAMES.map(Ref),
        lambda inner: st.one_of(
            st.tuples(st.sampled_from("+-"), inner, inner).map(lambda t: BinOp(*t)),
            st.tuples(SCALARS, inner).map(lambda t: BinOp("*", Num(t[0]), t[1])),
            st.tuples(inner, SCALARS).map(lambda t: BinOp("/", t[0], Num(t[1]))),
            inner.filter(lambda e: not isinstance(e, Neg)).map(Neg),
            st.tuples(inner, inner, st.floats(0, 1)).map(
                lambda t: Call("weighted_sum", (t[0], t[1]), (("alpha", t[2]),))
            ),
        ),
        max_leaves=max_leaves,
    )


@given(model_expressions())
def test_formatting_then_parsing_gives_back_the_same_tree(expr):
    assert parse_expression(format_expression(expr)) == expr


@given(st.text(alphabet="AB01.+-*/()=, _xe\n\"';[]{}!", max_size=30))
@settings(max_examples=300)
def test_arbitrary_text_either_parses_or_raises_expression_error(text):
    try:
        expr = parse_expression(text)
    except ExpressionError as exc:
        assert exc.column >= 1
    else:
        assert references(expr)


def numpy_value(expr, env: dict[str, np.ndarray]) -> np.ndarray:
    """Independent reference: the same algebra in float64 numpy."""
    if isinstance(expr, Ref):
        return env[expr.name].astype(np.float64)
    if isinstance(expr, Neg):
        return -numpy_value(expr.operand, env)
    if isinstance(expr, Call):
        a, b = (numpy_value(arg, env) for arg in expr.args)
        alpha = dict(expr.params)["alpha"]
        return (1 - alpha) * a + alpha * b
    if expr.op == "*":
        return expr.left.value * numpy_value(expr.right, env)
    if expr.op == "/":
        return numpy_value(expr.left, env) / expr.right.value
    left, right = numpy_value(expr.left, env), numpy_value(expr.right, env)
    return left + right if expr.op == "+" else left - right


@given(model_expressions(max_leaves=6), st.sampled_from([torch.float16, torch.float32]))
@settings(max_examples=150)
def test_evaluation_matches_numpy_and_never_modifies_operands(expr, stored_dtype):
    generator = torch.Generator().manual_seed(0)
    env = {name: torch.randn(7, 5, generator=generator).to(stored_dtype) for name in "ABCD"}
    before = {name: tensor.clone() for name, tensor in env.items()}
    result = evaluate(expr, env, torch.float32)
    expected = numpy_value(expr, {n: t.float().numpy() for n, t in env.items()})
    assert result.dtype == torch.float32
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-5 * scale)
    for name in env:
        assert torch.equal(env[name], before[name])
