"""The merge-method registry: methods declare their models and typed parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic

if TYPE_CHECKING:
    import torch

MethodFunction = Callable[..., "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: a pure function of `model_count` tensors and typed parameters.

    The function receives tensors of one floating dtype (the compute dtype) and of
    one shape, must not modify them, and returns a new tensor of that dtype and shape.
    `elementwise` methods may be evaluated on any slice of rows independently.
    """

    name: str
    function: MethodFunction
    model_names: tuple[str, ...]
    parameters: type[pydantic.BaseModel]
    elementwise: bool

    def validate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Check parameter names and types; raise ValueError with a readable message."""
        try:
            return self.parameters.model_validate(dict(values)).model_dump()
        except pydantic.ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "parameters"
                if error["type"] == "extra_forbidden":
                    known = ", ".join(self.parameters.model_fields) or "none"
                    problems.append(f"unknown parameter {where!r} (known: {known})")
                else:
                    problems.append(f"parameter {where!r}: {error['msg']}")
            raise ValueError(f"{self.name}: " + "; ".join(problems)) from None


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(*, elementwise: bool = True) -> Callable[[MethodFunction], MethodFunction]:
    """Register a function as a merge method.

    Positional parameters are the models; keyword-only parameters, with type hints
    and defaults, are the method's parameters, validated strictly by pydantic.
    """

    def register(function: MethodFunction) -> MethodFunction:
        # Only the parameters' annotations are evaluated, so registering a method
        # does not import torch (a no-op build decides without it).
        signature = inspect.signature(function)
        models = tuple(
            name
            for name, p in signature.parameters.items()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        fields: dict[str, Any] = {
            name: (_resolve(p.annotation, function), p.default)
            for name, p in signature.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        parameters = pydantic.create_model(
            f"{function.__name__}_parameters",
            __config__=pydantic.ConfigDict(extra="forbid", strict=True),
            **fields,
        )
        _REGISTRY[function.__name__] = MergeMethod(
            function.__name__, function, models, parameters, elementwise
        )
        return function

    return register


def _resolve(annotation: Any, function: MethodFunction) -> Any:
    """Evaluate a string annotation in the namespace of the method's module."""
    if isinstance(annotation, str):
        return eval(annotation, function.__globals__)  # our own source, never user input
    return annotation


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; KeyError lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown method {name!r} (known: {known})") from None
