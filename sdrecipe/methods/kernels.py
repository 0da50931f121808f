"""Compiled loops for the task-vector methods' per-element work.

TIES' trim, sign election and disjoint mean (SCE's weighted one too), DARE's
drop mask, DELLA's row order and MagPrune and a top-k threshold's counting
pass each took several numpy passes over every piece (conversions,
temporaries, boolean masks) or a sort; here each is one loop over the piece
(breadcrumbs' are in `outlier_kernels`), compiled by numba on first use (and
cached on disk), releasing the GIL so the executor's workers run side by
side. The loops read float16 and bfloat16 operands as stored (as uint16 and
int16 views of their bits, converted exactly, as torch does) and do the
arithmetic of the numpy and torch expressions they replace, operation for
operation, in the compute dtype (float32 or float64): no fast-math, no
reassociation, a product by a 0/1 mask stays a product (NaN stays NaN, -0
stays -0), so the bytes are the same.

Importing this module imports numba (a few tenths of a second): the methods
import it when they first compute.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
# Elements `ties_merge` takes at a time, so that its temporaries stay in the L1
# and L2 caches (a 256 Ki-element piece's spilled: 1.3x the time).
_BLOCK = 4096


@intrinsic
def _half_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """float16 bits (uint16) to float32: LLVM's exact extension (F16C on x86)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bfloat_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """bfloat16 bits (int16) to float32: the bits are float32's upper half."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _mul_high(typingctx, left, right):  # type: ignore[no-untyped-def]
    """The high 64 bits of a 64 x 64-bit product (LLVM's 128-bit multiply)."""
    if left != types.uint64 or right != types.uint64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        wide = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))

    return types.uint64(types.uint64, types.uint64), codegen


def _load(array: np.ndarray, index: int) -> float:
    """Element `index` of an operand as a float (compiled loops only)."""
    raise NotImplementedError


@overload(_load, inline="always")
def _load_typed(array, index):  # type: ignore[no-untyped-def]
    if array.dtype == types.uint16:  # float16's bits
        return lambda array, index: _half_to_float(array[index])
    if array.dtype == types.int16:  # bfloat16's bits
        return lambda array, index: _bfloat_to_float(array[index])
    return lambda array, index: array[index]


def warm_up() -> None:
    """Load numba's machinery (the first compiled call, about 0.6 s) by one
    call on a few values; each loop's code then loads from the cache in
    milliseconds."""
    values = np.zeros(8, np.float32)
    count_and_gather(values, np.float32(0), np.float32(1), values)


@_jit
def count_and_gather(
    values: np.ndarray, low: np.floating, high: np.floating, out: np.ndarray
) -> tuple[int, int]:
    """How many of `values` exceed `high`; those in [`low`, `high`] are copied
    to the start of `out` (which may be `values` itself), and their number is
    returned second. Two loops that vectorise (the count; a byte a value
    saying whether it is inside), then a loop over groups of eight values
    that skips the groups with none inside (about nine in ten for a top-k
    bracket) and copies each value of the others, moving on only past those
    inside: 0.6 ns a value where one branch-free loop took 0.8-0.9, and a
    branch per value 2.8 (mispredicted)."""
    size = values.size
    above = 0
    for j in range(size):
        above += values[j] > high
    inside = np.empty(size - size % 8 + 8, np.uint8)
    for j in range(size):
        inside[j] = (values[j] >= low) & (values[j] <= high)
    groups = inside[: size - size % 8].view(np.uint64)
    found = 0
    for group in range(groups.size):
        if groups[group]:
            for j in range(group * 8, group * 8 + 8):
                out[found] = values[j]
                found += inside[j]
    for j in range(size - size % 8, size):
        out[found] = values[j]
        found += inside[j]
    return above, found


@_jit
def count_and_gather_deltas(
    model: np.ndarray, base: np.ndarray, low: np.floating, high: np.floating, out: np.ndarray
) -> tuple[int, int]:
    """`count_and_gather` of |model - base| in `out`'s dtype, computed into
    `out` first (a loop that vectorises; measured faster than in blocks)."""
    cast = out.dtype.type
    for j in range(base.size):
        out[j] = abs(cast(_load(model, j)) - cast(_load(base, j)))
    return count_and_gather(out[: base.size], low, high, out)


