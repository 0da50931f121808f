"""Merge spaces: is a value a model, or a difference of models?

Every value is a linear combination of models. When its coefficients sum to 1
it is a model (`A + (B - C)`, `0.7 * A + 0.3 * B`); when they sum to 0 it is a
difference (`B - C`). Anything else (`A + B`, `2 * A`) is a scaled model,
which no merge means, and is refused unless the node says `force: true`.
Methods declare the spaces of their operands and result (see
`sdrecipe.methods.registry`).
"""

from __future__ import annotations

from collections.abc import Callable

from sdrecipe.methods import get_method
from sdrecipe.methods.registry import DIFFERENCE, MODEL
from sdrecipe.recipe.expr import BinOp, Call, Expr, ExprVisitor, Neg, Num, Ref, format_expression

SUMS = {MODEL: 1.0, DIFFERENCE: 0.0}
_TOLERANCE = 1e-9


class SpaceError(ValueError):
    """A term whose coefficients make neither a model nor a difference."""


def space_named(total: float) -> str | None:
    """`model` for a coefficient sum of 1, `difference` for 0, else None."""
    return next((name for name, value in SUMS.items() if abs(total - value) < _TOLERANCE), None)


def coefficient_sum(expr: Expr, space_of: Callable[[str], str]) -> float:
    """The sum of `expr`'s model coefficients; `space_of` gives each name's space.

    Raises SpaceError for a method operand that is neither a model nor a
    difference, or that is not in the space the method declares."""
    return _CoefficientSum(space_of).visit(expr)


class _CoefficientSum(ExprVisitor[float]):
    def __init__(self, space_of: Callable[[str], str]):
        self.space_of = space_of

    def visit_ref(self, expr: Ref) -> float:
        return SUMS[self.space_of(expr.name)]

    def visit_neg(self, expr: Neg) -> float:
        return -self.visit(expr.operand)

    def visit_binop(self, expr: BinOp) -> float:
        if expr.op in "*/":
            model, factor = (
                (expr.right, expr.left) if isinstance(expr.left, Num) else (expr.left, expr.right)
            )
            assert isinstance(factor, Num)
            total = self.visit(model)
            return total * factor.value if expr.op == "*" else total / factor.value
        left, right = self.visit(expr.left), self.visit(expr.right)
        return left + right if expr.op == "+" else left - right

    def visit_call(self, call: Call) -> float:
        method = get_method(call.method)
        bound: dict[str, str] = {}
        for index, arg in enumerate(call.args):
            total = self.visit(arg)
            space = space_named(total)
            text = format_expression(arg)
            if space is None:
                raise SpaceError(
                    f"{call.method}() operand {text!r} is neither a model nor a difference "
                    f"(its model coefficients sum to {total:g})"
                )
            declared = method.operand_space(index)
            expected = declared if declared in SUMS else bound.setdefault(declared, space)
            if space != expected:
                raise SpaceError(
                    f"{call.method}() operand {text!r} is a {space}, where a {expected} is expected"
                )
        result = method.spaces.get("return", "S")
        return SUMS[result if result in SUMS else bound.get(result, MODEL)]
