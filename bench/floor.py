"""The floor: a minimal hand-written streaming merge, for comparison.

No recipe, cache, hashing, checks or metadata: memory-mapped inputs, float32
arithmetic per tensor, two threads, and positional writes into one output.
Usage: python bench/floor.py [--dtype BF16] add_difference A B C OUT
       python bench/floor.py [--dtype BF16] weighted_sum A B OUT ALPHA
The output keeps the first input's dtypes, or writes its floating tensors as
--dtype (a safetensors code: F16, BF16, F32); float8 inputs are upcast first.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

DTYPES = {
    "F16": torch.float16,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
}
FLOAT8 = (torch.float8_e4m3fn,)  # torch does no arithmetic promotion with these


def open_model(path: str) -> tuple[dict, mmap.mmap, int]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    return header, mapped, 8 + size


def view(model: tuple[dict, mmap.mmap, int], key: str) -> torch.Tensor:
    header, mapped, start = model
    entry = header[key]
    dtype = DTYPES[entry["dtype"]]
    count = (entry["data_offsets"][1] - entry["data_offsets"][0]) // dtype.itemsize
    flat = torch.frombuffer(
        mapped, dtype=dtype, count=count, offset=start + entry["data_offsets"][0]
    )
    return flat.view(entry["shape"])


def operand(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in FLOAT8 else tensor


def output_header(header: dict, code: str | None) -> dict:
    """`header` with its floating tensors as `code`, the data offsets redone."""
    if code is None:
        return header
    out, offset = {}, 0
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype = entry["dtype"] if not DTYPES[entry["dtype"]].is_floating_point else code
        size = DTYPES[dtype].itemsize * (
            (entry["data_offsets"][1] - entry["data_offsets"][0]) // DTYPES[entry["dtype"]].itemsize
        )
        out[key] = {
            "dtype": dtype,
            "shape": entry["shape"],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return out


def main(*args: str) -> None:
    torch.set_num_threads(1)
    code = None
    if args[0] == "--dtype":
        code, args = args[1], args[2:]
    method, *args = args
    if method == "add_difference":
        paths, out, alpha = args[:3], args[3], 1.0
    else:
        paths, out, alpha = args[:2], args[2], float(args[3])
    models = [open_model(path) for path in paths]
    header = output_header(models[0][0], code)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, struct.pack("<Q", len(text)) + text)
    base = 8 + len(text)

    def work(key: str) -> None:
        left = view(models[0], key)
        if left.dtype.is_floating_point and "position_ids" not in key:
            if len(models) == 3:
                result = view(models[1], key).float().sub_(operand(view(models[2], key)))
                left = result.add_(operand(left))
            else:
                left = left.float().mul_(1 - alpha).add_(view(models[1], key).float().mul_(alpha))
        left = left.to(DTYPES[header[key]["dtype"]])
        data = left.contiguous().reshape(-1).view(torch.uint8).numpy()
        os.pwrite(fd, data, base + header[key]["data_offsets"][0])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, header))
    os.close(fd)


if __name__ == "__main__":
    main(*sys.argv[1:])
