"""Merge spaces: is a value a model, or a difference of models?

Every value is a linear combination of models. When its coefficients sum to 1
it is a model (`A + (B - C)`, `0.7 * A + 0.3 * B`); when they sum to 0 it is a
difference (`B - C`). Anything else (`A + B`, `2 * A`) is a scaled model,
which no merge means, and is refused unless the node says `force: true`.
Methods declare the spaces of their operands and result (see
`sdrecipe.methods.registry`). Whether an input is a model or an adapter (a
difference) is known from its header, so `check_spaces` runs once the inputs
are opened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from sdrecipe.errors import RecipeError
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import DIFFERENCE, MODEL
from sdrecipe.recipe.expr import (
    BinOp,
    Call,
    Expr,
    ExprVisitor,
    Neg,
    Num,
    Ref,
    format_expression,
    references,
)
from sdrecipe.recipe.model import Node, Recipe

SUMS = {MODEL: 1.0, DIFFERENCE: 0.0}
_TOLERANCE = 1e-9


class SpaceError(ValueError):
    """A term whose coefficients make neither a model nor a difference."""


def space_named(total: float) -> str | None:
    """`model` for a coefficient sum of 1, `difference` for 0, else None."""
    return next((name for name, value in SUMS.items() if abs(total - value) < _TOLERANCE), None)


def check_spaces(recipe: Recipe, inputs: Mapping[str, str]) -> Recipe:
    """`recipe` with the spaces of its inputs (`inputs`: those opened, by name)
    and of its nodes. Every node is a model or a difference (unless `force:
    true`), and every output is in the space it declares; errors name the node,
    line and term. The nodes form no cycle (`build_graph` refuses one).

    An input that was not opened has no known space (it may be an adapter):
    nodes that use one, and their outputs, are not checked, and keep no space."""
    spaces: dict[str, str | None] = {name: inputs.get(name) for name in recipe.inputs}

    def space_of(name: str) -> str | None:
        if name not in spaces:
            spaces[name] = node_space(recipe.nodes[name])
        return spaces[name]

    def node_space(node: Node) -> str | None:
        operands = {name: space_of(name) for name in references(node.expr)}
        known = {name: space for name, space in operands.items() if space is not None}
        if len(known) < len(operands):
            return None
        try:
            total = coefficient_sum(node.expr, known.__getitem__)
        except SpaceError as exc:
            raise RecipeError(f"node {node.name!r}: {exc}", recipe.path, node.line) from None
        space = space_named(total)
        if space is None and not node.force:
            raise RecipeError(
                f"node {node.name!r}: in {format_expression(node.expr)!r} the model "
                f"coefficients sum to {total:g}, which makes neither a model (sum 1, e.g. "
                "weighted_sum(A, B) or A + (B - C)) nor a difference (sum 0, e.g. B - C); "
                "set `force: true` on the node if you mean it",
                recipe.path,
                node.line,
            )
        return space or MODEL

    for name in recipe.nodes:
        space_of(name)
    for name, output in recipe.outputs.items():
        found = spaces[output.node]
        if found is not None and found != output.space:
            raise RecipeError(
                f"output {name!r}: node {output.node!r} is a {found}, and the output writes a "
                f"{output.space}"
                + (" (write deltas with `space: difference`)" if output.space == MODEL else ""),
                recipe.path,
                output.line,
            )
    return dataclasses.replace(
        recipe,
        inputs={n: dataclasses.replace(s, space=spaces[n]) for n, s in recipe.inputs.items()},
        nodes={n: dataclasses.replace(node, space=spaces[n]) for n, node in recipe.nodes.items()},
    )


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
