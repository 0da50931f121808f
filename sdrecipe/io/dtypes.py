"""The safetensors dtype codes and their torch equivalents."""

from __future__ import annotations

import numpy as np
import torch

CODE_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_TO_CODE = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}
# Stored types that hold plain numbers (safetensors codes; GGML's plain types share
# the names): anything else a reader reports (`stored_as`) is quantized.
UNQUANTIZED = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})

NAME_TO_DTYPE = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

# Every fp8 value by its byte: torch converts fp8 element by element (~0.15 G values/s
# a core), a table lookup is three times as fast, and exact.
_FP8_VALUES = {
    dtype: torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32).numpy()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
}


# The tables copied to each device they were asked on.
_FP8_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _table_on(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    table = _FP8_TABLES.get((dtype, device))
    if table is None:
        table = _FP8_TABLES[(dtype, device)] = torch.from_numpy(_FP8_VALUES[dtype]).to(device)
    return table


def widened(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` (a new tensor when it converts), fp8 by table lookup."""
    table = _FP8_VALUES.get(tensor.dtype)
    if table is None or not dtype.is_floating_point or dtype.itemsize == 1:
        return tensor.to(dtype)
    codes = tensor.contiguous().view(torch.uint8)
    if codes.device.type != "cpu":  # the same table, so the same bytes (NaN's too)
        values = _table_on(tensor.dtype, codes.device)[codes.long()]
    else:
        values = torch.from_numpy(np.take(table, codes.numpy()))
    return values if dtype == torch.float32 else values.to(dtype)
