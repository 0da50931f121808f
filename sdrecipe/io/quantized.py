"""Quantized safetensors files seen as the float tensors they stand for.

Two kinds of files store weights whose bytes mean something only with other
tensors beside them:

- ComfyUI's scaled fp8: an fp8 `<layer>.weight` times its `<layer>.scale_weight`
  (legacy, with a `scaled_fp8` marker) or `<layer>.weight_scale` (newer, with a
  `<layer>.comfy_quant` JSON tensor or the `_quantization_metadata` header
  field saying the layer's format). `scale_input`/`input_scale` scale the
  activations at run time and are no part of the weight.
- bitsandbytes 4-bit (NF4/FP4, Forge's checkpoints): a packed `<layer>.weight`
  (two 4-bit codes a byte, the first in the high half) whose codes index the
  16-entry `quant_map`, times one `absmax` per block of `blocksize` values; the
  absmax may itself be 8-bit blockwise (`nested_absmax`, `nested_quant_map`,
  `nested_offset`). Its shape, dtype and sizes are JSON in
  `<layer>.weight.quant_state.bitsandbytes__nf4|fp4`.

`DequantizedReader` shows such a file under its weights' names only, each
dequantized on read, tensor by tensor, to float32; the scale, code book and
state tensors are consumed. Its digests cover every stored tensor a weight is
made from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from sdrecipe.errors import RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.dtypes import UNQUANTIZED, widened
from sdrecipe.io.fingerprint import Fingerprint
from sdrecipe.io.model_reader import ModelReader, RenamedReader, stored_as
from sdrecipe.io.tensor_info import TensorInfo

# Names a change of how weights are dequantized, so older digests are not reused.
DEQUANTIZATION_VERSION = "sdrecipe-dequantize-1"

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_LEGACY_MARKER = "scaled_fp8"
_SCALES = ("scale_weight", "weight_scale")
_RUN_TIME_SCALES = ("scale_input", "input_scale")
_BNB_STATE = "quant_state.bitsandbytes__"
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BNB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_STATE_BYTES = 4096
# The header field where newer ComfyUI files say each layer's format.
QUANTIZATION_METADATA = "_quantization_metadata"


@dataclass(frozen=True)
class ScaledFp8Weight:
    """An fp8 weight times its scale (one number, or one a row)."""

    weight: str
    scale: str
    fmt: str

    def parts(self) -> dict[str, str]:
        return {"weight": self.weight, "scale": self.scale}


@dataclass(frozen=True)
class Bnb4Weight:
    """A bitsandbytes 4-bit weight and what its state says."""

    weight: str
    state: str
    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, ...]
    nested_blocksize: int | None
    nested_offset: float | None

    @property
    def fmt(self) -> str:
        return f"bitsandbytes {self.quant_type}"

    def parts(self) -> dict[str, str]:
        names = {"weight": self.weight, "absmax": f"{self.weight}.absmax"}
        names["quant_map"] = f"{self.weight}.quant_map"
        if self.nested_blocksize is not None:
            names["nested_absmax"] = f"{self.weight}.nested_absmax"
            names["nested_quant_map"] = f"{self.weight}.nested_quant_map"
        return names


Scheme = ScaledFp8Weight | Bnb4Weight


class DequantizedReader(RenamedReader):
    """A quantized safetensors file under its weights' names, dequantized to
    float32 on read; other tensors as they are stored."""

    def __init__(self, reader: ModelReader, schemes: dict[str, Scheme], consumed: set[str]):
        names = {key: key for key in reader.infos() if key not in consumed}
        super().__init__(reader, names)
        self.schemes = schemes

    def info(self, key: str) -> TensorInfo:
        """Float32 and the weight's shape for a quantized weight, else as stored."""
        scheme = self.schemes.get(key)
        if scheme is None:
            return self.wrapped.info(key)
        shape = scheme.shape if isinstance(scheme, Bnb4Weight) else self.wrapped.info(key).shape
        return TensorInfo(torch.float32, shape)

    def tensor(self, key: str) -> torch.Tensor:
        """The weight, dequantized (a new float32 tensor), or a view of a plain tensor."""
        scheme = self.schemes.get(key)
        if scheme is None:
            return self.wrapped.tensor(key)
        if isinstance(scheme, ScaledFp8Weight):
            weight = widened(self.wrapped.tensor(scheme.weight), torch.float32)
            scale = self.wrapped.tensor(scheme.scale).to(torch.float32)
            return weight.mul_(scale.reshape(_scale_shape(scale, weight.shape)))
        return self._bnb4(scheme)

    def _bnb4(self, scheme: Bnb4Weight) -> torch.Tensor:
        read = self.wrapped.tensor
        absmax = read(f"{scheme.weight}.absmax")
        if scheme.nested_blocksize is not None:
            code = read(f"{scheme.weight}.nested_quant_map").to(torch.float32)
            outer = read(f"{scheme.weight}.nested_absmax").to(torch.float32)
            absmax = blockwise(code[absmax.reshape(-1).long()], outer, scheme.nested_blocksize)
            absmax += scheme.nested_offset
        else:
            absmax = absmax.reshape(-1).to(torch.float32)
        packed = read(scheme.weight).reshape(-1).numpy()
        codes = np.empty(packed.size * 2, dtype=np.uint8)  # byte codes: no int64 index copy
        codes[0::2] = packed >> 4
        codes[1::2] = packed & 0xF
        table = read(f"{scheme.weight}.quant_map").to(torch.float32).numpy()
        values = torch.from_numpy(np.take(table, codes[: math.prod(scheme.shape)]))
        return blockwise(values, absmax, scheme.blocksize).reshape(scheme.shape)

    def stored(self, key: str) -> tuple[str, int]:
        """The stored type (`F8_E4M3 scaled`, `NF4`, or a dtype code) and bytes of `key`."""
        scheme = self.schemes.get(key)
        if scheme is None:
            return stored_as(self.wrapped, key)
        size = sum(self.wrapped.info(name).nbytes for name in scheme.parts().values())
        if isinstance(scheme, Bnb4Weight):
            return scheme.quant_type.upper(), size
        return f"{stored_as(self.wrapped, scheme.weight)[0]} scaled", size

    def raw(self, key: str) -> memoryview:
        """The bytes of the tensor `tensor` gives."""
        if key not in self.schemes:
            return self.wrapped.raw(key)
        return memoryview(self.tensor(key).reshape(-1).view(torch.uint8).numpy())

    def renamed(self, found: Fingerprint) -> Fingerprint:
        """Each weight's digest: of how it is stored, and of every tensor it is made from."""
        if isinstance(self.wrapped, RenamedReader):
            found = self.wrapped.renamed(found)
        own = found.tensors
        tensors = {}
        for key in self.keys():
            scheme = self.schemes.get(key)
            if scheme is None:
                tensors[key] = own[key]
                continue
            parts = sorted((role, own[name]) for role, name in scheme.parts().items())
            described = json.dumps([DEQUANTIZATION_VERSION, repr(scheme), parts])
            tensors[key] = blake3.blake3(described.encode()).hexdigest()
        return Fingerprint(found.sha256, found.legacy, tensors)

    def quantization(self) -> str:
        """What the file stores, e.g. `ComfyUI scaled fp8 (F8_E4M3) in 304 of 780 tensors`."""
        formats = sorted({scheme.fmt for scheme in self.schemes.values()})
        return f"{', '.join(formats)} in {len(self.schemes)} of {len(self.keys())} tensors"


