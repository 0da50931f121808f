"""GGUF files (ComfyUI-GGUF's diffusion models), read tensor by tensor.

The `gguf` package parses the header (key-value fields and tensor table);
tensor data is memory-mapped here and dequantized on read by
`sdrecipe.io.ggml_quants`, one tensor at a time. Names and shapes are those
ComfyUI-GGUF gives the model: the stored name, the GGML dimensions reversed,
or the shape a `comfy.gguf.orig_shape.<name>` field records for a tensor the
converter reshaped.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch

from sdrecipe.arch.family import Family
from sdrecipe.errors import RecipeError
from sdrecipe.io import ggml_quants
from sdrecipe.io.fingerprint import (
    Fingerprint,
    fingerprint_file,
    gguf_content_digest,
    span_digests,
)
from sdrecipe.io.mapped_files import map_file, require_regular_file
from sdrecipe.io.model_reader import ModelReader, with_model_prefix
from sdrecipe.io.quantized import DEQUANTIZATION_VERSION
from sdrecipe.io.tensor_info import TensorInfo

# GGML types held as plain numbers: read in place, like a safetensors tensor.
PLAIN_TYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}
ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
ARCHITECTURE_FIELD = "general.architecture"
# The header values gguf's parser reads one by one: a language model's tokenizer holds
# a few hundred thousand; a damaged count must not keep it reading for hours.
MAX_HEADER_READS = 4_000_000
# Header fields kept as metadata: short scalars and strings.
_MAX_METADATA_VALUE = 4096


@dataclass(frozen=True)
class GgufTensor:
    """Where one tensor's blocks are, their GGML type, and the shape it is read as."""

    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class _Truncated(Exception):
    pass


class _TooLong(Exception):
    pass


def _checked_reader_class() -> type:
    """gguf's reader, failing on any read past the end of the file instead of
    reading on (a damaged length would otherwise loop for as long as it says),
    with the tensor table left to `GgufReader`."""
    import gguf

    class CheckedReader(gguf.GGUFReader):  # type: ignore[misc]
        reads = 0

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None):
            if offset + np.dtype(dtype).itemsize * int(count) > self.data.shape[0]:
                raise _Truncated
            self.reads += 1
            if self.reads > MAX_HEADER_READS:
                raise _TooLong
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            self.tensor_fields = fields

    return CheckedReader