@_jit
def squared_deltas(model: np.ndarray, base: np.ndarray, cast: type, out: np.ndarray) -> None:
    """`out[j] = float64(d)²` of each task-vector entry d = model - base
    computed in `cast` (the compute dtype's scalar type): numpy's
    `square(d, dtype=float64)`."""
    for j in range(base.size):
        value = np.float64(cast(_load(model, j)) - cast(_load(base, j)))
        out[j] = value * value


@_jit
def drop(delta: np.ndarray, words: np.ndarray, cutoff: np.uint32, scale: np.floating) -> None:
    """DARE, in place: `delta *= (words >= cutoff)`, then `delta *= scale`."""
    one = delta.dtype.type(1)
    zero = delta.dtype.type(0)
    for j in range(delta.size):
        delta[j] = delta[j] * (one if words[j] >= cutoff else zero) * scale


@_jit
def _task_vector(
    model: np.ndarray,
    origin: np.ndarray,
    words: np.ndarray,
    cutoff: np.uint32,
    scale: np.floating,
    threshold: np.floating,
    out: np.ndarray,
) -> None:
    """One task vector on a piece, into `out`: `model - origin` (`model` for an
    empty `origin`), dropped (`d * (words >= cutoff) * scale`) for non-empty
    `words`, trimmed (`d * (|d| >= threshold)`). One single-pass loop per case,
    so that each vectorises."""
    cast = out.dtype.type
    one = cast(1)
    zero = cast(0)
    if origin.size and words.size:
        for j in range(out.size):
            value = cast(_load(model, j)) - cast(_load(origin, j))
            value = value * (one if words[j] >= cutoff else zero) * scale
            out[j] = value * (one if abs(value) >= threshold else zero)
    elif origin.size:
        for j in range(out.size):
            value = cast(_load(model, j)) - cast(_load(origin, j))
            out[j] = value * (one if abs(value) >= threshold else zero)
    elif words.size:
        for j in range(out.size):
            value = cast(_load(model, j)) * (one if words[j] >= cutoff else zero) * scale
            out[j] = value * (one if abs(value) >= threshold else zero)
    else:
        for j in range(out.size):
            value = cast(_load(model, j))
            out[j] = value * (one if abs(value) >= threshold else zero)


@_jit
def ties_merge(
    models: tuple[np.ndarray, ...],
    origin: np.ndarray,
    words: tuple[np.ndarray, ...],
    cutoff: np.uint32,
    scale: np.floating,
    thresholds: np.ndarray,
    count_rule: bool,
    weights: np.ndarray,
    floor: np.floating,
    alpha: np.floating,
    base: np.ndarray,
    out: np.ndarray,
) -> None:
    """TIES on a piece, into `out` (its dtype the compute dtype). Each task
    vector is `models[i] - origin` (`models[i]` itself for an empty `origin`),
    dropped as DARE (`d * (words[i] >= cutoff) * scale`) where `words[i]` is
    not empty, and trimmed below its threshold (`d * (|d| >= t)`); each
    element's sign is elected by the sum of the task vectors (a tie elects +)
    or, with `count_rule`, by the sum of their signs (a tie elects none); the
    agreeing values are averaged with `weights` (`total / max(weight, floor)`:
    TIES' disjoint mean with weights 1 and floor 1, SCE's with its weights and
    1e-6; 0 where none agrees), times `alpha`, plus `base`. A block at a time,
    so that the task vectors, held for the election and the mean, stay in the
    L1 and L2 caches."""
    cast = out.dtype.type
    one = cast(1)
    zero = cast(0)
    count = len(models)
    # Task vector i in scratch[i]; the weighted total of the agreeing ones and
    # their weight in the last two rows.
    scratch = np.empty((count + 2, min(out.size, _BLOCK)), out.dtype)
    for start in range(0, out.size, _BLOCK):
        stop = min(out.size, start + _BLOCK)
        size = stop - start
        votes = out[start:stop]
        held = origin[start:stop] if origin.size else origin
        for i in range(count):
            cut = words[i][start:stop] if words[i].size else words[i]
            value = scratch[i, :size]
            _task_vector(models[i][start:stop], held, cut, cutoff, scale, thresholds[i], value)
            if i == 0 and count_rule:
                for j in range(size):
                    votes[j] = np.sign(value[j])
            elif i == 0:
                for j in range(size):
                    votes[j] = value[j]
            elif count_rule:
                for j in range(size):
                    votes[j] = votes[j] + np.sign(value[j])
            else:
                for j in range(size):
                    votes[j] = votes[j] + value[j]
        if count_rule:
            for j in range(size):
                votes[j] = np.sign(votes[j])
        else:
            for j in range(size):
                votes[j] = one if votes[j] >= zero else -one
        elected = votes
        total, weight = scratch[count, :size], scratch[count + 1, :size]
        for j in range(size):
            total[j] = zero
            weight[j] = zero
        for i in range(count):
            value = scratch[i, :size]
            factor = weights[i]
            for j in range(size):
                agrees = (one if value[j] * elected[j] > zero else zero) * factor
                total[j] += value[j] * agrees
                weight[j] += agrees
        for j in range(size):
            votes[j] = total[j] / max(weight[j], floor) * alpha + cast(_load(base, start + j))


