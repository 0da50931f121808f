"""The recipe file's schema (version 1), validated by pydantic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

OutputDtype = Literal["float16", "bfloat16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputEntry(_Strict):
    """An input model file, optionally pinned by its sha256."""

    path: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class MethodNodeEntry(BaseModel):
    """Long form of a node: a method, its models, and its parameters as extra keys."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    method: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)

    @property
    def parameters(self) -> dict[str, Any]:
        """The method parameters: every key but `method` and `models`."""
        return dict(self.model_extra or {})


class OutputEntry(_Strict):
    """An output file written from a node."""

    path: str = Field(min_length=1)
    dtype: OutputDtype | None = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _normalise_dtype(cls, value: Any) -> Any:
        if isinstance(value, str):
            return DTYPE_ALIASES.get(value.lower(), value)
        return value


class RecipeDocument(_Strict):
    """The whole recipe file."""

    version: Literal[1] = 1
    inputs: dict[str, str | InputEntry] = Field(min_length=1)
    nodes: dict[str, str | MethodNodeEntry] = Field(min_length=1)
    outputs: dict[str, str | OutputEntry] = Field(min_length=1)
