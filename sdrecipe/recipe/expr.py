"""Safe parser for merge expressions such as ``A + 0.5 * (B - C)``.

The parser is a small recursive-descent parser over a fixed token set; it never
evaluates code. Every sub-expression is either a *model* or a *scalar*. Scalar
sub-expressions are folded to numbers at parse time, and the algebra is checked:
models add and subtract, and scale by scalars; a product of two models, a
number added to a model or a division by a model is rejected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar


class ExpressionError(ValueError):
    """A malformed expression; `column` is 1-based."""

    def __init__(self, message: str, column: int):
        super().__init__(message)
        self.message = message
        self.column = column


@dataclass(frozen=True)
class Ref:
    """A reference to an input or node by name."""

    name: str


@dataclass(frozen=True)
class Num:
    """A scalar constant."""

    value: float


@dataclass(frozen=True)
class BinOp:
    """``left op right`` with op in ``+ - * /``; at least one side is a model."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg:
    """Unary minus of a model."""

    operand: Expr


@dataclass(frozen=True)
class PerKey:
    """A numeric parameter whose value depends on the tensor key: `default`, and
    overrides named by component (`unet`, `vae`, `text_encoder`, ...), block ID
    or `re:REGEX`, in the order written. `sdrecipe.keyed` resolves it per key.
    `source` says what was written when it was not a mapping (a pasted list, a
    preset), for messages; it is not part of the value."""

    entries: tuple[tuple[str, float | int], ...]
    source: str | None = field(default=None, compare=False)


# A method parameter's value: a number, a flag, a choice, a list of numbers, or
# a number per key.
ParamValue = float | int | bool | str | tuple[float | int, ...] | PerKey


@dataclass(frozen=True)
class Call:
    """A merge-method call: model arguments and typed keyword parameters."""

    method: str
    args: tuple[Expr, ...]
    params: tuple[tuple[str, ParamValue], ...]


Expr = Ref | Num | BinOp | Neg | Call
Result = TypeVar("Result")

_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<string>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')"
    r"|(?P<op>[-+*/(),=\[\]{}:]))"
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CLOSERS = (",", ")", "]", "}")


@dataclass(frozen=True)
class _Token:
    kind: str  # "num" | "name" | "op" | "end"
    text: str
    column: int


def _tokenize(source: str) -> Iterator[_Token]:
    position = 0
    while True:
        while position < len(source) and source[position].isspace():
            position += 1
        if position == len(source):
            yield _Token("end", "", position + 1)
            return
        match = _TOKEN.match(source, position)
        if match is None or match.lastgroup is None:
            raise ExpressionError(f"unexpected character {source[position]!r}", position + 1)
        yield _Token(
            match.lastgroup, match.group(match.lastgroup), match.start(match.lastgroup) + 1
        )
        position = match.end()


def is_model(expr: Expr) -> bool:
    """True when `expr` denotes a model (anything but a folded scalar)."""
    return not isinstance(expr, Num)


def _fold(op: str, left: float, right: float, column: int) -> Num:
    if op == "+":
        value = left + right
    elif op == "-":
        value = left - right
    elif op == "*":
        value = left * right
    elif right == 0:
        raise ExpressionError("division by zero", column)
    else:
        value = left / right
    if not math.isfinite(value):
        raise ExpressionError("the number is out of range", column)
    return Num(value)


def _combine(op: str, left: Expr, right: Expr, column: int) -> Expr:
    if isinstance(left, Num) and isinstance(right, Num):
        return _fold(op, left.value, right.value, column)
    if op in "+-":
        if isinstance(left, Num) or isinstance(right, Num):
            raise ExpressionError(
                f"cannot {'add' if op == '+' else 'subtract'} a number and a model; "
                "scale a model with '*' instead",
                column,
            )
    elif op == "*":
        if is_model(left) and is_model(right):
            raise ExpressionError("a product of two models is not allowed", column)
    elif is_model(right):
        raise ExpressionError("division by a model is not allowed", column)
    elif right.value == 0:  # type: ignore[union-attr]
        raise ExpressionError("division by zero", column)
    return BinOp(op, left, right)


# Parentheses, calls and unary minus nested deeper than this, or operations
# chained deeper than MAX_DEPTH, are refused (they would exhaust Python's stack).
MAX_NESTING = 50
MAX_DEPTH = 200