@_jit
def magprune(
    values: np.ndarray,
    ranks: np.ndarray,
    words: np.ndarray,
    drop: float,
    epsilon: float,
    rescale: bool,
) -> None:
    """DELLA's MagPrune on rows of task-vector entries, in place. `ranks[r, j]`
    is entry j's rank in row r from the smallest magnitude up (ties by
    position); the entry of rank k of a row of width w is dropped with
    probability q = clip(drop + epsilon - 2·epsilon·k/(w - 1), 0, 1) (`drop` if
    w = 1): kept when its word is at least min(rint(q·2³²), 2³² - 1) and q < 1,
    then times 1/(1 - q) if `rescale` (float64, rounded to the values' dtype).
    The cutoff and factor of each rank are the same in every row: computed
    once, then looked up as the row is read in order."""
    cast = values.dtype.type
    rows, width = values.shape
    cutoffs = np.empty(width, np.uint64)
    factors = np.empty(width, values.dtype)
    for rank in range(width):
        if width == 1:
            chance = drop
        else:
            chance = (drop + epsilon) - (2.0 * epsilon) * (rank / (width - 1))
            chance = min(max(chance, 0.0), 1.0)
        # Never kept where q = 1: no word is above the largest.
        limit = min(np.rint(chance * 2.0**32), 2.0**32 - 1) if chance < 1.0 else 2.0**32
        cutoffs[rank] = np.uint64(limit)
        factors[rank] = cast(1.0 / (1.0 - chance)) if rescale and chance < 1.0 else cast(1.0)
    for row in range(rows):
        for j in range(width):
            # Branch-free (a branch on a random word mispredicts): the factor
            # times 1 or 0 is the factor or +0, the factors finite and positive.
            rank = np.uint64(ranks[row, j])
            kept = cast(np.uint64(words[row, j]) >= cutoffs[rank])
            values[row, j] = values[row, j] * (factors[rank] * kept)


@_jit
def _torch_difference(left: np.floating, right: np.floating) -> np.floating:
    """`left - right` as torch's `sub` gives it, NaNs included: a NaN `right`
    is the result (where both are NaN, torch gives `right`'s, a compiled
    subtraction `left`'s)."""
    return right if right != right else left - right


@_jit
def _torch_sum(left: np.floating, right: np.floating) -> np.floating:
    """`left + right` as torch's `add` gives it, NaNs included: a NaN `right`
    is the result (where both are NaN, torch gives `right`'s; a compiled
    addition, either, as the compiler orders the operands)."""
    return right if right != right else left + right