def quantization_of(reader: ModelReader) -> str | None:
    """What quantized storage a model input has, in words (None: none): its
    dequantized formats, or the share of tensors stored as plain fp8."""
    while True:
        describe = getattr(reader, "quantization", None)
        if describe is not None:
            return describe()
        if not isinstance(reader, RenamedReader):
            break
        reader = reader.wrapped
    infos = reader.infos()
    fp8 = {}
    for info in infos.values():
        if info.dtype in FP8_DTYPES:
            name = str(info.dtype).removeprefix("torch.")
            fp8[name] = fp8.get(name, 0) + 1
    if not fp8:
        return None
    found = ", ".join(f"{name} in {count}" for name, count in sorted(fp8.items()))
    return f"fp8 ({found} of {len(infos)} tensors)"


def dequantized_keys(reader: ModelReader) -> int:
    """How many of `reader`'s tensors are quantized and read as float32."""
    while isinstance(reader, RenamedReader) and not isinstance(reader, DequantizedReader):
        reader = reader.wrapped
    if isinstance(reader, DequantizedReader):
        return len(reader.schemes)
    stored = getattr(reader, "stored", None)
    if stored is None:
        return 0
    return sum(
        info.is_floating and stored(key)[0] not in UNQUANTIZED
        for key, info in reader.infos().items()
    )


def blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`values` (flat, modified in place) times one scale per block of `blocksize`;
    the last block may be short."""
    whole = values.numel() // blocksize * blocksize
    values[:whole].view(-1, blocksize).mul_(scales[: whole // blocksize, None])
    if whole < values.numel():
        values[whole:].mul_(scales[whole // blocksize])
    return values


def _scale_shape(scale: torch.Tensor, shape: torch.Size) -> tuple[int, ...]:
    """How a per-tensor or per-row scale broadcasts over a weight of `shape`."""
    if scale.numel() == 1:
        return ()
    return (shape[0],) + (1,) * (len(shape) - 1)


def dequantized(reader: ModelReader) -> ModelReader:
    """`reader` itself, or a `DequantizedReader` where the file stores quantized
    weights; RecipeError names the tensor whose quantization is not understood."""
    infos = reader.infos()
    consumed: set[str] = set()
    schemes: dict[str, Scheme] = {}
    layer_formats = _comfy_layer_formats(reader, infos, consumed)
    marker = next((k for k in infos if k.split(".")[-1] == _LEGACY_MARKER), None)
    if marker is not None:
        consumed.update(k for k in infos if k.split(".")[-1] == _LEGACY_MARKER)
    for key in infos:
        stem, _, last = key.rpartition(".")
        if last in _SCALES or last in _RUN_TIME_SCALES:
            consumed.add(key)
            if last in _SCALES:
                schemes[f"{stem}.weight"] = _scaled_fp8(reader, infos, stem, key, layer_formats)
        elif _BNB_STATE in key:
            weight = key.split(f".{_BNB_STATE}")[0]
            schemes[weight] = _bnb4(reader, infos, weight, key)
            consumed.add(key)
            consumed.update(p for p in (f"{weight}.{part}" for part in _BNB_PARTS) if p in infos)
    loose = [k for k in infos if k.rpartition(".")[2] in _BNB_PARTS and k not in consumed]
    if loose:
        raise RecipeError(
            f"tensor {loose[0]!r} is a bitsandbytes 4-bit part, but its weight has no "
            "quant_state tensor saying how it is packed; the file is damaged",
            reader.path,
        )
    unscaled = [
        k
        for k, info in infos.items()
        if info.dtype in FP8_DTYPES
        and k not in schemes
        and k not in consumed
        and (marker or layer_formats)
    ]
    if unscaled:
        raise RecipeError(
            f"tensor {unscaled[0]!r} is fp8 in a scaled-fp8 file, and the file has no scale "
            f"for it ({unscaled[0].rpartition('.')[0]}.scale_weight or .weight_scale), so its "
            f"values cannot be known ({len(unscaled)} such tensor(s)); the file is damaged",
            reader.path,
        )
    unused = sorted(set(layer_formats) - {s.rpartition(".")[0] for s in schemes})
    if unused:
        raise RecipeError(
            f"layer {unused[0]!r} has a quantization format but no weight scale", reader.path
        )
    if not schemes:
        return reader
    return DequantizedReader(reader, schemes, consumed)


def _comfy_layer_formats(
    reader: ModelReader, infos: dict[str, TensorInfo], consumed: set[str]
) -> dict[str, str]:
    """Each layer's format from `<layer>.comfy_quant` tensors or the
    `_quantization_metadata` header field."""
    formats: dict[str, str] = {}
    header = reader.metadata.get(QUANTIZATION_METADATA)
    if header is not None:
        try:
            layers = load_json(header)["layers"]  # type: ignore[index]
            formats.update({str(k): str(v["format"]) for k, v in layers.items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RecipeError(
                f"the {QUANTIZATION_METADATA} header field is not the layer table ComfyUI "
                'writes ({"layers": {name: {"format": ...}}})',
                reader.path,
            ) from None
    for key in infos:
        if key.endswith(".comfy_quant"):
            consumed.add(key)
            if infos[key].nbytes > _MAX_STATE_BYTES:
                raise RecipeError(f"tensor {key!r} is too large to be a layer format", reader.path)
            data = bytes(reader.tensor(key).reshape(-1).to(torch.uint8).numpy())
            try:
                formats[key.removesuffix(".comfy_quant")] = str(load_json(data)["format"])  # type: ignore[index]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise RecipeError(
                    f"tensor {key!r} is not the JSON layer format ComfyUI writes", reader.path
                ) from None
    return formats


def _scaled_fp8(
    reader: ModelReader,
    infos: dict[str, TensorInfo],
    stem: str,
    scale: str,
    layer_formats: dict[str, str],
) -> ScaledFp8Weight:
    weight = f"{stem}.weight"
    if weight not in infos:
        raise RecipeError(
            f"tensor {scale!r} scales {weight!r}, which is not in the file", reader.path
        )
    fmt = layer_formats.get(stem)
    info = infos[weight]
    if fmt is not None and (fmt not in _FP8_FORMATS or _FP8_FORMATS[fmt] != info.dtype):
        raise RecipeError(
            f"layer {stem!r} is quantized as {fmt!r} with weight {info.dtype}: sdrecipe "
            f"dequantizes {', '.join(_FP8_FORMATS)} with a per-tensor or per-row scale only",
            reader.path,
        )
    if info.dtype not in FP8_DTYPES:
        raise RecipeError(
            f"tensor {scale!r} scales {weight!r}, which is stored as "
            f"{str(info.dtype).removeprefix('torch.')}, not fp8",
            reader.path,
        )
    scale_info = infos[scale]
    rows = info.shape[0] if info.shape else 1
    if not scale_info.is_floating or scale_info.numel not in (1, rows) or not info.shape:
        raise RecipeError(
            f"tensor {scale!r} has shape {list(scale_info.shape)}: sdrecipe applies one scale "
            f"per tensor or per row of {weight} {list(info.shape)}",
            reader.path,
        )
    code = "F8_E4M3" if info.dtype == torch.float8_e4m3fn else "F8_E5M2"
    return ScaledFp8Weight(weight, scale, f"ComfyUI scaled fp8 ({code})")


def _bnb4(reader: ModelReader, infos: dict[str, TensorInfo], weight: str, key: str) -> Bnb4Weight:
    def damaged(problem: str) -> RecipeError:
        return RecipeError(f"bitsandbytes 4-bit weight {weight!r}: {problem}", reader.path)

    quant_type = key.rpartition("__")[2]
    if quant_type not in ("nf4", "fp4"):
        raise damaged(f"unknown quantization {quant_type!r} in {key!r} (sdrecipe reads nf4, fp4)")
    if infos[key].nbytes > _MAX_STATE_BYTES:
        raise damaged(f"{key!r} is too large to be a quant state")
    try:
        state = load_json(bytes(reader.tensor(key).reshape(-1).to(torch.uint8).numpy()))
        assert isinstance(state, dict)
        blocksize = int(state["blocksize"])
        dtype = str(state["dtype"])
        shape = tuple(int(d) for d in state["shape"])
        nested = "nested_blocksize" in state
        nested_blocksize = int(state["nested_blocksize"]) if nested else None
        nested_offset = float(state["nested_offset"]) if nested else None
    except (AssertionError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise damaged(f"{key!r} is not the JSON state bitsandbytes writes") from None
    if state.get("quant_type", quant_type) != quant_type:
        raise damaged(f"the state says {state.get('quant_type')!r} and its name {quant_type!r}")
    if dtype not in _BNB_DTYPES:
        raise damaged(f"unknown dtype {dtype!r} in its state")
    numel = math.prod(shape)
    needed = {"weight": (torch.uint8, (numel + 1) // 2), "quant_map": (torch.float32, 16)}
    blocks = -(-numel // blocksize) if blocksize > 0 else -1
    if nested_blocksize is not None:
        needed["absmax"] = (torch.uint8, blocks)
        needed["nested_quant_map"] = (torch.float32, 256)
        outer = -(-blocks // nested_blocksize) if nested_blocksize > 0 else -1
        needed["nested_absmax"] = (torch.float32, outer)
    else:
        needed["absmax"] = (torch.float32, blocks)
    for part, (part_dtype, count) in needed.items():
        name = weight if part == "weight" else f"{weight}.{part}"
        info = infos.get(name)
        if info is None:
            raise damaged(f"{name!r} is missing")
        if info.dtype != part_dtype or info.numel != count:
            raise damaged(
                f"{name!r} is {str(info.dtype).removeprefix('torch.')} {list(info.shape)}; "
                f"a {dtype} weight of shape {list(shape)} in blocks of {blocksize} needs "
                f"{count} {str(part_dtype).removeprefix('torch.')} values"
            )
    return Bnb4Weight(
        weight, key, quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset
    )