class _Parser:
    def __init__(self, source: str):
        self.tokens = list(_tokenize(source))
        self.index = 0
        self.nesting = 0

    def nested(self, column: int) -> _Nesting:
        """Count one level of nesting for the `with` block."""
        return _Nesting(self, column)

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, text: str) -> _Token:
        if self.current.text != text or self.current.kind != "op":
            raise ExpressionError(
                f"expected {text!r}, found {self._describe()}", self.current.column
            )
        return self.advance()

    def _describe(self) -> str:
        return "the end" if self.current.kind == "end" else repr(self.current.text)

    def parse(self) -> Expr:
        expr = self.sum()
        if self.current.kind != "end":
            raise ExpressionError(f"unexpected {self._describe()}", self.current.column)
        return expr

    def sum(self) -> Expr:
        expr = self.product()
        while self.current.kind == "op" and self.current.text in "+-":
            token = self.advance()
            expr = _combine(token.text, expr, self.product(), token.column)
        return expr

    def product(self) -> Expr:
        expr = self.unary()
        while self.current.kind == "op" and self.current.text in "*/":
            token = self.advance()
            expr = _combine(token.text, expr, self.unary(), token.column)
        return expr

    def unary(self) -> Expr:
        if self.current.kind == "op" and self.current.text == "-":
            with self.nested(self.advance().column):
                operand = self.unary()
            if isinstance(operand, Num):
                return Num(-operand.value)
            return operand.operand if isinstance(operand, Neg) else Neg(operand)
        return self.atom()

    def atom(self) -> Expr:
        token = self.current
        if token.kind == "num":
            self.advance()
            value = float(token.text)
            if not math.isfinite(value):
                raise ExpressionError("the number is out of range", token.column)
            return Num(value)
        if token.kind == "name":
            self.advance()
            if self.current.kind == "op" and self.current.text == "(":
                with self.nested(token.column):
                    return self.call(token)
            return Ref(token.text)
        if token.kind == "op" and token.text == "(":
            with self.nested(self.advance().column):
                expr = self.sum()
            self.expect(")")
            return expr
        raise ExpressionError(
            f"expected a name, a number or '(', found {self._describe()}", token.column
        )

    def call(self, name: _Token) -> Call:
        self.expect("(")
        args: list[Expr] = []
        params: dict[str, float] = {}
        while not (self.current.kind == "op" and self.current.text == ")"):
            if self.current.kind == "name" and self.tokens[self.index + 1].text == "=":
                key = self.advance()
                self.advance()
                if key.text in params:
                    raise ExpressionError(f"parameter {key.text!r} is given twice", key.column)
                params[key.text] = self.param_value(key.text)
            else:
                column = self.current.column
                if params:
                    raise ExpressionError("a model argument follows a keyword parameter", column)
                arg = self.sum()
                if not is_model(arg):
                    raise ExpressionError(
                        f"{name.text}() takes models as positional arguments; "
                        "pass numbers as keyword parameters, e.g. alpha=0.5",
                        column,
                    )
                args.append(arg)
            if self.current.kind == "op" and self.current.text == ",":
                self.advance()
            elif not (self.current.kind == "op" and self.current.text == ")"):
                raise ExpressionError(
                    f"expected ',' or ')', found {self._describe()}", self.current.column
                )
        closing = self.expect(")")
        if not args:
            raise ExpressionError(f"{name.text}() needs at least one model", closing.column)
        return Call(name.text, tuple(args), tuple(params.items()))

    def is_op(self, text: str) -> bool:
        return self.current.kind == "op" and self.current.text == text

    def param_value(self, name: str) -> ParamValue:
        """A number, `true`/`false`, a bare name or quoted string, `[numbers]` or
        `{name: number}`."""
        token = self.current
        if token.kind == "string":
            self.advance()
            return _unquote(token.text)
        if token.kind == "name" and self.tokens[self.index + 1].text in _CLOSERS:
            self.advance()  # a flag, or a bare choice such as a preset name
            return token.text == "true" if token.text in ("true", "false") else token.text
        if self.is_op("["):
            self.advance()
            items = []
            while not self.is_op("]"):
                items.append(self.number(name))
                if not self.is_op("]"):
                    self.expect(",")
            self.advance()
            return tuple(items)
        if self.is_op("{"):
            self.advance()
            entries: dict[str, float | int] = {}
            while not self.is_op("}"):
                entry = self.advance()
                if entry.kind not in ("name", "string"):
                    raise ExpressionError(f"parameter {name!r}: expected a name", entry.column)
                label = _unquote(entry.text) if entry.kind == "string" else entry.text
                if label in entries:
                    raise ExpressionError(f"{label!r} is given twice", entry.column)
                self.expect(":")
                entries[label] = self.number(name)
                if not self.is_op("}"):
                    self.expect(",")
            self.advance()
            return PerKey(tuple(entries.items()))
        return self.number(name)

    def number(self, name: str) -> float | int:
        """A folded number; an integer literal stays an int (for seeds and counts)."""
        start = self.index
        negative = self.is_op("-")
        literal = self.tokens[start + negative]
        after = self.tokens[start + negative + 1]
        if literal.kind == "num" and literal.text.isdigit() and after.text in _CLOSERS:
            self.index = start + negative + 1
            return -int(literal.text) if negative else int(literal.text)
        value = self.sum()
        if is_model(value):
            raise ExpressionError(f"parameter {name!r} must be a number", self.tokens[start].column)
        return value.value  # type: ignore[union-attr]


def _unquote(text: str) -> str:
    """The content of a quoted string token, with `\\` escapes undone."""
    return re.sub(r"\\(.)", r"\1", text[1:-1])