class GgufReader:
    """A GGUF model: header parsed up front, each tensor read from a memory
    map (F32/F16/BF16 without a copy) and dequantized to float32 on read."""

    def __init__(self, path: Path):
        self.path = path
        require_regular_file(path)
        try:
            parsed = _checked_reader_class()(path, "r")
        except _TooLong:
            raise self._error(
                f"the header holds more than {MAX_HEADER_READS:,} values (fields, array "
                "items, tensors): not a model sdrecipe reads"
            ) from None
        except _Truncated:
            raise self._error(
                "the file is truncated inside its header (incomplete download?)"
            ) from None
        except (
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            OverflowError,
            UnicodeDecodeError,
        ) as exc:
            raise self._error(f"not a GGUF file this reader understands ({exc})") from None
        except OSError as exc:
            raise RecipeError(f"cannot read the model: {exc.strerror or exc}", path) from None
        self.file_size = int(parsed.data.shape[0])
        self.data_start = int(parsed.data_offset)
        fields = parsed.fields
        self.metadata = _metadata(fields)
        self._tensors: dict[str, GgufTensor] = {}
        for field in parsed.tensor_fields:
            name, tensor = self._tensor(field, parsed.data_offset, fields)
            if name in self._tensors:
                raise self._error(f"tensor {name!r} is stored twice")
            self._tensors[name] = tensor
        del parsed  # its map of the file; tensors are read through our own
        spans = sorted(self._tensors.items(), key=lambda item: item[1].offset)
        for (before, first), (name, second) in itertools.pairwise(spans):
            if first.offset + first.nbytes > second.offset:
                raise self._error(f"tensor {name!r} overlaps tensor {before!r}")
        self._mmap: mmap.mmap | None = None

    def _error(self, message: str) -> RecipeError:
        return RecipeError(message, self.path)

    def _tensor(self, field: Any, data_start: int, fields: dict) -> tuple[str, GgufTensor]:
        import gguf

        _, name_data, _, dims, raw_type, offset = field.parts
        name = bytes(name_data).decode("utf-8", "replace")
        code = int(raw_type[0])
        try:
            type_name = gguf.GGMLQuantizationType(code).name
        except ValueError:
            type_name = f"type {code}"
        if type_name not in PLAIN_TYPES and type_name not in ggml_quants.DEQUANTIZABLE:
            readable = ", ".join([*PLAIN_TYPES, *sorted(ggml_quants.DEQUANTIZABLE)])
            raise self._error(
                f"tensor {name!r} is stored as GGML {type_name}, which sdrecipe cannot "
                f"dequantize (it reads {readable})"
            )
        ggml_shape = tuple(int(d) for d in dims)
        numel = math.prod(ggml_shape)
        try:
            nbytes = ggml_quants.stored_nbytes(type_name, numel)
        except ValueError:
            raise self._error(
                f"tensor {name!r}: {numel} values are not whole {type_name} blocks"
            ) from None
        shape = tuple(reversed(ggml_shape))
        recorded = fields.get(ORIG_SHAPE_FIELD + name)
        if recorded is not None:
            shape = tuple(int(d) for d in recorded.contents())
            if math.prod(shape) != numel:
                raise self._error(
                    f"tensor {name!r}: the recorded original shape {list(shape)} does not "
                    f"hold its {numel} values"
                )
        start = data_start + int(offset[0])
        if start + nbytes > self.file_size:
            raise self._error(
                f"tensor {name!r} lies past the end of the file: the file is truncated "
                "(incomplete download?)"
            )
        return name, GgufTensor(type_name, shape, start, nbytes)

    def keys(self) -> list[str]:
        """Tensor names in the order the file lists them."""
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        """A plain tensor's dtype, float32 for a quantized one; the shape it is read as."""
        tensor = self._tensors[key]
        return TensorInfo(PLAIN_TYPES.get(tensor.type_name, torch.float32), tensor.shape)

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every tensor."""
        return {key: self.info(key) for key in self._tensors}

    def stored(self, key: str) -> tuple[str, int]:
        """The GGML type of `key` and the bytes it takes."""
        tensor = self._tensors[key]
        return tensor.type_name, tensor.nbytes

    def _mapped(self) -> mmap.mmap:
        if self._mmap is None:
            self._mmap = map_file(self.path, self.file_size)
        return self._mmap

    def tensor(self, key: str) -> torch.Tensor:
        """A plain tensor as a view of the file; a quantized one dequantized (float32)."""
        stored = self._tensors[key]
        info = self.info(key)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        data = torch.frombuffer(
            self._mapped(), dtype=torch.uint8, count=stored.nbytes, offset=stored.offset
        )
        if stored.type_name in PLAIN_TYPES:
            return data.view(info.dtype).view(info.shape)
        return ggml_quants.dequantize(data, stored.type_name, info.numel).view(info.shape)

    def raw(self, key: str) -> memoryview:
        """The bytes of the tensor `tensor` gives."""
        return memoryview(self.tensor(key).reshape(-1).view(torch.uint8).numpy())

    def fingerprint(self) -> Fingerprint:
        """The file's sha256, and each tensor's digest: a plain tensor's as a
        safetensors tensor's; a quantized one's of its type, shape and blocks."""
        spans = {}
        for key, stored in self._tensors.items():
            plain = stored.type_name in PLAIN_TYPES
            info = self.info(key) if plain else TensorInfo(torch.uint8, (stored.nbytes,))
            spans[key] = (stored.offset, stored.offset + stored.nbytes, info)
        found = fingerprint_file(self.path, spans)
        tensors = dict(found.tensors)
        for key, stored in self._tensors.items():
            if stored.type_name not in PLAIN_TYPES:
                described = [DEQUANTIZATION_VERSION, "gguf", stored.type_name, list(stored.shape)]
                tensors[key] = blake3.blake3(
                    json.dumps([*described, tensors[key]]).encode()
                ).hexdigest()
        return Fingerprint(found.sha256, found.legacy, tensors)

    def content_digest(self) -> str:
        """The file's `gguf_content_digest`, from one read."""
        spans: dict[str, tuple[int, int, TensorInfo]] = {}
        position = self.data_start
        for key, stored in sorted(self._tensors.items(), key=lambda item: item[1].offset):
            spans[f"\0gap {position}"] = _uint8_span(position, stored.offset)
            spans[key] = _uint8_span(stored.offset, stored.offset + stored.nbytes)
            position = stored.offset + stored.nbytes
        spans[f"\0gap {position}"] = _uint8_span(position, self.file_size)
        digests = span_digests(self.path, {k: v for k, v in spans.items() if v[1] > v[0]})
        with open(self.path, "rb") as handle:
            header = handle.read(self.data_start)
        ordered = sorted(digests, key=lambda key: spans[key][0])
        return gguf_content_digest(header, (digests[key] for key in ordered))

    def quantization(self) -> str | None:
        """What the file stores, e.g. `GGUF Q8_0 in 300 of 780 tensors (F32 480)`; None
        when no tensor is quantized."""
        counts: dict[str, int] = {}
        for stored in self._tensors.values():
            counts[stored.type_name] = counts.get(stored.type_name, 0) + 1
        quantized = {t: n for t, n in counts.items() if t not in PLAIN_TYPES}
        if not quantized:
            return None
        main = ", ".join(f"{t} {n}" for t, n in sorted(quantized.items()))
        plain = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()) if t in PLAIN_TYPES)
        return f"GGUF {main} of {len(self._tensors)} tensors" + (f" ({plain})" if plain else "")


