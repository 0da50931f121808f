"""The output formats sdrecipe writes, each one class registered by name (imports no torch).

A format holds what the rest of sdrecipe asks about it: its name, the suffixes
its file takes, whether it is a folder or may be sharded, whether the cache
may keep it as a pack, the dtypes and options it accepts, and how to open its
writer (whose module is imported only then). Adding a format is one class
here, decorated with `register`, and its writer module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, TypeVar

from sdrecipe.io.formats import PICKLE_SUFFIXES
from sdrecipe.io.writers import OutputWriter

if TYPE_CHECKING:
    import torch

    from sdrecipe.arch.detect import Architecture
    from sdrecipe.io.encodings import Encoding
    from sdrecipe.io.tensor_info import TensorInfo
    from sdrecipe.recipe.model import Output

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
FP8_DTYPES = ("fp8_e4m3fn", "fp8_e5m2")


class OutputOptions(Protocol):
    """The options of an output entry that a format may refuse."""

    dtype: str | None
    space: str | None
    vae: str | None
    prune_ema: bool
    max_shard_size: int | None


@dataclass(frozen=True)
class WriteJob:
    """What a writer is opened with: the output, its tensors and header
    metadata, the base's architecture, the tokenizer folders a diffusers folder
    copies, whether written pages leave the page cache (see
    `SafetensorsWriter`), and the tensors stored otherwise than as their
    dtype's values (a GGUF output's GGML types)."""

    output: Output
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    architecture: Architecture
    tokenizers: Mapping[str, Path] = field(default_factory=dict)
    drop_written: bool = False
    encodings: Mapping[str, Encoding] = field(default_factory=dict)
    # Where a LoRA output's factors are extracted (None: the CPU).
    device: torch.device | None = None


class OutputFormat(ABC):
    """One output format: what it accepts and how it is written."""

    name: ClassVar[str]
    # The suffixes its file must end in, which no other format's may (none: any other).
    suffixes: ClassVar[tuple[str, ...]] = ()
    # Suffixes its file may not end in.
    refused_suffixes: ClassVar[tuple[str, ...]] = ()
    # Written as a folder rather than one file.
    folder: ClassVar[bool] = False
    # With `max_shard_size`, its file is written as shards beside an index.
    sharded_file: ClassVar[bool] = False
    # The cache may keep its file as a pack: it reads tensors back as safetensors.
    packable: ClassVar[bool] = True
    # The dtypes `dtype` may name.
    dtypes: ClassVar[tuple[str, ...]] = FLOAT_DTYPES
    # The GGML type of its matrices when `quant` is not given (None: it takes no `quant`).
    default_quant: ClassVar[str | None] = None
    # A LoRA extracted from a difference, which takes the LoRA options.
    extracts_lora: ClassVar[bool] = False
    # It holds copies of the base's tokenizer files, whose bytes decide its own.
    copies_tokenizers: ClassVar[bool] = False

    @property
    def ggml(self) -> bool:
        """Whether its tensors are stored as GGML types (`quant`)."""
        return self.default_quant is not None

    def fits_suffix(self, suffix: str) -> bool:
        """Whether its file may end in `suffix` (lower case): one of its
        `suffixes`, or, when it has none, not another format's."""
        if self.suffixes:
            return suffix in self.suffixes
        return not any(suffix in other.suffixes for other in OUTPUT_FORMATS.values())

    def option_problem(self, options: OutputOptions) -> str | None:
        """Why an output entry's `options` do not apply to this format, or None."""
        return None

    @abstractmethod
    def open_writer(self, job: WriteJob) -> OutputWriter:
        """A writer for `job.output` in this format."""


# Every output format by name, in the order the recipe schema lists them.
OUTPUT_FORMATS: dict[str, OutputFormat] = {}
_Format = TypeVar("_Format", bound=type[OutputFormat])


def register(cls: _Format) -> _Format:
    """Class decorator: make `cls` the output format of its `name`."""
    OUTPUT_FORMATS[cls.name] = cls()
    return cls


def output_format(name: str) -> OutputFormat:
    """The output format called `name` (KeyError for none)."""
    return OUTPUT_FORMATS[name]


