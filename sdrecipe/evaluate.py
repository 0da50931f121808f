"""Evaluation of a merge expression on tensors of one key.

Operands may be stored in any floating dtype; arithmetic runs in the compute
dtype and the result is a new tensor of that dtype. Operands are never modified.
Temporaries that the evaluation itself created are reused in place, so
``A + (B - C)`` allocates a single result tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdrecipe.io.dtypes import widened
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import CONTEXT_PARAMETER, DTYPE_PARAMETER
from sdrecipe.per_key import KeyContext
from sdrecipe.recipe.expr import BinOp, Call, Expr, ExprVisitor, Neg, Num, Ref


def evaluate(
    expr: Expr,
    operands: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    context: KeyContext | None = None,
) -> torch.Tensor:
    """The value of model expression `expr` (its per-key parameters resolved),
    computed in `dtype`; key-aware methods are given `context`."""
    value, owned = _Evaluator(operands, dtype, context).visit(expr)
    return value if owned else value.to(dtype, copy=True)


class _Evaluator(ExprVisitor[tuple[torch.Tensor, bool]]):
    """Visits to (value, owned): owned values were created here and may be modified."""

    def __init__(
        self, operands: Mapping[str, torch.Tensor], dtype: torch.dtype, context: KeyContext | None
    ):
        self.operands = operands
        self.dtype = dtype
        self.context = context

    def fresh(self, value: torch.Tensor, owned: bool) -> torch.Tensor:
        """`value` as a tensor this evaluation may modify."""
        return value if owned else value.to(self.dtype, copy=True)

    def visit_ref(self, expr: Ref) -> tuple[torch.Tensor, bool]:
        operand = self.operands[expr.name]
        if operand.dtype.itemsize == 1:
            # torch does no arithmetic that mixes float8 with wider types.
            return widened(operand, self.dtype), True
        return operand, False

    def visit_neg(self, expr: Neg) -> tuple[torch.Tensor, bool]:
        return self.fresh(*self.visit(expr.operand)).neg_(), True

    def visit_call(self, expr: Call) -> tuple[torch.Tensor, bool]:
        method = get_method(expr.method)
        args = [self.visit(arg)[0] for arg in expr.args]
        params = dict(expr.params)
        if method.takes_dtype:
            params[DTYPE_PARAMETER] = self.dtype
        else:
            args = [arg.to(self.dtype) for arg in args]
        if method.key_aware:
            params[CONTEXT_PARAMETER] = self.context
        return method.function(*args, **params), True

    def visit_binop(self, expr: BinOp) -> tuple[torch.Tensor, bool]:
        if expr.op in "*/":
            model, scalar = (
                (expr.right, expr.left) if isinstance(expr.left, Num) else (expr.left, expr.right)
            )
            assert isinstance(scalar, Num)
            value = self.fresh(*self.visit(model))
            return (value.mul_ if expr.op == "*" else value.div_)(scalar.value), True
        left, left_owned = self.visit(expr.left)
        right, right_owned = self.visit(expr.right)
        if expr.op == "+":
            if right_owned and not left_owned:
                return right.add_(left), True
            return self.fresh(left, left_owned).add_(right), True
        if right_owned and not left_owned:
            # l - r == -r + l exactly in IEEE arithmetic.
            return right.neg_().add_(left), True
        return self.fresh(left, left_owned).sub_(right), True
