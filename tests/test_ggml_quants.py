"""sdrecipe.io.ggml_quants against the gguf package's numpy reference (the oracle only)."""

from __future__ import annotations

import mmap
import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

from sdrecipe.io import ggml_quants as gq  # noqa: E402

# gguf's numpy code warns when a scale overflows fp16; those cases are deliberate here.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
PLAIN_TYPES = ["F32", "F16", "BF16"]

# Byte offsets of the fp16 `d` / `dmin` fields in each block.
FP16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}

HALF_BELOW = np.float32(0.5) - np.float32(2.0**-25)  # largest float32 below 0.5


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def oracle_quantize(values: np.ndarray, name: str) -> np.ndarray:
    return np.ascontiguousarray(np_quantize(values, qtype(name))).view(np.uint8).reshape(-1)


def oracle_dequantize(data: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(np_dequantize(data, qtype(name)), dtype=np.float32).reshape(-1)


def assert_same_bits(got: torch.Tensor, expected: np.ndarray) -> None:
    """Bit-for-bit float32 equality (NaNs included), as torch.equal on the int32 views."""
    assert got.dtype == torch.float32
    assert got.shape == (expected.size,)
    want = torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32).view(np.int32))
    diff = (got.view(torch.int32) != want).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} values differ, first at {diff[:5].flatten()}"


def assert_same_bytes(got: torch.Tensor, expected: np.ndarray) -> None:
    assert got.dtype == torch.uint8
    assert got.dim() == 1
    assert got.numel() == expected.size
    diff = (got != torch.from_numpy(expected.copy())).nonzero().flatten()
    assert diff.numel() == 0, f"{diff.numel()} bytes differ, first at {diff[:8].tolist()}"


def sample_rows(seed: int, width: int = 512) -> np.ndarray:
    """Rows of varied magnitude: normal, zeros, tiny, large, sparse, one-signed, ties."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((9, width)).astype(np.float32)
    rows = [
        normal[0],
        np.zeros(width, np.float32),
        normal[1] * np.float32(1e-6),  # scales that underflow to fp16 subnormals
        normal[2] * np.float32(3e-9),  # ... and to zero
        normal[3] * np.float32(1e4),
        np.where(rng.random(width) < 0.7, 0, normal[4]).astype(np.float32),  # many exact zeros
        np.abs(normal[5]),  # one-signed: min (Q4_1/Q5_1) is positive
        -np.abs(normal[6]) * np.float32(300),
        (rng.integers(-40, 40, width) / np.float32(2)).astype(np.float32),  # halves: ties
        rng.uniform(-1, 1, width).astype(np.float32) * np.float32(65000),
    ]
    return np.stack(rows)


def tie_rows() -> np.ndarray:
    """Blocks of 32 whose scaled values land exactly on rounding ties for every block type."""
    rng = np.random.default_rng(7)
    blocks = []
    halves = (np.arange(-127, 127) + np.float32(0.5)).astype(np.float32)
    # Q8_0: amax 127 -> d = 1, id = 1, so x is the value itself (round half away from zero).
    for _ in range(16):
        b = rng.choice(halves, 32).astype(np.float32)
        b[rng.integers(32)] = rng.choice([127.0, -127.0])
        blocks.append(b)
    special = np.array([127, HALF_BELOW, -HALF_BELOW, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5], np.float32)
    blocks.append(np.resize(special, 32))
    # Q4_0 / Q5_0: a largest magnitude of -8 / -16 gives d = 1; Q4_1 / Q5_1: range 15 / 31.
    for top, low in ((-8, 8), (-16, 16), (15, 0), (31, 0)):
        for _ in range(8):
            b = (rng.integers(-2 * low, 2 * max(low, 15), 32) / np.float32(2)).astype(np.float32)
            b = np.clip(b, min(top, low, 0), max(abs(top), low)).astype(np.float32)
            b[0] = top
            if low == 0:
                b = np.abs(b)
                b[1] = 0
            blocks.append(b)
    while len(blocks) % 16:  # whole rows of 512
        blocks.append(rng.choice(halves, 32).astype(np.float32) / np.float32(8))
    return np.concatenate(blocks).reshape(-1, 512)


def random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random block bytes with finite, moderate fp16 d/dmin fields."""
    _, type_size = GGML_QUANT_SIZES[qtype(name)]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[name]:
        d = (rng.standard_normal(n_blocks) * rng.choice([1e-6, 1e-2, 1, 100], n_blocks)).astype(
            np.float16
        )
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