def open_gguf(path: Path) -> ModelReader:
    """A GGUF model under the names sdrecipe detects: a bare SD1/SDXL UNet's
    keys are seen under the UNet's prefix, as in a checkpoint. A file whose
    `general.architecture` names another family than its tensors is refused."""
    from sdrecipe.arch.detect import detect
    from sdrecipe.arch.family import families

    reader = GgufReader(path)
    architecture = reader.metadata.get(ARCHITECTURE_FIELD)
    named = [f for f in families() if f.gguf and f.gguf.architecture == architecture]
    found = detect(reader.infos(), reader.metadata).family
    if found == "unknown" and named:
        prefix = gguf_prefix(named[0])
        if prefix and not any(key.startswith(prefix) for key in reader.infos()):
            prefixed = with_model_prefix(reader, "", prefix)
            found = detect(prefixed.infos(), prefixed.metadata).family
            if found != "unknown":
                return prefixed
    if named and found != "unknown" and found not in {f.name for f in named}:
        raise RecipeError(
            f"the file says its {ARCHITECTURE_FIELD} is {architecture!r}, and its tensors "
            f"are a {found} model's; the file is mislabelled or damaged",
            path,
        )
    return reader


def gguf_prefix(family: Family) -> str:
    """The prefix of the component a GGUF of `family` holds (stored without it)."""
    assert family.gguf is not None
    return next(c.prefix for c in family.components if c.name == family.gguf.component)


def _uint8_span(start: int, end: int) -> tuple[int, int, TensorInfo]:
    return start, end, TensorInfo(torch.uint8, (end - start,))


def _metadata(fields: dict) -> dict[str, str]:
    """The header's scalar and string fields, as strings."""
    import gguf

    found = {}
    for name, field in fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        text = str(value)
        if len(text) <= _MAX_METADATA_VALUE:
            found[name] = text
    return found
