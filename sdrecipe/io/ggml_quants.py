"""GGML (GGUF) tensor block formats in torch: dequantize, and quantize for the simple types.

The block layouts, rounding and float evaluation order follow the ``gguf`` package's numpy
reference (``gguf/quants.py``, itself a port of llama.cpp's ``ggml-quants.c``), so that
``dequantize`` returns the same float32 bits and ``quantize`` the same bytes. Every float
operation below is one IEEE float32 operation (one rounding), done in the same order as the
numpy code; torch runs each eager op as its own kernel, so nothing is fused into an FMA.

Speed: all work is vectorized over blocks; large tensors go in chunks of about a million
elements whose temporaries are allocated once per call. Bit fields are unpacked and packed eight
bytes at a time in int64 words (little-endian, as in GGUF files): torch's uint8 kernels are slow
on the short rows of a block, while a few int64 ops per block, one contiguous int -> float32
conversion and gguf's float ops on whole chunks are fast. Fresh memory is the other big cost, so
outputs and scratch buffers come from numpy, which asks Linux for transparent huge pages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdrecipe.io.ggml_bits import (
    LOW_BITS,
    NIBBLES,
    Scratch,
    empty,
    fields,
    gather_bits,
    spread_bits,
)

__all__ = [
    "DEQUANTIZABLE",
    "QUANTIZABLE",
    "block_size",
    "dequantize",
    "quantize",
    "stored_nbytes",
]

QK_K = 256

# (elements per block, bytes per block) for every GGML type, as in gguf's GGML_QUANT_SIZES. Types
# we cannot decode are listed too, so that callers can size (and skip or refuse) any tensor.
_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q8_1": (32, 4 + 4 + 32),
    "Q2_K": (QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    "Q3_K": (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (QK_K, 2 + 2 + QK_K // 2 + 12),
    "Q5_K": (QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    "Q6_K": (QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    "Q8_K": (QK_K, 4 + QK_K + QK_K // 8),
    "IQ2_XXS": (QK_K, 2 + QK_K // 4),
    "IQ2_XS": (QK_K, 2 + QK_K // 4 + QK_K // 32),
    "IQ3_XXS": (QK_K, 2 + QK_K // 4 + QK_K // 8),
    "IQ1_S": (QK_K, 2 + QK_K // 8 + QK_K // 16),
    "IQ4_NL": (32, 2 + 16),
    "IQ3_S": (QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    "IQ2_S": (QK_K, 2 + QK_K // 4 + QK_K // 16),
    "IQ4_XS": (QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    "I8": (1, 1),
    "I16": (1, 2),
    "I32": (1, 4),
    "I64": (1, 8),
    "F64": (1, 8),
    "IQ1_M": (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    "BF16": (1, 2),
    "TQ1_0": (QK_K, 2 + 4 * 13),
    "TQ2_0": (QK_K, 2 + 64),
    "MXFP4": (32, 1 + 16),
    "NVFP4": (64, 4 + 32),
    "Q1_0": (128, 2 + 16),
}

# Elements handled per chunk: enough to amortize torch's per-op overhead, few enough that the
# temporaries of one chunk stay small.
_CHUNK_ELEMENTS = 1 << 20


def _sizes(type_name: str) -> tuple[int, int]:
    try:
        return _SIZES[type_name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown GGML tensor type {type_name!r}") from None


def block_size(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) for a GGML type name such as 'Q8_0' (F32 -> (1, 4))."""
    return _sizes(type_name)


def stored_nbytes(type_name: str, numel: int) -> int:
    """Bytes that `numel` elements of `type_name` take; ValueError unless whole blocks."""
    elems, nbytes = _sizes(type_name)
    if numel < 0 or numel % elems:
        raise ValueError(
            f"{type_name} stores elements in blocks of {elems}; {numel} is not a whole number"
            " of blocks"
        )
    return numel // elems * nbytes