class _Nesting:
    def __init__(self, parser: _Parser, column: int):
        self.parser = parser
        self.column = column

    def __enter__(self) -> None:
        self.parser.nesting += 1
        if self.parser.nesting > MAX_NESTING:
            raise ExpressionError(
                f"the expression nests parentheses, calls or signs more than {MAX_NESTING} "
                "levels deep",
                self.column,
            )

    def __exit__(self, *exc_info: object) -> None:
        self.parser.nesting -= 1


class ExprVisitor(Generic[Result]):
    """One walk over expression trees: `visit` dispatches on the node's type to
    `visit_ref`, `visit_num`, `visit_binop`, `visit_neg` or `visit_call`."""

    def visit(self, expr: Expr) -> Result:
        return getattr(self, _VISIT_METHOD[type(expr)])(expr)


class ExprTransformer(ExprVisitor[Expr]):
    """A visitor that rebuilds the tree; override a `visit_*` to change the
    nodes of one kind (`params` to change a call's parameters)."""

    def visit_ref(self, expr: Ref) -> Expr:
        return expr

    def visit_num(self, expr: Num) -> Expr:
        return expr

    def visit_binop(self, expr: BinOp) -> Expr:
        return BinOp(expr.op, self.visit(expr.left), self.visit(expr.right))

    def visit_neg(self, expr: Neg) -> Expr:
        return Neg(self.visit(expr.operand))

    def visit_call(self, expr: Call) -> Expr:
        return Call(expr.method, tuple(self.visit(arg) for arg in expr.args), self.params(expr))

    def params(self, call: Call) -> tuple[tuple[str, ParamValue], ...]:
        return call.params


_VISIT_METHOD = {
    Ref: "visit_ref",
    Num: "visit_num",
    BinOp: "visit_binop",
    Neg: "visit_neg",
    Call: "visit_call",
}


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of `expr`, parents before children, left to right (no recursion)."""
    pending = [expr]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(reversed(_children(node)))


def depth(expr: Expr) -> int:
    """The number of levels in `expr`'s tree (1 for a name), computed without recursion."""
    deepest = 0
    pending: list[tuple[Expr, int]] = [(expr, 1)]
    while pending:
        node, level = pending.pop()
        deepest = max(deepest, level)
        pending.extend((child, level + 1) for child in _children(node))
    return deepest


def _children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, Neg):
        return (expr.operand,)
    if isinstance(expr, Call):
        return expr.args
    return ()


def parse_expression(source: str) -> Expr:
    """Parse and fold `source`; raise ExpressionError unless it denotes a model."""
    expr = _Parser(source).parse()
    if not is_model(expr):
        raise ExpressionError("the expression must use at least one model", 1)
    if depth(expr) > MAX_DEPTH:
        raise ExpressionError(
            f"the expression is more than {MAX_DEPTH} operations deep; split it into several nodes",
            1,
        )
    return expr


def method_calls(expr: Expr) -> list[str]:
    """Names of the methods `expr` calls, outermost first."""
    return [node.method for node in walk(expr) if isinstance(node, Call)]


def references(expr: Expr) -> list[str]:
    """Names referenced by `expr`, each once, in left-to-right order."""
    return list(dict.fromkeys(node.name for node in walk(expr) if isinstance(node, Ref)))


class _Renamer(ExprTransformer):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def visit_ref(self, expr: Ref) -> Expr:
        return Ref(self.names.get(expr.name, expr.name))


def rename_references(expr: Expr, names: dict[str, str]) -> Expr:
    """`expr` with each reference renamed through `names`."""
    return _Renamer(names).visit(expr)


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def format_value(value: ParamValue) -> str:
    """A parameter value as the parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return (
        "{"
        + ", ".join(
            f"{label if _IDENTIFIER.match(label) else json.dumps(label, ensure_ascii=False)}: "
            f"{format_value(number)}"
            for label, number in value.entries
        )
        + "}"
    )


def format_expression(expr: Expr) -> str:
    """Canonical text of `expr`; parsing it gives back an equal expression."""
    return _format(expr, 0)


def _format(expr: Expr, context: int) -> str:
    if isinstance(expr, Ref):
        return expr.name
    if isinstance(expr, Num):
        text = repr(expr.value)
        return f"({text})" if text.startswith("-") and context else text
    if isinstance(expr, Neg):
        text = "-" + _format(expr.operand, 3)
        return f"({text})" if context > 1 else text
    if isinstance(expr, Call):
        parts = [_format(arg, 0) for arg in expr.args]
        parts += [f"{key}={format_value(value)}" for key, value in expr.params]
        return f"{expr.method}({', '.join(parts)})"
    precedence = _PRECEDENCE[expr.op]
    left = _format(expr.left, precedence)
    right = _format(expr.right, precedence + 1)
    text = f"{left} {expr.op} {right}"
    return f"({text})" if precedence < context else text
