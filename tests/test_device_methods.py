"""Whole-tensor methods that run on a torch device (`device=OWN_BYTES`): on the
CPU their device function gives the CPU bytes, they allocate nothing off the
operands' device, and on CUDA (where there is one) they agree with the CPU."""

from __future__ import annotations

import pytest
import torch

from sdrecipe.methods.buffers import POOLED_ELEMENTS, result_tensor
from sdrecipe.methods.registry import (
    OWN_BYTES,
    SAME_BYTES,
    get_method,
    registered_methods,
)

SHAPES = [(48, 80), (16, 8, 3, 3), (64,)]

# (method, models it takes, parameters): each variant takes another path.
CASES = [
    ("slerp", 2, {"t": 0.3}),
    ("slerp", 2, {"t": 0.7, "per_row": True}),
    ("rotate", 2, {"alignment": 0.7, "alpha": 0.3}),
    ("rotate", 2, {"alignment": 1.0, "alpha": 0.5, "centralization": 0.5}),
    ("rotate", 2, {"alignment": 2.0, "alpha": 0.0}),
    ("iso_c", 3, {"alpha": 0.8}),
    ("iso_cts", 4, {"alpha": 1.0, "common_fraction": 0.6}),
    ("tsv", 3, {"alpha": 1.0}),
    ("tsv", 3, {"rank_fraction": 0.3}),
    ("nuslerp", 2, {"t": 0.3}),
    ("nuslerp", 2, {"t": 0.6, "flatten": False}),
    ("nuslerp", 2, {"t": 0.6, "flatten": False, "row_wise": True}),
    ("nuslerp_delta", 3, {"t": 0.4, "flatten": False}),
    ("multislerp", 3, {}),
    ("multislerp_delta", 4, {"normalize_weights": False}),
    ("karcher", 3, {"max_iter": 20}),
]
DEVICE_METHODS = sorted({name for name, _, _ in CASES})


def _operands(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """`count` related tensors: a common part and one of each's own."""
    generator = torch.Generator().manual_seed(hash((count, shape)) % 2**31)
    common = torch.randn(shape, generator=generator, dtype=torch.float64)
    return [
        (common + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        for _ in range(count)
    ]


def _call(function, name: str, operands: list[torch.Tensor], params: dict, dtype: torch.dtype):
    method = get_method(name)
    extra = {"dtype": dtype} if method.takes_dtype else {}
    return function(*operands, **method.validate(params), **extra)


def test_device_methods_are_registered_with_a_device_function():
    marked = [m for m in registered_methods() if m.device in (OWN_BYTES, SAME_BYTES)]
    assert all(m.on_device is not None for m in marked)
    for name in DEVICE_METHODS:
        assert get_method(name).device == OWN_BYTES, name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("name", "count", "params"), CASES, ids=[c[0] for c in CASES])
def test_device_function_gives_the_cpu_bytes(name, count, params, shape):
    method = get_method(name)
    operands = _operands(count, shape, torch.float32)
    expected = _call(method.function, name, operands, params, torch.float32)
    got = _call(method.on_device, name, operands, params, torch.float32)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # Every allocation follows the operands: with the default device made
    # "meta", one that names no device leaves the CPU and the result differs.
    with torch.device("meta"):
        followed = _call(method.on_device, name, operands, params, torch.float32)
    assert followed.device.type == "cpu"
    assert torch.equal(followed.view(torch.int32), expected.view(torch.int32))


def test_result_tensor_pools_only_cpu_buffers():
    assert result_tensor(10, torch.float32).device.type == "cpu"
    assert result_tensor(10, torch.float64, torch.device("cpu")).device.type == "cpu"
    elsewhere = result_tensor(POOLED_ELEMENTS, torch.float32, "meta")
    assert elsewhere.device.type == "meta" and elsewhere.shape == (POOLED_ELEMENTS,)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("name", "count", "params"), CASES, ids=[c[0] for c in CASES])
def test_on_cuda_close_to_the_cpu(name, count, params, shape, dtype):
    method = get_method(name)
    operands = _operands(count, shape, dtype)
    expected = _call(method.function, name, operands, params, dtype)
    on_cuda = [operand.cuda() for operand in operands]
    got = _call(method.on_device, name, on_cuda, params, dtype)
    assert got.device.type == "cuda"
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # rotate computes in float64 whatever its operands; the others in `dtype`.
    tolerance = 1e-5 if dtype == torch.float64 or name == "rotate" else 1e-3
    error = (got.cpu().double() - expected.double()).norm()
    assert error <= tolerance * expected.double().norm(), (error, expected.double().norm())
    for operand, original in zip(on_cuda, operands, strict=True):
        assert torch.equal(operand.cpu(), original)  # operands left as they were
