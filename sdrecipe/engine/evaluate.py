"""Evaluation of a merge expression on tensors of one key.

Operands may be stored in any floating dtype; arithmetic runs in the compute
dtype and the result is a new tensor of that dtype. Operands are never modified.
Temporaries that the evaluation itself created are reused in place, so
``A + (B - C)`` allocates a single result tensor. An operand may be a LoRA's
`LowRankDelta`: scaled as a number and added (or subtracted) as factors,
made whole for anything else.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdrecipe.adapters.low_rank import LowRankDelta
from sdrecipe.io.dtypes import widened
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import CONTEXT_PARAMETER, DTYPE_PARAMETER
from sdrecipe.recipe.expr import BinOp, Call, Expr, ExprVisitor, Neg, Num, Ref
from sdrecipe.recipe.per_key import KeyContext

Operand = torch.Tensor | LowRankDelta


def evaluate(
    expr: Expr,
    operands: Mapping[str, Operand],
    dtype: torch.dtype,
    context: KeyContext | None = None,
    on_device: bool = False,
) -> torch.Tensor:
    """The value of model expression `expr` (its per-key parameters resolved),
    computed in `dtype`; key-aware methods are given `context`. `on_device`:
    the operands are on a build's device, and methods run their device path."""
    evaluator = _Evaluator(operands, dtype, context, on_device)
    return evaluator.fresh(*evaluator.visit(expr))


class _Evaluator(ExprVisitor[tuple[Operand, bool]]):
    """Visits to (value, owned): owned values were created here and may be modified."""

    def __init__(
        self,
        operands: Mapping[str, Operand],
        dtype: torch.dtype,
        context: KeyContext | None,
        on_device: bool,
    ):
        self.operands = operands
        self.dtype = dtype
        self.context = context
        self.on_device = on_device

    def fresh(self, value: Operand, owned: bool) -> torch.Tensor:
        """`value` as a tensor this evaluation may modify."""
        if isinstance(value, LowRankDelta):
            return value.dense(self.dtype)
        return value if owned else value.to(self.dtype, copy=True)

    def tensor(self, value: Operand) -> torch.Tensor:
        """`value` as a tensor (a low-rank delta made whole)."""
        return value.dense(self.dtype) if isinstance(value, LowRankDelta) else value

    def visit_ref(self, expr: Ref) -> tuple[Operand, bool]:
        operand = self.operands[expr.name]
        if isinstance(operand, LowRankDelta):
            return operand, False
        if operand.dtype.itemsize == 1:
            # torch does no arithmetic that mixes float8 with wider types.
            return widened(operand, self.dtype), True
        return operand, False

    def visit_neg(self, expr: Neg) -> tuple[Operand, bool]:
        value, owned = self.visit(expr.operand)
        if isinstance(value, LowRankDelta):
            return value.scaled(-1.0), True
        return self.fresh(value, owned).neg_(), True

    def visit_call(self, expr: Call) -> tuple[Operand, bool]:
        method = get_method(expr.method)
        found = [self.visit(arg)[0] for arg in expr.args]
        params = dict(expr.params)
        if method.scales_by is not None and isinstance(found[0], LowRankDelta):
            default = method.parameters.model_fields[method.scales_by].default
            return found[0].scaled(float(params.get(method.scales_by, default))), True
        args = [self.tensor(arg) for arg in found]
        if method.takes_dtype:
            params[DTYPE_PARAMETER] = self.dtype
        else:
            args = [arg.to(self.dtype) for arg in args]
        if method.key_aware:
            params[CONTEXT_PARAMETER] = self.context
        function = method.on_device if self.on_device else method.function
        assert function is not None  # the executor runs a node on a device only if it can
        return function(*args, **params), True

    def visit_binop(self, expr: BinOp) -> tuple[Operand, bool]:
        if expr.op in "*/":
            model, scalar = (
                (expr.right, expr.left) if isinstance(expr.left, Num) else (expr.left, expr.right)
            )
            assert isinstance(scalar, Num)
            found, owned = self.visit(model)
            if isinstance(found, LowRankDelta):
                factor = scalar.value if expr.op == "*" else 1.0 / scalar.value
                return found.scaled(factor), True
            value = self.fresh(found, owned)
            if expr.op == "*":
                return value.mul_(scalar.value), True
            if self.on_device:
                # CUDA divides by a number as a product with its reciprocal, which rounds
                # otherwise than the CPU's division; by a tensor it divides.
                divisor = torch.full((), scalar.value, dtype=value.dtype, device=value.device)
                return value.div_(divisor), True
            return value.div_(scalar.value), True
        left, left_owned = self.visit(expr.left)
        right, right_owned = self.visit(expr.right)
        if isinstance(right, LowRankDelta) and not isinstance(left, LowRankDelta):
            delta = right if expr.op == "+" else right.scaled(-1.0)
            return delta.add_to(self.fresh(left, left_owned)), True
        if isinstance(left, LowRankDelta) and expr.op == "+":
            return left.add_to(self.fresh(right, right_owned)), True
        if isinstance(left, LowRankDelta):
            left, left_owned = left.dense(self.dtype), True
        if isinstance(right, LowRankDelta):
            right, right_owned = right.dense(self.dtype), True
        if expr.op == "+":
            if right_owned and not left_owned:
                return right.add_(left), True
            return self.fresh(left, left_owned).add_(right), True
        if right_owned and not left_owned:
            # l - r == -r + l exactly in IEEE arithmetic.
            return right.neg_().add_(left), True
        return self.fresh(left, left_owned).sub_(right), True