# ------------------------------------------------------------------------------------------
# sizes


def test_block_sizes_match_gguf_for_every_type() -> None:
    for qt, sizes in GGML_QUANT_SIZES.items():
        assert gq.block_size(qt.name) == sizes, qt.name
    assert gq.block_size("F32") == (1, 4)
    assert frozenset(PLAIN_TYPES + BLOCK_TYPES + K_TYPES) == gq.DEQUANTIZABLE
    assert frozenset(PLAIN_TYPES + BLOCK_TYPES) == gq.QUANTIZABLE


def test_stored_nbytes() -> None:
    assert gq.stored_nbytes("Q8_0", 64) == 68
    assert gq.stored_nbytes("Q6_K", 512) == 420
    assert gq.stored_nbytes("BF16", 3) == 6
    assert gq.stored_nbytes("Q4_K", 0) == 0
    with pytest.raises(ValueError, match="Q8_0"):
        gq.stored_nbytes("Q8_0", 33)
    with pytest.raises(ValueError, match="NOPE"):
        gq.stored_nbytes("NOPE", 32)


# ------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("name", BLOCK_TYPES + PLAIN_TYPES)
def test_dequantize_oracle_blocks(name: str) -> None:
    values = np.concatenate([sample_rows(1), tie_rows()])
    data = oracle_quantize(values, name)
    got = gq.dequantize(torch.from_numpy(data.copy()), name, values.size)
    assert_same_bits(got, oracle_dequantize(data, name))


@pytest.mark.parametrize("name", BLOCK_TYPES + K_TYPES)
def test_dequantize_random_blocks(name: str) -> None:
    data = random_blocks(name, 300, seed=len(name) + ord(name[1]))
    elems, _ = gq.block_size(name)
    got = gq.dequantize(torch.from_numpy(data.copy()), name, 300 * elems)
    assert_same_bits(got, oracle_dequantize(data.reshape(300, -1), name))
    assert torch.isfinite(got).all()  # the fields were finite, so a NaN would be a decoding bug


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_dequantize_every_16_bit_pattern(name: str) -> None:
    data = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8)
    got = gq.dequantize(torch.from_numpy(data.copy()), name, 1 << 16)
    assert_same_bits(got, oracle_dequantize(data, name))


