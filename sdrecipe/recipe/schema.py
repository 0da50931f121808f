"""The recipe file's schema (version 1), validated by pydantic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sdrecipe.arch import COMPONENTS
from sdrecipe.io.output_formats import OutputFormatName, output_format
from sdrecipe.io.shard_layout import parse_shard_size

DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "fp8_e4m3fn": "fp8_e4m3fn",
    "float8_e4m3fn": "fp8_e4m3fn",
    "fp8": "fp8_e4m3fn",
    "fp8_e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
}

OutputDtype = Literal["float16", "bfloat16", "float32", "fp8_e4m3fn", "fp8_e5m2"]
# What a `format: gguf` output stores its matrices as (see sdrecipe.io.gguf_writer).
GgufQuant = Literal["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"]
# The components a node selects: every family's (sdrecipe.arch.COMPONENTS).
Component = Literal[COMPONENTS]  # type: ignore[valid-type]
# sdrecipe's own provenance fields (see sdrecipe.plan.provenance). Earlier outputs held
# one JSON object under LEGACY_PROVENANCE_FIELD instead.
VERSION_FIELD = "sdrecipe.version"
NODE_FIELD = "sdrecipe.node"
EXPRESSION_FIELD = "sdrecipe.expression"
RECIPE_FIELD = "sdrecipe.recipe"
# Each input's quantized storage and the output's, as JSON (see sdrecipe.plan.provenance).
QUANTIZATION_FIELD = "sdrecipe.quantization"
PROVENANCE_FIELDS = (
    VERSION_FIELD,
    NODE_FIELD,
    EXPRESSION_FIELD,
    RECIPE_FIELD,
    QUANTIZATION_FIELD,
)
LEGACY_PROVENANCE_FIELD = "sdrecipe"
# Metadata keys that sdrecipe writes itself.
RESERVED_METADATA = (
    "format",
    LEGACY_PROVENANCE_FIELD,
    *PROVENANCE_FIELDS,
    "sd_merge_recipe",
    "sd_merge_models",
)


LORA_OPTIONS = ("rank", "conv_rank", "clamp_quantile", "text_encoder", "naming")
# The node options besides `expression`, `method` and `models`.
NODE_OPTIONS = (
    "cache",
    "force",
    "allow_unmatched",
    "only",
    "exclude",
    "include_keys",
    "exclude_keys",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputEntry(_Strict):
    """An input model file, optionally pinned by its sha256."""

    path: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class NodeEntry(BaseModel):
    """Mapping form of a node: `expression`, or `method` with `models` and the
    method's parameters as extra keys; plus node options."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    expression: str | None = Field(default=None, min_length=1)
    method: str | None = Field(default=None, min_length=1)
    models: list[str] | None = Field(default=None, min_length=1)
    cache: bool | None = None
    force: bool = False
    allow_unmatched: bool = False
    only: list[Component] | None = Field(default=None, min_length=1)
    exclude: list[Component] | None = Field(default=None, min_length=1)
    include_keys: list[str] | None = Field(default=None, min_length=1)
    exclude_keys: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> NodeEntry:
        if (self.expression is None) == (self.method is None):
            raise ValueError("give either `expression`, or `method` with `models`")
        if self.method is not None and self.models is None:
            raise ValueError("`method` needs `models`")
        if self.expression is not None and self.models is not None:
            raise ValueError("an `expression` node takes no `models`")
        if self.expression is not None and self.model_extra:
            unknown = ", ".join(repr(key) for key in self.model_extra)
            options = ", ".join(NODE_OPTIONS)
            raise ValueError(
                f"unknown option {unknown} (options: {options}; method parameters go in the "
                "expression, e.g. weighted_sum(A, B, alpha=0.3))"
            )
        return self

    @property
    def parameters(self) -> dict[str, Any]:
        """The method parameters: every key that is not a field."""
        return dict(self.model_extra or {})


class OutputEntry(_Strict):
    """An output file written from a node."""

    path: str = Field(min_length=1)
    format: OutputFormatName = "safetensors"
    dtype: OutputDtype | None = None
    # fp8 dtypes only: ComfyUI's scaled fp8 (a scale per matrix, and the marker).
    scaled: bool = False
    # `format: gguf` only: the GGML type of the matrices.
    quant: GgufQuant | None = None
    prune_ema: bool = False
    space: Literal["model", "difference"] | None = None
    vae: str | None = Field(default=None, min_length=1)
    metadata: dict[str, str] = Field(default_factory=dict)
    # Bytes of tensor data per shard (`5GB`, `2GiB`, or an int): see `sdrecipe.io.shard_layout`.
    max_shard_size: int | None = None
    # `format: lora` only: the extracted LoRA's ranks, clamp, and text encoders.
    rank: int | None = Field(default=None, ge=1)
    conv_rank: int | None = Field(default=None, ge=1)
    clamp_quantile: float | None = Field(default=None, gt=0.0, le=1.0)
    text_encoder: bool | Literal["auto"] | None = None
    naming: Literal["kohya", "peft"] | None = None

    @model_validator(mode="after")
    def _quantized_options(self) -> OutputEntry:
        fp8 = self.dtype is not None and self.dtype.startswith("fp8")
        if self.scaled and not fp8:
            raise ValueError("`scaled: true` applies to an fp8 dtype (fp8_e4m3fn, fp8_e5m2)")
        if fp8 and self.dtype not in output_format(self.format).dtypes:
            raise ValueError(
                f"an fp8 dtype applies to a safetensors model, not `format: {self.format}`"
            )
        if self.quant is not None and not output_format(self.format).ggml:
            raise ValueError("`quant` applies to `format: gguf` outputs only")
        problem = output_format(self.format).option_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _lora_options(self) -> OutputEntry:
        options = [n for n in LORA_OPTIONS if getattr(self, n) is not None]
        if options and not output_format(self.format).extracts_lora:
            raise ValueError(f"{', '.join(options)} apply to `format: lora` outputs only")
        return self

    @field_validator("metadata")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(set(value) & set(RESERVED_METADATA))
        if reserved:
            raise ValueError(f"sdrecipe writes {', '.join(reserved)} itself")
        return value

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _shard_size(cls, value: Any) -> Any:
        return value if value is None else parse_shard_size(value)

    @field_validator("dtype", mode="before")
    @classmethod
    def _normalise_dtype(cls, value: Any) -> Any:
        if isinstance(value, str):
            return DTYPE_ALIASES.get(value.lower(), value)
        return value

    @field_validator("quant", mode="before")
    @classmethod
    def _normalise_quant(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class RecipeDocument(_Strict):
    """The whole recipe file."""

    version: Literal[1] = 1
    inputs: dict[str, str | InputEntry] = Field(min_length=1)
    nodes: dict[str, str | NodeEntry] = Field(min_length=1)
    outputs: dict[str, str | OutputEntry] = Field(min_length=1)