@register
class Safetensors(OutputFormat):
    """One safetensors file, or its shards beside an index with `max_shard_size`;
    never named as a pickled checkpoint is, which can run code when loaded."""

    name = "safetensors"
    refused_suffixes = PICKLE_SUFFIXES
    sharded_file = True
    dtypes = FLOAT_DTYPES + FP8_DTYPES

    def open_writer(self, job: WriteJob) -> OutputWriter:
        """A `SafetensorsWriter`, or a `ShardedWriter` with `max_shard_size`."""
        from sdrecipe.io.sharded_writer import open_safetensors_writer

        output = job.output
        return open_safetensors_writer(
            output.path, job.tensors, job.metadata, output.max_shard_size, job.drop_written
        )


@register
class Diffusers(OutputFormat):
    """A diffusers folder: each component's weights (sharded with
    `max_shard_size`) and config, and the base's tokenizers."""

    name = "diffusers"
    folder = True
    packable = False
    copies_tokenizers = True

    def open_writer(self, job: WriteJob) -> OutputWriter:
        """A `DiffusersWriter`."""
        from sdrecipe.io.diffusers_writer import DiffusersWriter

        return DiffusersWriter(
            job.output.path,
            job.tensors,
            job.metadata,
            job.architecture,
            job.tokenizers,
            job.drop_written,
            job.output.max_shard_size,
        )


@register
class Lora(OutputFormat):
    """A LoRA extracted from a difference node: one small safetensors file."""

    name = "lora"
    extracts_lora = True

    def option_problem(self, options: OutputOptions) -> str | None:
        """A LoRA takes no model `space`, `vae`, `prune_ema` or `max_shard_size`."""
        if options.space == "model":
            return "a LoRA holds a difference, not a model (drop `space`)"
        if options.vae is not None or options.prune_ema:
            return "`vae` and `prune_ema` do not apply to a LoRA"
        if options.max_shard_size is not None:
            return "`max_shard_size` does not apply to a LoRA (it is one small file)"
        return None

    def open_writer(self, job: WriteJob) -> OutputWriter:
        """A `LoraWriter`, which keeps what it is given (a LoRA is small)."""
        from sdrecipe.io.lora_writer import LoraWriter

        output = job.output
        assert output.lora is not None
        return LoraWriter(
            output.path, job.tensors, job.metadata, job.architecture.family, output.lora, job.device
        )


@register
class Gguf(OutputFormat):
    """A GGUF file of the diffusion model, for ComfyUI-GGUF: its matrices as
    `quant` says, the types of the rest fixed."""

    name = "gguf"
    suffixes = (".gguf",)
    packable = False
    dtypes = ()
    default_quant = "Q8_0"

    def option_problem(self, options: OutputOptions) -> str | None:
        """A GGUF output takes no `dtype`, `vae` or `max_shard_size`."""
        if options.dtype is not None:
            return "a GGUF output's types come from `quant`, not `dtype`"
        if options.vae is not None or options.max_shard_size is not None:
            return "`vae` and `max_shard_size` do not apply to a GGUF output"
        return None

    def open_writer(self, job: WriteJob) -> OutputWriter:
        """A `GgufWriter` of the family's GGUF architecture (the job's
        `encodings` give each tensor's GGML type)."""
        from sdrecipe.arch.family import known
        from sdrecipe.io.gguf_reader import gguf_prefix
        from sdrecipe.io.gguf_writer import GgufWriter

        output = job.output
        family = known(job.architecture.family)
        assert family is not None and family.gguf is not None and output.quant is not None
        return GgufWriter(
            output.path,
            job.tensors,
            job.encodings,
            job.metadata,
            family.gguf.architecture,
            output.quant,
            gguf_prefix(family),
            job.drop_written,
        )


# A format's name, as a recipe gives it.
OutputFormatName = Literal[tuple(OUTPUT_FORMATS)]  # type: ignore[valid-type]


def open_writer(job: WriteJob) -> OutputWriter:
    """A writer for one output, opened by its format."""
    return output_format(job.output.format).open_writer(job)