def test_dequantize_f32_is_a_copy() -> None:
    values = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    data = torch.from_numpy(values.view(np.uint8).copy())
    got = gq.dequantize(data, "F32", 64)
    assert_same_bits(got, values)
    got.fill_(0)
    assert_same_bits(data.view(torch.float32), values)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_dequantize_misaligned_read_only_map(name: str, tmp_path, monkeypatch) -> None:
    elems, type_size = gq.block_size(name)
    numel = 512 if elems > 1 else 37
    if name in FP16_FIELDS:
        payload = random_blocks(name, numel // elems, seed=11)
    else:
        values = np.random.default_rng(5).standard_normal(numel).astype(np.float32)
        payload = oracle_quantize(values, name)
    path = tmp_path / "tensor.bin"
    path.write_bytes(b"\x01" + payload.tobytes() + b"\x02\x03\x04")
    monkeypatch.setattr(gq, "_CHUNK_ELEMENTS", 256)  # several chunks
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
            whole = torch.frombuffer(mapped, dtype=torch.uint8)
        view = whole[1 : 1 + payload.size]  # odd storage offset: no aligned dtype view possible
        got = gq.dequantize(view, name, numel)  # a write to the read-only map would crash
        del whole, view
    assert_same_bits(got, oracle_dequantize(payload.reshape(-1, type_size), name))
    got.add_(1)  # the result is ours to change


def test_dequantize_many_chunks(monkeypatch) -> None:
    monkeypatch.setattr(gq, "_CHUNK_ELEMENTS", 700)  # a partial last chunk as well
    for name in ["Q5_1", "Q3_K"]:
        elems, _ = gq.block_size(name)
        data = random_blocks(name, 37, seed=2)
        got = gq.dequantize(torch.from_numpy(data), name, 37 * elems)
        assert_same_bits(got, oracle_dequantize(data.reshape(37, -1), name))


# ------------------------------------------------------------------------------------------
# quantize


@pytest.mark.parametrize("name", BLOCK_TYPES + PLAIN_TYPES)
def test_quantize_matches_gguf_bytes(name: str) -> None:
    values = np.concatenate([sample_rows(2), tie_rows()])
    got = gq.quantize(torch.from_numpy(values), name)
    assert_same_bytes(got, oracle_quantize(values, name))


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_quantize_ties_and_huge_values(name: str) -> None:
    rows = tie_rows()
    big = sample_rows(4)[[0, 4, 9]] * np.float32(1e4)  # fp16 scale overflows to inf
    # Finite, but max - min overflows float32 for Q4_1/Q5_1: refused rather than garbage.
    huge = np.float32([[3e38, -3e38, 1e38] * 170 + [7.0, 0.0]])
    values = np.concatenate([rows, big])
    got = gq.quantize(torch.from_numpy(values), name)
    assert_same_bytes(got, oracle_quantize(values, name))
    if name in ("Q4_1", "Q5_1"):
        with pytest.raises(ValueError, match=name):
            gq.quantize(torch.from_numpy(huge), name)
    else:
        assert_same_bytes(gq.quantize(torch.from_numpy(huge), name), oracle_quantize(huge, name))


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0"])
def test_quantize_signed_zeros(name: str) -> None:
    rng = np.random.default_rng(9)
    values = rng.choice(np.float32([0.0, -0.0]), (16, 256)).astype(np.float32)
    values[8:, ::5] = rng.choice(np.float32([1.5, -1.5]), (8, 52))  # ties in magnitude
    got = gq.quantize(torch.from_numpy(values), name)
    assert_same_bytes(got, oracle_quantize(values, name))


@pytest.mark.parametrize("name", ["Q4_1", "Q5_1"])
def test_quantize_signed_zero_extremes(name: str) -> None:
    # When the block minimum (or maximum) is a zero present with both signs, which zero a
    # reduction returns is an implementation detail (numpy's SIMD tree vs torch's); only the
    # sign bits of the fp16 d/m fields may differ, and the decoded values are equal.
    rng = np.random.default_rng(10)
    values = rng.choice(np.float32([0.0, -0.0]), (8, 256)).astype(np.float32)
    values[4:] += np.abs(rng.standard_normal((4, 256))).astype(np.float32) * (
        rng.random((4, 256)) < 0.5
    )
    got = gq.quantize(torch.from_numpy(values), name).numpy().reshape(-1, gq.block_size(name)[1])
    want = oracle_quantize(values, name).reshape(got.shape)
    sign_bits = np.zeros(got.shape[1], np.uint8)
    sign_bits[[1, 3]] = 0x80
    assert np.array_equal(got & ~sign_bits, want & ~sign_bits)
    decoded = gq.dequantize(torch.from_numpy(got.reshape(-1).copy()), name, values.size)
    assert np.array_equal(decoded.numpy(), oracle_dequantize(want, name))


def test_quantize_special_floats_to_plain_types() -> None:
    bits = np.array(
        [
            0x7F800000,  # inf
            0xFF800000,  # -inf
            0x7FC00000,  # quiet NaN
            0xFFC00001,  # negative quiet NaN with payload
            0x7F800001,  # signalling NaNs: fp16 keeps them, bf16 quiets them
            0x7FA00000,
            0xFF802000,
            0x7FFFFFFF,
            0x00000001,  # smallest subnormal
            0x80000001,
            0x7F7FFFFF,  # largest finite: bf16 rounds to inf
            0x3F808000,  # bf16 tie, even -> down
            0x3F818000,  # bf16 tie, odd -> up
            0x477FF000,  # fp16 tie at 65520 -> inf
            0x33000000,  # 2**-25: fp16 tie -> 0
            0x80000000,  # -0
        ],
        dtype=np.uint32,
    )
    rng = np.random.default_rng(12)
    rand_bits = rng.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([bits, rand_bits]).view(np.float32).reshape(2, -1)
    for name in PLAIN_TYPES:
        got = gq.quantize(torch.from_numpy(values.copy()), name)
        assert_same_bytes(got, oracle_quantize(values, name))


def test_quantize_shapes_and_chunks(monkeypatch) -> None:
    monkeypatch.setattr(gq, "_CHUNK_ELEMENTS", 200)  # several chunks, a partial last one
    values = np.random.default_rng(13).standard_normal((3, 5, 96)).astype(np.float32)
    for name in BLOCK_TYPES:
        got = gq.quantize(torch.from_numpy(values), name)
        assert_same_bytes(got, oracle_quantize(values, name))
        back = gq.dequantize(got, name, values.size)
        assert_same_bits(back, oracle_dequantize(oracle_quantize(values, name), name))


def test_quantize_leaves_input_alone() -> None:
    values = torch.from_numpy(sample_rows(14, width=64))
    before = values.clone()
    for name in sorted(gq.QUANTIZABLE):
        gq.quantize(values, name)
    assert torch.equal(values, before)


def test_empty_tensors() -> None:
    for name in sorted(gq.DEQUANTIZABLE):
        got = gq.dequantize(torch.zeros(0, dtype=torch.uint8), name, 0)
        assert got.dtype == torch.float32
        assert got.shape == (0,)
    for name in sorted(gq.QUANTIZABLE):
        got = gq.quantize(torch.zeros(0, 256), name)
        assert got.dtype == torch.uint8
        assert got.shape == (0,)


def test_quantize_ignores_autograd() -> None:
    values = torch.from_numpy(sample_rows(15, width=64)).requires_grad_()
    for name in BLOCK_TYPES:
        got = gq.quantize(values, name)
        assert not got.requires_grad
        assert_same_bytes(got, oracle_quantize(values.detach().numpy(), name))


# ------------------------------------------------------------------------------------------
# errors


def test_unknown_and_unsupported_types() -> None:
    data = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="Q9_9"):
        gq.dequantize(data, "Q9_9", 32)
    with pytest.raises(ValueError, match="Q9_9"):
        gq.quantize(torch.zeros(32), "Q9_9")
    with pytest.raises(ValueError, match="Q9_9"):
        gq.block_size("Q9_9")
    with pytest.raises(ValueError, match="IQ2_XXS"):
        gq.dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", 256)
    with pytest.raises(ValueError, match="Q4_K"):
        gq.quantize(torch.zeros(256), "Q4_K")
    with pytest.raises(ValueError, match="q8_0"):
        gq.dequantize(data, "q8_0", 32)


def test_data_not_whole_blocks() -> None:
    with pytest.raises(ValueError, match="whole number"):
        gq.dequantize(torch.zeros(35, dtype=torch.uint8), "Q8_0", 32)
    with pytest.raises(ValueError, match="whole number"):
        gq.dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", 33)
    with pytest.raises(ValueError, match="68 bytes"):
        gq.dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", 64)
    with pytest.raises(ValueError, match="whole number"):
        gq.dequantize(torch.zeros(7, dtype=torch.uint8), "F16", 3)
    with pytest.raises(ValueError, match="uint8"):
        gq.dequantize(torch.zeros(17, dtype=torch.int16), "Q8_0", 32)
    with pytest.raises(ValueError, match="multiple"):
        gq.quantize(torch.zeros(4, 48), "Q8_0")


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_quantize_refuses_non_finite(name: str) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        values = torch.zeros(2, 64)
        values[1, 40] = bad
        with pytest.raises(ValueError, match="non-finite"):
            gq.quantize(values, name)
