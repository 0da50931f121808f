"""The merge-method registry: methods declare their models, spaces and typed parameters.

A method is a function of tensors. Its positional parameters are the models
(`*models` for any number of them); its keyword-only parameters, with type
hints and defaults, are the method's parameters (float, int, bool, a
`Literal` choice, a list of numbers); a keyword-only `context: KeyContext`
makes it key-aware: it is told which key it computes, and each key's result
gets an identity of its own. A keyword-only `dtype: torch.dtype` asks for the
operands as stored (any floating dtypes, never modified) and the compute dtype
beside them, so a whole-tensor method can convert one piece at a time instead
of holding a converted copy of every operand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic

if TYPE_CHECKING:
    import torch

    from sdrecipe.recipe.expr import ParamValue

MethodFunction = Callable[..., "torch.Tensor"]
MODEL = "model"
DIFFERENCE = "difference"
# The keyword-only parameter through which key-aware methods receive a KeyContext.
CONTEXT_PARAMETER = "context"
# The keyword-only parameter through which methods that convert operands piecewise
# receive the compute dtype.
DTYPE_PARAMETER = "dtype"
# How a method runs in a build on a device (`--device`): SAME_BYTES, on the device,
# giving the CPU's bytes on every device class; OWN_BYTES, on the device, its bytes
# depending on the device class (recorded in its identity and the lock); neither
# (None): on the CPU, its operands copied back for it.
CPU = "cpu"
SAME_BYTES = "same bytes"
OWN_BYTES = "own bytes"


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: a pure function of tensors and typed parameters.

    The function receives tensors of one floating dtype (the compute dtype) and of
    one shape, must not modify them, and returns a new tensor of that dtype and shape.
    `elementwise` methods may be evaluated on any slice of rows independently;
    the others get whole tensors, so they hold one key's operands and result.

    `spaces` maps each model parameter (and `return`) to `model`, `difference`
    or a name standing for "the same space as every other parameter so named".
    """

    name: str
    function: MethodFunction
    model_names: tuple[str, ...]
    variadic: bool
    min_models: int
    parameters: type[pydantic.BaseModel]
    elementwise: bool
    key_aware: bool
    takes_dtype: bool = False
    spaces: Mapping[str, str] = field(default_factory=dict)
    # The parameter a method of one model multiplies it by, where that is all it
    # does (`scale`): a LoRA's factors are then scaled instead of its whole delta.
    scales_by: str | None = None
    # Runs the compiled loops (methods/kernels.py): a build that uses it loads
    # them while it prepares (see `preload_kernels`).
    compiled: bool = False
    # How it runs in a device build (SAME_BYTES, OWN_BYTES or None: on the CPU), and
    # the function that does (operands and result on one torch device).
    device: str | None = None
    on_device: MethodFunction | None = None

    @property
    def signature(self) -> str:
        """e.g. `ties(base, *models, density=0.2, ...)`, for help and errors."""
        models = (
            [*self.model_names[:-1], f"*{self.model_names[-1]}"]
            if self.variadic
            else [*self.model_names]
        )
        params = [f"{name}={info.default!r}" for name, info in self.parameters.model_fields.items()]
        return f"{self.name}({', '.join(models + params)})"

    def check_model_count(self, count: int) -> str | None:
        """Why `count` models do not fit, or None."""
        if self.variadic and count < self.min_models:
            return f"{self.name}() takes at least {self.min_models} models, got {count}"
        if not self.variadic and count != len(self.model_names):
            return (
                f"{self.name}() takes {len(self.model_names)} models "
                f"({', '.join(self.model_names)}), got {count}"
            )
        return None

    def operand_space(self, index: int) -> str:
        """The declared space of the `index`-th model argument."""
        name = self.model_names[min(index, len(self.model_names) - 1)]
        return self.spaces.get(name, "S")

    def validate(self, values: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
        """Check parameter names and types; fill in defaults. A `PerKey` value is
        checked entry by entry, and gets the parameter's default if it names none.
        Raises ValueError with a readable message."""
        # Imported here: the recipe package imports this registry.
        from sdrecipe.recipe.expr import PerKey
        from sdrecipe.recipe.per_key import check_labels, per_block

        values = dict(values)
        for name, value in values.items():
            field = self.parameters.model_fields.get(name)
            if field and _is_number(field.annotation) and isinstance(value, str | tuple):
                try:
                    values[name] = per_block(value)
                except ValueError as exc:
                    raise ValueError(f"{self.name}: parameter {name!r}: {exc}") from None
        plain = {k: v for k, v in values.items() if not isinstance(v, PerKey)}
        checked = self._validated(plain)
        for name, value in values.items():
            if not isinstance(value, PerKey):
                continue
            if name not in self.parameters.model_fields:
                self._validated({name: 0})  # raises: unknown parameter
            annotation = self.parameters.model_fields[name].annotation
            if not _is_number(annotation):
                raise ValueError(f"{self.name}: parameter {name!r} cannot vary by key")
            problem = check_labels(value)
            if problem:
                raise ValueError(f"{self.name}: parameter {name!r}: {problem}")
            entries = [
                (label, self._validated({name: number})[name]) for label, number in value.entries
            ]
            if "default" not in dict(entries):
                entries.insert(0, ("default", checked[name]))
            checked[name] = PerKey(tuple(entries), value.source)
        return {name: checked[name] for name in self.parameters.model_fields}

    def _validated(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validated values; lists are given and kept as tuples (expressions are hashable)."""
        as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        try:
            checked = self.parameters.model_validate(as_lists).model_dump()
            return {k: tuple(v) if isinstance(v, list) else v for k, v in checked.items()}
        except pydantic.ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "parameters"
                if error["type"] == "extra_forbidden":
                    known = ", ".join(self.parameters.model_fields) or "none"
                    problems.append(f"unknown parameter {where!r} (known: {known})")
                else:
                    problems.append(f"parameter {where!r}: {error['msg']} (got {error['input']!r})")
            raise ValueError(f"{self.name}: " + "; ".join(problems)) from None


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    *,
    elementwise: bool = True,
    spaces: Mapping[str, str] | None = None,
    min_models: int | None = None,
    scales_by: str | None = None,
    compiled: bool = False,
    device: str | None = None,
) -> Callable[[MethodFunction], MethodFunction]:
    """Register a function as a merge method (see the module's docstring).

    `spaces` declares the operands' and result's spaces (default: all the same,
    as for an affine blend); `min_models` the fewest models a variadic method takes
    (default: its named models and one more); `scales_by` the parameter a
    method of one model multiplies it by, when that is all it does; `compiled`
    that it runs the compiled loops; `device` that the function itself runs on
    any torch device, with the CPU's bytes (SAME_BYTES) or not (OWN_BYTES).
    """

    def register(function: MethodFunction) -> MethodFunction:
        # Only the parameters' annotations are evaluated, so registering a method
        # does not import torch (a no-op build decides without it).
        signature = inspect.signature(function)
        kinds = inspect.Parameter
        models = [
            name
            for name, p in signature.parameters.items()
            if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.VAR_POSITIONAL)
        ]
        variadic = any(p.kind is kinds.VAR_POSITIONAL for p in signature.parameters.values())
        fields: dict[str, Any] = {
            name: (_resolve(p.annotation, function), p.default)
            for name, p in signature.parameters.items()
            if p.kind is kinds.KEYWORD_ONLY and name not in (CONTEXT_PARAMETER, DTYPE_PARAMETER)
        }
        parameters = pydantic.create_model(
            f"{function.__name__}_parameters",
            __config__=pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False),
            **fields,
        )
        _REGISTRY[function.__name__] = MergeMethod(
            name=function.__name__,
            function=function,
            model_names=tuple(models),
            variadic=variadic,
            min_models=len(models) if min_models is None else min_models,
            parameters=parameters,
            elementwise=elementwise,
            key_aware=CONTEXT_PARAMETER in signature.parameters,
            takes_dtype=DTYPE_PARAMETER in signature.parameters,
            spaces=dict(spaces or {}),
            scales_by=scales_by,
            compiled=compiled,
            device=device,
            on_device=function if device else None,
        )
        return function

    return register


def device_path(name: str, device: str = SAME_BYTES) -> Callable[[MethodFunction], MethodFunction]:
    """Register `function` as method `name`'s implementation on a device (its
    CPU function runs loops no device has): same parameters, operands and
    result on one torch device, and with SAME_BYTES the CPU function's bytes."""

    def register(function: MethodFunction) -> MethodFunction:
        method = _REGISTRY[name]
        if _parameters(function) != _parameters(method.function):
            raise TypeError(f"{function.__name__} does not take {name}'s parameters")
        _REGISTRY[name] = dataclasses.replace(method, device=device, on_device=function)
        return function

    return register


def _parameters(function: MethodFunction) -> list[tuple[str, Any, Any]]:
    """A function's parameters as a call sees them: names, kinds and defaults."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def _is_number(annotation: Any) -> bool:
    """True for float and int annotations, also inside `Annotated[...]`."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation in (float, int)


def _resolve(annotation: Any, function: MethodFunction) -> Any:
    """Evaluate a string annotation in the namespace of the method's module."""
    if isinstance(annotation, str):
        return eval(annotation, function.__globals__)  # our own source, never user input
    return annotation


def preload_kernels() -> None:
    """Load the compiled loops on a daemon thread: importing numba and its
    first call take about a second, which a build's preparation (reading
    headers, the plan) and its other worker would otherwise wait for. A
    failure here is left to the method's own first call to report."""
    import threading

    def load() -> None:
        with contextlib.suppress(Exception):
            from sdrecipe.methods.kernels import warm_up

            warm_up()

    threading.Thread(target=load, name="sdrecipe-kernels", daemon=True).start()


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; KeyError lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown method {name!r} (known: {known})") from None


def registered_methods() -> list[MergeMethod]:
    """Every registered method, by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
