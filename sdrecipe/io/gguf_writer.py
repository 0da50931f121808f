"""Streaming, atomic writing of GGUF files that ComfyUI-GGUF loads.

The layout is fixed up front, as for safetensors (`SafetensorsWriter`): a
GGUF v3 header (key-value fields, then each tensor's name, GGML dimensions,
type and data offset), padded to 32 bytes, then each tensor's blocks at a
32-byte aligned offset. Tensors are then written piece by piece (whole rows,
which are whole blocks) from any thread into a temporary file beside the
target, renamed into place when complete.

Fields: `general.architecture` (the family's name in ComfyUI-GGUF),
`general.quantization_version`, `general.file_type`, and every metadata
field of the output (sdrecipe's provenance, modelspec) as a string.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrecipe.io.encodings import GgmlType
from sdrecipe.io.fingerprint import gguf_content_digest, tensor_digest
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo

ALIGNMENT = 32
_VERSION = 3
_QUANTIZATION_VERSION = 2
_UINT32, _STRING = 4, 8


def _type_id(type_name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[type_name])


def _file_type(quant: str) -> int:
    """llama.cpp's `general.file_type` for a model mostly in `quant`."""
    import gguf

    return int(gguf.LlamaFileType["ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"])


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def encode_gguf_header(
    names: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    encodings: Mapping[str, GgmlType],
    stored: Mapping[str, TensorInfo],
    fields: Mapping[str, str | int],
) -> tuple[bytes, dict[str, int]]:
    """The header bytes (padded) and each tensor's absolute data offset; `names`
    maps each key to its name in the file, in storage order."""
    parts = [b"GGUF", struct.pack("<IQQ", _VERSION, len(names), len(fields))]
    for field, value in fields.items():
        if isinstance(value, int):
            parts.append(_string(field) + struct.pack("<II", _UINT32, value))
        else:
            parts.append(_string(field) + struct.pack("<I", _STRING) + _string(value))
    relative: dict[str, int] = {}
    position = 0
    for key, name in names.items():
        dims = tuple(reversed(shapes[key])) or (1,)
        type_id = _type_id(encodings[key].type_name)
        parts.append(
            _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, position)
        )
        relative[key] = position
        position += stored[key].nbytes
        position += -position % ALIGNMENT
    header = b"".join(parts)
    header += b"\0" * (-len(header) % ALIGNMENT)
    return header, {key: len(header) + offset for key, offset in relative.items()}


class GgufWriter(SafetensorsWriter):
    """Writes one GGUF file through a temporary file: `info(key)` is the
    tensor's stored bytes (a flat uint8 tensor); `write` takes them."""

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        encodings: Mapping[str, GgmlType],
        metadata: dict[str, str],
        architecture: str,
        quant: str,
        prefix: str,
        drop_written: bool = False,
    ):
        stored = {key: encodings[key].stored(info) for key, info in tensors.items()}
        names = {key: key.removeprefix(prefix) if prefix else key for key in tensors}
        fields: dict[str, str | int] = {
            **metadata,
            "general.architecture": architecture,
            "general.quantization_version": _QUANTIZATION_VERSION,
            "general.file_type": _file_type(quant),
        }
        shapes = {key: info.shape for key, info in tensors.items()}
        layout = encode_gguf_header(names, shapes, encodings, stored, fields)
        super().__init__(path, stored, {}, drop_written=drop_written, layout=layout)

    def content_digest(self, tensor_digests: Mapping[str, str]) -> str | None:
        """The file's `gguf_content_digest` from its tensors' digests (the padding
        between them is zeros), without reading it back; None when one is missing."""
        if tensor_digests.keys() != self.slots.keys():
            return None
        digests = []
        position = len(self._header)
        for key, slot in sorted(self.slots.items(), key=lambda item: item[1].offset):
            if slot.offset > position:
                digests.append(padding_digest(slot.offset - position))
            digests.append(tensor_digests[key])
            position = slot.offset + slot.info.nbytes
        return gguf_content_digest(self._header, digests)


def padding_digest(size: int) -> str:
    """The digest of `size` zero bytes between tensors."""
    return tensor_digest(TensorInfo(torch.uint8, (size,)), [bytes(size)])