@_jit
def ascending_ranks(values: np.ndarray, ranks: np.ndarray) -> None:
    """Into `ranks[r, j]`, the rank of float32 `values[r, j]`'s magnitude in
    row r from the smallest up, equal ones by position (NaNs as one value above
    infinity, as a stable argsort holds them): a stable radix sort of (bits,
    position) keys, four passes of eight bits (a pass whose digit all the row
    shares is skipped), the histograms of all four taken in one read; the last
    pass writes each position's rank instead of moving its key, so that
    MagPrune reads the row in order."""
    rows, width = values.shape
    bits = values.view(np.uint32)
    keys = np.empty(width, np.uint64)
    spare = np.empty(width, np.uint64)
    counts = np.empty((4, 256), np.int64)
    digits = np.empty(4, np.int64)
    for row in range(rows):
        counts[:] = 0
        for j in range(width):
            key = min(bits[row, j] & np.uint32(0x7FFFFFFF), np.uint32(0x7F800001))
            keys[j] = (np.uint64(key) << np.uint64(32)) | np.uint64(j)
            for digit in range(4):
                counts[digit, (key >> np.uint32(8 * digit)) & np.uint32(255)] += 1
        passes = 0
        for digit in range(4):
            shift = np.uint64(32 + 8 * digit)
            if counts[digit, (keys[0] >> shift) & np.uint64(255)] != width:
                digits[passes] = digit
                passes += 1
        if passes == 0:  # one magnitude throughout: ranked by position
            for j in range(width):
                ranks[row, j] = j
            continue
        for step in range(passes):
            digit = digits[step]
            shift = np.uint64(32 + 8 * digit)
            total = 0
            for value in range(256):
                count = counts[digit, value]
                counts[digit, value] = total
                total += count
            if step < passes - 1:
                for j in range(width):
                    key = keys[j]
                    value = (key >> shift) & np.uint64(255)
                    spare[counts[digit, value]] = key
                    counts[digit, value] += 1
                keys, spare = spare, keys
            else:
                for j in range(width):
                    key = keys[j]
                    value = (key >> shift) & np.uint64(255)
                    ranks[row, key & np.uint64(0xFFFFFFFF)] = counts[digit, value]
                    counts[digit, value] += 1


@_jit
def _pcg64_step(high: np.uint64, low: np.uint64, jump: np.ndarray) -> tuple[np.uint64, np.uint64]:
    """(high, low) * (jump[0], jump[1]) + (jump[2], jump[3]), mod 2**128."""
    product = low * jump[1]
    new_low = product + jump[3]
    carry = np.uint64(1) if new_low < product else np.uint64(0)
    new_high = _mul_high(low, jump[1]) + low * jump[0] + high * jump[1] + jump[2] + carry
    return new_high, new_low


@_jit
def _pcg64_output(high: np.uint64, low: np.uint64) -> np.uint64:
    """PCG64's output of a state: its halves xor-ed, rotated by its top 6 bits."""
    mixed = high ^ low
    turn = high >> np.uint64(58)
    return (mixed >> turn) | (mixed << ((np.uint64(64) - turn) & np.uint64(63)))


@_jit
def pcg64_fill(lanes: np.ndarray, jump: np.ndarray, out: np.ndarray) -> None:
    """PCG64's next `out.size` outputs, as numpy's `random_raw` gives them:
    `lanes[j]` (high, low) is the state after step j + 1, `jump` the affine
    map of four steps (see `drop_masks.DropMask.raw`); output 4q + j comes
    from lane j after q jumps, so four independent multiplications run at once."""
    h0, l0, h1, l1 = lanes[0, 0], lanes[0, 1], lanes[1, 0], lanes[1, 1]
    h2, l2, h3, l3 = lanes[2, 0], lanes[2, 1], lanes[3, 0], lanes[3, 1]
    quads = out.size // 4
    for q in range(quads):
        out[4 * q] = _pcg64_output(h0, l0)
        out[4 * q + 1] = _pcg64_output(h1, l1)
        out[4 * q + 2] = _pcg64_output(h2, l2)
        out[4 * q + 3] = _pcg64_output(h3, l3)
        h0, l0 = _pcg64_step(h0, l0, jump)
        h1, l1 = _pcg64_step(h1, l1, jump)
        h2, l2 = _pcg64_step(h2, l2, jump)
        h3, l3 = _pcg64_step(h3, l3, jump)
    rest = out.size - 4 * quads
    if rest > 0:
        out[4 * quads] = _pcg64_output(h0, l0)
    if rest > 1:
        out[4 * quads + 1] = _pcg64_output(h1, l1)
    if rest > 2:
        out[4 * quads + 2] = _pcg64_output(h2, l2)