def _chunks(n_blocks: int, elems: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // elems)
    return [slice(start, start + step) for start in range(0, n_blocks, step)]


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of each block, as float32 (n_blocks, 1)."""
    return blocks[:, offset : offset + 2].view(torch.float16).to(torch.float32)


def _reinterpret(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`data` (flat uint8) viewed as `dtype`; copied only when its offset is misaligned."""
    try:
        return data.view(dtype)
    except RuntimeError:
        return data.clone().view(dtype)


# --------------------------------------------------------------------------------------------
# dequantization: (n, type_size) uint8 blocks -> (n, block_size) float32 written into `out`.
# Integer work happens in int words and small tensors; the float work is one contiguous
# int8/uint8 -> float32 conversion followed by gguf's own float32 operations, in its order.


def _deq_q8_0(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _f16_field(b, 0)
    q = ws.get("q", (b.shape[0], 32), torch.uint8)
    q.copy_(b[:, 2:])
    out.copy_(q.view(torch.int8))
    out.mul_(d)  # gguf: x * d


def _deq_q4_0(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _f16_field(b, 0)
    q = fields(b[:, 2:], 4, 2, ws, "q").view(torch.int8).sub_(8)  # (n, 2, 16): low, high
    out.copy_(q.view(out.shape))
    out.mul_(d)  # gguf: d * (q - 8)


def _deq_q4_1(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _f16_field(b, 0)
    m = _f16_field(b, 2)
    out.copy_(fields(b[:, 4:], 4, 2, ws, "q").view(out.shape))
    out.mul_(d).add_(m)  # gguf: (d * q) + m


def _q5_values(b: torch.Tensor, qh_at: int, ws: Scratch) -> torch.Tensor:
    """The 5-bit quants of Q5_0/Q5_1 blocks, (n, 32) uint8 in element order."""
    q = fields(b[:, qh_at + 4 :], 4, 2, ws, "q").view(b.shape[0], 32)
    # qh is a little-endian uint32 whose bit i is the fifth bit of element i.
    return q.bitwise_or_(spread_bits(b[:, qh_at : qh_at + 4], 4, ws))


def _deq_q5_0(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _f16_field(b, 0)
    out.copy_(_q5_values(b, 2, ws).view(torch.int8).sub_(16))
    out.mul_(d)  # gguf: d * (q - 16)


def _deq_q5_1(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _f16_field(b, 0)
    m = _f16_field(b, 2)
    out.copy_(_q5_values(b, 4, ws))
    out.mul_(d).add_(m)  # gguf: (d * q) + m


def _deq_q2_k(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    n = b.shape[0]
    scales = b[:, :16]
    d = _f16_field(b, 80)
    dmin = _f16_field(b, 82)
    dl = (d * (scales & 0x0F)).view(n, 16, 1)  # uint8 promotes to float32 exactly
    ml = (dmin * (scales >> 4)).view(n, 16, 1)
    q = fields(b[:, 16:80].view(n, 2, 32), 2, 4, ws, "q")  # (n, 2, 4, 32)
    o = out.view(n, 16, 16)
    o.copy_(q.view(n, 16, 16))
    o.mul_(dl).sub_(ml)  # gguf: dl * q - ml


def _deq_q3_k(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    n = b.shape[0]
    d = _f16_field(b, 108)
    # 16 six-bit scales: the low nibbles in bytes 96..103 (low halves, then high halves), the
    # two high bits in bytes 104..107 (two bits per scale, four scales per byte).
    low = fields(b[:, 96:104], 4, 2, ws, "sl").view(n, 16)
    high = fields(b[:, 104:108], 2, 4, ws, "sh").view(n, 16)
    sc = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = (d * sc).view(n, 16, 1)
    ql = fields(b[:, 32:96].view(n, 2, 32), 2, 4, ws, "ql").view(n, 256)
    hm = fields(b[:, :32], 1, 8, ws, "qh").view(n, 256)
    # gguf: ql - ((hm ^ 1) << 2), the same small integer as (ql | hm << 2) - 4.
    q = ql.bitwise_or_(hm.bitwise_left_shift_(2)).view(torch.int8).sub_(4)
    o = out.view(n, 16, 16)
    o.copy_(q.view(n, 16, 16))
    o.mul_(dl)  # gguf: dl * q


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte, 6-bit scales and mins of Q4_K/Q5_K: two (n, 8) uint8 tensors."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _deq_k_common(b: torch.Tensor, out: torch.Tensor, q: torch.Tensor) -> None:
    n = b.shape[0]
    d = _f16_field(b, 0)
    dmin = _f16_field(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    ds = (d * sc).view(n, 8, 1)
    dm = (dmin * mn).view(n, 8, 1)
    o = out.view(n, 8, 32)
    o.copy_(q)
    o.mul_(ds).sub_(dm)  # gguf: d * q - dm


def _deq_q4_k(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    n = b.shape[0]
    q = fields(b[:, 16:144].view(n, 4, 32), 4, 2, ws, "q").view(n, 8, 32)
    _deq_k_common(b, out, q)


def _deq_q5_k(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    n = b.shape[0]
    ql = fields(b[:, 48:176].view(n, 4, 32), 4, 2, ws, "ql").view(n, 8, 32)
    qh = fields(b[:, 16:48], 1, 8, ws, "qh")  # (n, 8, 32)
    _deq_k_common(b, out, ql.bitwise_or_(qh.bitwise_left_shift_(4)))


def _deq_q6_k(b: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    n = b.shape[0]
    d = _f16_field(b, 208)
    ds = (d * b[:, 192:208].view(torch.int8)).view(n, 16, 1)
    ql = fields(b[:, :128].view(n, 2, 64), 4, 2, ws, "ql").view(n, 8, 32)
    qh = fields(b[:, 128:192].view(n, 2, 32), 2, 4, ws, "qh").view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    o = out.view(n, 16, 16)
    o.copy_(q.view(n, 16, 16))
    o.mul_(ds)  # gguf: d * q


def _nans(x: torch.Tensor) -> torch.Tensor | None:
    """Where float32 `x` is NaN, or None if nowhere: a sum is NaN whenever a term is (and
    costs a tenth of a full mask), so the mask is only built when the sum says it may be needed.
    """
    if not bool(torch.isnan(x.sum())):
        return None
    nan = torch.isnan(x)
    return nan if bool(nan.any()) else None


def _f16_to_f32(h: torch.Tensor) -> torch.Tensor:
    out = empty(tuple(h.shape), torch.float32, h.device)
    out.copy_(h)
    nan = _nans(out)
    if nan is not None:
        # torch quiets signalling NaNs; numpy (gguf) keeps the payload bits exactly as they are.
        bits = h.view(torch.int16)[nan].to(torch.int32)
        out.view(torch.int32)[nan] = ((bits & -0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13)
    return out


_BlockFn = Callable[[torch.Tensor, torch.Tensor, Scratch], None]

_DEQUANT_BLOCKS: dict[str, _BlockFn] = {
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1,
    "Q8_0": _deq_q8_0,
    "Q2_K": _deq_q2_k,
    "Q3_K": _deq_q3_k,
    "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}

DEQUANTIZABLE: frozenset[str] = frozenset({"F32", "F16", "BF16", *_DEQUANT_BLOCKS})


@torch.no_grad()
def dequantize(data: torch.Tensor, type_name: str, numel: int) -> torch.Tensor:
    """`data`: a flat uint8 tensor holding whole blocks (possibly a zero-copy view of a memory map;
    never written to). Returns a flat float32 tensor of `numel` values (never a view of `data`).
    """
    if type_name not in DEQUANTIZABLE:
        _sizes(type_name)  # unknown names get their own message
        raise ValueError(f"cannot dequantize GGML tensor type {type_name}: not supported")
    if data.dtype != torch.uint8:
        raise ValueError(f"GGML {type_name} data must be uint8 bytes, not {data.dtype}")
    data = data.reshape(-1)
    elems, type_size = _sizes(type_name)
    if data.numel() % type_size:
        raise ValueError(
            f"{data.numel()} bytes are not a whole number of {type_name} blocks of {type_size}"
        )
    expected = stored_nbytes(type_name, numel)
    if data.numel() != expected:
        raise ValueError(
            f"{numel} {type_name} elements take {expected} bytes, but the data holds {data.numel()}"
        )
    device = data.device
    if type_name == "F32":
        # A copy, so that in-place edits of the result never reach a (read-only) memory map.
        return empty((numel,), torch.float32, device).copy_(_reinterpret(data, torch.float32))
    if type_name == "F16":
        return _f16_to_f32(_reinterpret(data, torch.float16))
    if type_name == "BF16":  # exact: a 16-bit shift
        return empty((numel,), torch.float32, device).copy_(_reinterpret(data, torch.bfloat16))

    if data.storage_offset() % 2:
        data = data.clone()  # the fp16 fields must be 2-byte aligned to be viewed
    n_blocks = numel // elems
    blocks = data.view(n_blocks, type_size)
    out = empty((n_blocks, elems), torch.float32, device)
    fn = _DEQUANT_BLOCKS[type_name]
    ws = Scratch(device)
    for chunk in _chunks(n_blocks, elems):
        fn(blocks[chunk], out[chunk], ws)
    return out.view(-1)


# --------------------------------------------------------------------------------------------
# quantization: (n, block_size) float32 -> (n, type_size) uint8 blocks written into `out`

# gguf's np_roundf rounds half away from zero; for |x| < 2**22, trunc(x + copysign(0.5, x))
# does too except at |x| = 0.5 - 2**-25, where x + 0.5 rounds up to 1.0. Adding the largest
# float32 below 0.5 instead is exact everywhere we need it (checked for every float32 with
# |x| <= 130; Q8_0 only sees |x| <= 127).
_HALF_DOWN = torch.tensor(0.5 - 2.0**-25, dtype=torch.float32)


def _put_scale(out: torch.Tensor, offset: int, d: torch.Tensor, type_name: str) -> None:
    """Store the per-block scale `d` (n, 1) as fp16 at byte `offset`; refuse non-finite ones."""
    if not bool(torch.isfinite(d).all()):
        raise ValueError(
            f"cannot quantize non-finite values (inf, NaN, or a range beyond float32)"
            f" to {type_name}"
        )
    out[:, offset : offset + 2].view(torch.float16).copy_(d)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """gguf's ``np.where(d == 0, 0, 1 / d)``."""
    return torch.where(d == 0, 0.0, torch.reciprocal(d))


def _signed_absmax(v: torch.Tensor) -> torch.Tensor:
    """Per block, the value of largest magnitude (the first one on ties), as (n, 1)."""
    mx = v.amax(1, keepdim=True)
    mn = v.amin(1, keepdim=True)
    neg = -mn
    pick = torch.where(neg > mx, mn, mx)
    tie = (neg == mx).view(-1)  # +x and -x both present (or all zeros): which comes first?
    if bool(tie.any()):
        rows = tie.nonzero().view(-1)
        sub = v[rows]
        pick[rows] = sub.gather(1, sub.abs().argmax(1, keepdim=True))  # argmax: first maximum
    return pick


def _to_quants(x: torch.Tensor, top: int, ws: Scratch) -> torch.Tensor:
    """min(int(x), top) for x >= 0, as (n, 32) int8 (float -> int conversion truncates)."""
    q = ws.get("q", tuple(x.shape), torch.int8)
    q.copy_(x)
    return q.clamp_(max=top)


def _pack_nibbles(q: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    """(n, 32) values < 16 -> (n, 16) bytes: element j low nibble, element j + 16 high nibble."""
    w = q.view(torch.int64)  # (n, 4): words 0-1 hold elements 0..15, words 2-3 elements 16..31
    packed = ws.get("packed", (w.shape[0], 2), torch.int64)
    torch.bitwise_left_shift(w[:, 2:], 4, out=packed)
    out.copy_(packed.bitwise_or_(w[:, :2]).view(torch.uint8))


def _pack_q5(q: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    """(n, 32) values < 32 -> qh (4 bytes, bit i = bit 4 of element i), then 16 nibble bytes."""
    w = q.view(torch.int64)
    high = ws.get("high", tuple(w.shape), torch.int64)
    torch.bitwise_right_shift(w, 4, out=high)
    out[:, :4].copy_(gather_bits(high.bitwise_and_(LOW_BITS), ws))
    w.bitwise_and_(NIBBLES)
    _pack_nibbles(q, out[:, 4:], ws)


def _q_q8_0(v: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    x = ws.get("x", tuple(v.shape), torch.float32)
    d = torch.abs(v, out=x).amax(1, keepdim=True) / 127
    _put_scale(out, 0, d, "Q8_0")
    torch.mul(v, _inverse(d), out=x)
    x.add_(torch.copysign(_HALF_DOWN, x, out=ws.get("half", tuple(v.shape), torch.float32)))
    q = ws.get("q", tuple(v.shape), torch.int8)
    q.copy_(x)  # float -> int truncates toward zero
    out[:, 2:].copy_(q.view(torch.uint8))


def _q_q4_0(v: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _signed_absmax(v) / -8
    _put_scale(out, 0, d, "Q4_0")
    x = torch.mul(v, _inverse(d), out=ws.get("x", tuple(v.shape), torch.float32)).add_(8.5)
    _pack_nibbles(_to_quants(x, 15, ws), out[:, 2:], ws)


def _q_q5_0(v: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    d = _signed_absmax(v) / -16
    _put_scale(out, 0, d, "Q5_0")
    x = torch.mul(v, _inverse(d), out=ws.get("x", tuple(v.shape), torch.float32)).add_(16.5)
    _pack_q5(_to_quants(x, 31, ws), out[:, 2:], ws)


def _min_max_quants(
    v: torch.Tensor, levels: int, type_name: str, out: torch.Tensor, ws: Scratch
) -> torch.Tensor:
    mx = v.amax(1, keepdim=True)
    mn = v.amin(1, keepdim=True)
    d = (mx - mn) / levels
    _put_scale(out, 0, d, type_name)
    _put_scale(out, 2, mn, type_name)
    x = torch.sub(v, mn, out=ws.get("x", tuple(v.shape), torch.float32))
    x.mul_(_inverse(d)).add_(0.5)  # gguf: (blocks - min) * id + 0.5
    return _to_quants(x, levels, ws)


def _q_q4_1(v: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    _pack_nibbles(_min_max_quants(v, 15, "Q4_1", out, ws), out[:, 4:], ws)


def _q_q5_1(v: torch.Tensor, out: torch.Tensor, ws: Scratch) -> None:
    _pack_q5(_min_max_quants(v, 31, "Q5_1", out, ws), out[:, 4:], ws)


_QUANT_BLOCKS: dict[str, _BlockFn] = {
    "Q4_0": _q_q4_0,
    "Q4_1": _q_q4_1,
    "Q5_0": _q_q5_0,
    "Q5_1": _q_q5_1,
    "Q8_0": _q_q8_0,
}

QUANTIZABLE: frozenset[str] = frozenset({"F32", "F16", "BF16", *_QUANT_BLOCKS})


def _to_f16_bytes(v: torch.Tensor) -> torch.Tensor:
    h = empty(tuple(v.shape), torch.float16, v.device).copy_(v)
    nan = _nans(v)
    if nan is not None:
        # torch quiets every NaN (payload | 0x200); numpy keeps the top payload bits as they are:
        # sign | (0x7c00 + (mantissa >> 13)), bumped to 0x7c01 if that would read as infinity.
        bits = v.view(torch.int32)[nan]
        half = 0x7C00 + ((bits & 0x7FFFFF) >> 13)
        half = torch.where(half == 0x7C00, 0x7C01, half)
        half = torch.where(bits < 0, half - 0x8000, half)  # the sign bit, in int16 terms
        h.view(torch.int16)[nan] = half.to(torch.int16)
    return h.view(torch.uint8)


def _to_bf16_bytes(v: torch.Tensor) -> torch.Tensor:
    """gguf's BF16.quantize_blocks (ggml_compute_fp32_to_bf16): quiet NaNs, round to even."""
    n = v.view(torch.int32)
    nan = _nans(v)
    if nan is not None:
        n = torch.where(nan, (n & -0x10000) | 0x400000, n)
    # n + 0x7fff + lsb never overflows int32 here (the largest non-NaN input is +inf).
    r = torch.bitwise_right_shift(n, 16, out=empty(tuple(n.shape), torch.int32, v.device))
    r.bitwise_and_(1).add_(0x7FFF).add_(n)
    # The high 16 bits of each sum, read as int16 (little-endian: the odd halves).
    out = empty(tuple(n.shape), torch.int16, v.device)
    return out.copy_(r.view(torch.int16).view(-1, 2)[:, 1]).view(torch.uint8)


@torch.no_grad()
def quantize(values: torch.Tensor, type_name: str) -> torch.Tensor:
    """`values`: float32 tensor whose last dim is a multiple of the block size (any number of
    rows). Returns a flat uint8 tensor: the blocks, row after row, byte-identical to
    ``gguf.quants.quantize``. For F32 the result may share memory with `values`.

    Block types (Q4_0 ... Q8_0) refuse non-finite values with ValueError: their bytes would be
    undefined (gguf casts NaN to an integer).
    """
    if type_name not in QUANTIZABLE:
        _sizes(type_name)
        raise ValueError(f"cannot quantize to GGML tensor type {type_name}: not supported")
    if values.dim() == 0:
        values = values.reshape(1)
    elems, type_size = _sizes(type_name)
    if values.shape[-1] % elems:
        raise ValueError(
            f"{type_name} quantizes rows in blocks of {elems}; the last dimension"
            f" {values.shape[-1]} is not a multiple of it"
        )
    v = values.to(torch.float32).contiguous().view(-1)
    if type_name == "F32":
        return v.view(torch.uint8)
    if type_name == "F16":
        return _to_f16_bytes(v)
    if type_name == "BF16":
        return _to_bf16_bytes(v)

    n_blocks = v.numel() // elems
    blocks = v.view(n_blocks, elems)
    out = empty((n_blocks, type_size), torch.uint8, v.device)
    fn = _QUANT_BLOCKS[type_name]
    ws = Scratch(v.device)
    for chunk in _chunks(n_blocks, elems):
        fn(blocks[chunk], out[chunk], ws)
    return out.view(-1)
