"""Streaming, threaded evaluation of a build plan, straight into the output files.

Each key is one task. A task resolves where every value it needs comes from
(an input, a verified cache entry, or computation), then walks the tensor in
row ranges of at most `UNIT_ELEMENTS` elements, so memory stays a small
multiple of that whatever the model size. Tasks run on a thread pool (torch
and the hashes release the GIL); each writes
its bytes straight to their final place in every output, and streams new
intermediate values into cache objects, hashing everything in order.

With a placement (`--device`), each worker copies its key's operands to the
device and the results back through its own lane (see
`sdrecipe.engine.devices`), in row ranges as large as the device memory
allows (whole keys unless `--device-memory` says otherwise).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import torch

from sdrecipe.adapters.low_rank import LowRankDelta
from sdrecipe.cache.store import Cache, CorruptEntry, Location, ObjectWriter
from sdrecipe.engine.devices import DeviceMemory, Lane, Placement
from sdrecipe.engine.evaluate import Operand, evaluate
from sdrecipe.errors import BuildError
from sdrecipe.io.adapter_reader import AdapterReader
from sdrecipe.io.atomic import uninterrupted
from sdrecipe.io.dtypes import widened
from sdrecipe.io.encodings import FP8_MAX, Encoding
from sdrecipe.io.fingerprint import tensor_digest, tensor_hasher
from sdrecipe.io.finite import is_finite
from sdrecipe.io.model_reader import ModelReader
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.io.writers import OutputWriter
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import SAME_BYTES
from sdrecipe.plan.identity import Identities
from sdrecipe.plan.tensor_plan import BuildPlan, Compute, KeyPlan
from sdrecipe.recipe.expr import method_calls

# Elements per row range: 256 Ki elements is 1 MiB in float32, so a range's
# temporaries stay in the L2 cache and the allocator reuses them. Measured on
# full-size SD1.5 against 4 Mi: 4.5-5.1 s instead of 8.6 s, 200 MB of anonymous
# memory instead of 612 MB.
UNIT_ELEMENTS = 1 << 18
# Elements per unit that the device path converts, checks and copies back at once.
DEVICE_UNIT_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class CacheUse:
    """What the executor may read from and store in the cache."""

    cache: Cache
    identities: Identities
    found: Mapping[str, Location]
    store: frozenset[str]


@dataclass
class KeyResult:
    """What one key's task did, for the caller to record."""

    key: str
    written: int = 0
    read: int = 0  # bytes of input tensors read, as values (an adapter's factors: not counted)
    output_digests: dict[str, str] = field(default_factory=dict)
    # Digests of tensors written beside the key (its scale), by output and key.
    companion_digests: dict[str, dict[str, str]] = field(default_factory=dict)
    new_objects: list[tuple[str, Location, int]] = field(default_factory=list)
    used: list[Location] = field(default_factory=list)
    hits: int = 0
    computed: int = 0
    corrupt: list[CorruptEntry] = field(default_factory=list)
    # Outputs whose bytes at this key were not copied from the cache.
    not_from_cache: set[str] = field(default_factory=set)


def row_ranges(key_plan: KeyPlan, unit_elements: int = UNIT_ELEMENTS) -> Iterator[slice | None]:
    """Row ranges of one key (None: the whole tensor); they depend on shapes only."""
    rows = key_plan.rows
    step = max(1, unit_elements // max(1, key_plan.row_width))
    if rows is None or rows <= step:
        yield None
        return
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class Executor:
    """Runs a plan with `threads` workers, writing into the given writers."""

    def __init__(
        self,
        plan: BuildPlan,
        readers: Mapping[str, ModelReader],
        writers: Mapping[str, OutputWriter],
        threads: int,
        cache_use: CacheUse | None = None,
        placement: Placement | None = None,
    ):
        self.plan = plan
        self.readers = readers
        self.writers = writers
        self.threads = max(1, threads)
        self.cache_use = cache_use
        self.placement = placement
        self.device_memory = DeviceMemory(placement.memory if placement else None)
        self._lanes = threading.local()
        self.stopping = threading.Event()

    def lane(self) -> Lane | None:
        """The calling worker's lane to the device (None on the direct CPU path)."""
        if self.placement is None:
            return None
        lane = getattr(self._lanes, "lane", None)
        if lane is None:
            lane = self._lanes.lane = Lane(self.placement)
        return lane

    def run(self, progress: Callable[[KeyResult], None]) -> None:
        """Process every key; `progress` gets each finished key's result, in key order.

        Every key is queued at once: only running tasks hold tensors, and a
        worker never waits for the caller to collect an earlier result.
        """
        torch.set_num_threads(1)
        key_plans = [
            key_plan
            for key_plan in self.plan.keys
            if any(o in self.writers for o in (*key_plan.copies, *key_plan.computed_outputs))
        ]
        # OpenMP's thread count is per thread: each worker sets its own, or BLAS and
        # LAPACK calls would split work (and vary their rounding) across threads.
        pool = ThreadPoolExecutor(
            self.threads,
            thread_name_prefix="sdrecipe",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        try:
            futures = [pool.submit(self.run_key, key_plan) for key_plan in key_plans]
            for future in futures:
                progress(future.result())
        except BaseException:
            self.stopping.set()  # a failure or Ctrl-C: running tasks stop at their next range
            raise
        finally:
            # No worker may still write when the caller removes the outputs' temporaries,
            # so a second Ctrl-C waits for this short join.
            with uninterrupted():
                pool.shutdown(wait=True, cancel_futures=True)

    def run_key(self, key_plan: KeyPlan) -> KeyResult:
        """Produce one key in every output; return what was done."""
        return _KeyTask(self, key_plan).run()


class _Stopped(Exception):
    """Ends a key task once the build has failed or was interrupted."""


class _KeyTask:
    """The work of one key: resolve sources, then stream row ranges."""

    def __init__(self, executor: Executor, key_plan: KeyPlan):
        self.executor = executor
        self.plan = key_plan
        self.key = key_plan.key
        self.graph = executor.plan.graph
        self.result = KeyResult(self.key)
        self.loaded: dict[str, torch.Tensor] = {}
        # Each input's tensor, read once per key (an adapter computes its delta on read).
        self.read: dict[str, Operand] = {}
        self.objects: dict[str, tuple[ObjectWriter, blake3.blake3, str]] = {}
        self.lane = executor.lane()

    def run(self) -> KeyResult:
        executor = self.executor
        if executor.stopping.is_set():
            raise _Stopped
        computed: list[str] = []
        for output in self.plan.computed_outputs:
            if output in executor.writers and not self._copy_cached_output(output):
                computed.append(output)
        self.result.not_from_cache.update(computed)
        for output, source in self.plan.copies.items():
            if output in executor.writers:
                raw = executor.readers[source].raw(self.key)
                self.result.read += raw.nbytes
                self._write_all(output, raw)
        if not computed:
            return self.result
        for output in computed:
            self._resolve(self.plan.sources[output])
        try:
            unit, held = self._ranges(computed)
            # On a device, the copies and the arithmetic queue on this worker's stream, in order.
            running = self.lane.running() if self.lane is not None else contextlib.nullcontext()
            with executor.device_memory.holding(held), running:
                self._stream(computed, unit)
        except BaseException:
            for writer, _, _ in self.objects.values():
                writer.abort()
            raise
        for writer, hasher, identity in self.objects.values():
            location, size = writer.finish(hasher.hexdigest())
            self.result.new_objects.append((identity, location, size))
        return self.result

    # --- where values come from -----------------------------------------------------

    def _cached(self, identity: str) -> tuple[SafetensorsReader, str, Location] | None:
        """A verified cache entry for `identity`, or None (a corrupt one is discarded)."""
        use = self.executor.cache_use
        location = use.found.get(identity) if use else None
        if location is None:
            return None
        try:
            reader, key = use.cache.open_entry(location)  # type: ignore[union-attr]
        except CorruptEntry as exc:
            self.result.corrupt.append(exc)
            return None
        self.result.used.append(location)
        self.result.hits += 1
        return reader, key, location

    def _copy_cached_output(self, output: str) -> bool:
        use = self.executor.cache_use
        if use is None or self._encoding(output) is not None:
            return False  # an encoded tensor's cached bytes may lack what goes with them
        cached = self._cached(use.identities.outputs[output][self.key])
        if cached is None:
            return False
        reader, key, location = cached
        self._write_all(output, reader.raw(key), location.digest)
        return True

    def _write_all(self, output: str, data: memoryview, digest: str | None = None) -> None:
        """Write a whole tensor into `output` and record its digest, hashing
        the bytes unless the `digest` is known."""
        writer = self.executor.writers[output]
        writer.write(self.key, data)
        self.result.output_digests[output] = digest or tensor_digest(writer.info(self.key), [data])
        self.result.written += len(data)

    def _resolve(self, name: str) -> None:
        """Decide how `name`'s value is obtained: loaded from cache, or computed."""
        step = self.plan.steps.get(name)
        if step is None or name in self.loaded or name in self.objects:
            return
        operands = self.graph.operands(name)
        if not isinstance(step, Compute):
            self._resolve(operands[0])
            return
        use = self.executor.cache_use
        identity = use.identities.values[name][self.key] if use else ""
        cached = self._cached(identity) if use else None
        if cached is not None:
            reader, key, _ = cached
            self.loaded[name] = reader.tensor(key)
            return
        self.result.computed += 1
        if use is not None and name in use.store:
            info = self._value_info(name, step)
            self.objects[name] = (use.cache.object_writer(info), tensor_hasher(info), identity)
        for operand in operands:
            self._resolve(operand)

    def _value_info(self, node: str, step: Compute) -> TensorInfo:
        base = self.executor.readers[self.graph.base_input(node)].info(self.key)
        return TensorInfo(step.dtype, base.shape)

    # --- streaming ----------------------------------------------------------------

    def _encoding(self, output: str) -> Encoding | None:
        return self.executor.plan.outputs[output].encodings.get(self.key)

    def _ranges(self, outputs: list[str]) -> tuple[int, int]:
        """Elements per row range, and the device memory one range holds (0 on
        the direct path, or with no cap). On a device a range is the whole key,
        or this worker's share of the cap (a key that cannot be split in rows
        holds what it needs, and so waits to run alone)."""
        placement = self.executor.placement
        if placement is None:
            return UNIT_ELEMENTS, 0
        # Every input and value of the key in float64, and the result twice.
        per_element = 8 * (len(self.executor.readers) + len(self.plan.steps) + 2)
        if self._adds_factors(outputs):
            # A LoRA's product is the CPU's in the direct path's row ranges only
            # (BLAS blocks a matrix product by its rows).
            return UNIT_ELEMENTS, 0 if placement.memory is None else UNIT_ELEMENTS * per_element
        base = self.graph.base_input(self.plan.sources[outputs[0]])
        numel = max(1, self.executor.readers[base].info(self.key).numel)
        if placement.memory is None:
            return numel, 0
        share = max(self.plan.row_width, placement.memory // (self.executor.threads * per_element))
        if self.plan.rows is None or share >= numel:
            return numel, numel * per_element
        return share, share * per_element

    def _adds_factors(self, outputs: list[str]) -> bool:
        """Whether an output's value here may add a LoRA's factors."""
        readers = self.executor.readers
        return any(
            isinstance(readers[leaf], AdapterReader)
            for output in outputs
            for leaf in self.graph.inputs_of(self.plan.sources[output])
        )

    def _stream(self, outputs: list[str], unit_elements: int) -> None:
        writers = self.executor.writers
        hashers = {output: tensor_hasher(writers[output].info(self.key)) for output in outputs}
        scales = self._scales(outputs, unit_elements)
        unit_size = UNIT_ELEMENTS if self.lane is None else DEVICE_UNIT_ELEMENTS
        for rows in row_ranges(self.plan, unit_elements):
            if self.executor.stopping.is_set():
                raise _Stopped
            values = _RangeValues()
            for output in outputs:
                info = writers[output].info(self.key)
                tensor = self._tensor(self.plan.sources[output], rows, values)
                encoding = self._encoding(output)
                if encoding is not None:
                    if not is_finite(tensor):
                        self._explain_non_finite(output, values, tensor)
                    if not encoding.holds_non_finite and not is_finite(tensor):
                        raise BuildError(
                            f"output {output!r}: {self.key} has infinite or NaN values from an "
                            f"input, which {encoding.describe()} cannot hold; no output was written"
                        )
                    stored = encoding.encode(self._on_cpu(tensor), scales.get(output))
                    self._write_piece(output, stored, self._offset(rows, info), hashers[output])
                    continue
                # In units of a range at most: a whole-tensor method's result is
                # one range, and each unit is converted, checked, hashed and
                # written while it is in the cache.
                flat = tensor.reshape(-1)
                start = self._offset(rows, info)
                for unit in range(0, max(1, flat.numel()), unit_size):
                    part = flat[unit : unit + unit_size]
                    stored = widened(part, info.dtype)
                    # float8 cannot be checked (nor hold infinity): check what it came from.
                    checked = stored if info.dtype.itemsize > 1 else part
                    if checked.is_floating_point() and not is_finite(checked):
                        self._explain_non_finite(output, values, part)
                    offset = start + unit * info.dtype.itemsize
                    if self.lane is not None:
                        stored = self.lane.download(stored)
                    self._write_piece(output, stored, offset, hashers[output])
                self._check_range(output, tensor, info.dtype)
            for node, (writer, hasher, _) in self.objects.items():
                tensor = self._tensor(node, rows, values)
                if self.lane is not None:
                    tensor = self.lane.download(tensor)
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                writer.write(data.data, self._offset(rows, writer.info))
                hasher.update(data.data)
        for output, hasher in hashers.items():
            self.result.output_digests[output] = hasher.hexdigest()
        for output, scale in scales.items():
            for key, tensor in self._encoding(output).companions(scale).items():  # type: ignore[union-attr]
                data = tensor.reshape(-1).view(torch.uint8).numpy().data
                writers[output].write(key, data)
                digest = tensor_digest(writers[output].info(key), [data])
                self.result.companion_digests.setdefault(output, {})[key] = digest

    def _write_piece(
        self, output: str, stored: torch.Tensor, offset: int, hasher: blake3.blake3
    ) -> None:
        """Write `stored`'s bytes at `offset` into `output`'s tensor, and hash them."""
        data = stored.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.executor.writers[output].write(self.key, data.data, offset)
        hasher.update(data.data)
        self.result.written += data.nbytes

    def _scales(self, outputs: list[str], unit_elements: int) -> dict[str, float]:
        """The scale of each output whose encoding needs the whole tensor's largest
        magnitude first: a pass over the row ranges before the one that writes."""
        scales = {}
        for output in outputs:
            encoding = self._encoding(output)
            if encoding is None or not encoding.whole:
                continue
            largest = 0.0
            for rows in row_ranges(self.plan, unit_elements):
                value = self._tensor(self.plan.sources[output], rows, _RangeValues())
                if value.numel():
                    largest = max(largest, float(value.abs().max()))
            scales[output] = encoding.scale(largest)  # type: ignore[union-attr]
        return scales

    def _check_range(self, output: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        """Refuse values an fp8 output cannot hold (torch would clip them)."""
        limit = FP8_MAX.get(dtype)
        if limit is None or not tensor.numel():
            return
        largest = float(tensor.abs().max())
        if largest > limit:  # NaN compares false: the finiteness check names it
            name = str(dtype).removeprefix("torch.")
            raise BuildError(
                f"output {output!r}: {self.key} has values up to {largest:.6g}, past "
                f"{name}'s largest ({limit:g}), which fp8 would clip; write it with "
                "`scaled: true` or a wider dtype; no output was written"
            )

    def _offset(self, rows: slice | None, info: TensorInfo) -> int:
        if rows is None:
            return 0
        return rows.start * (info.nbytes // self.plan.rows)  # type: ignore[operator]

    def _tensor(self, name: str, rows: slice | None, values: _RangeValues) -> torch.Tensor:
        """`name`'s value on `rows` as a tensor."""
        value = self._value(name, rows, values)
        return value.dense() if isinstance(value, LowRankDelta) else value

    def _value(self, name: str, rows: slice | None, values: _RangeValues) -> Operand:
        """`name`'s value on `rows`, computed once per row range (a LoRA input's
        as its factors: see `sdrecipe.adapters.low_rank`)."""
        if name in values:
            return values[name]
        step = self.plan.steps.get(name)
        operands = self.graph.operands(name) if step is not None else []
        value: Operand
        if step is None or name in self.loaded:
            whole = self.loaded[name] if step is not None else self._input(name)
            value = whole if rows is None else whole[rows]
        elif not isinstance(step, Compute):
            value = self._value(operands[0], rows, values)
        else:
            env = {
                operand: self._value(operand, rows, values)
                for operand in operands
                if operand not in step.absent
            }
            on_device = self._on_device(step, env)
            env = {o: self._moved(o, v, on_device, values) for o, v in env.items()}
            shape = env[operands[0]].shape
            device = self.lane.device if on_device else None  # type: ignore[union-attr]
            env.update(
                {o: torch.zeros(shape, dtype=step.dtype, device=device) for o in step.absent}
            )
            if step.channels is None:
                value = evaluate(step.expr, env, step.dtype, step.context, on_device)
            else:
                dense = {o: v.dense() if isinstance(v, LowRankDelta) else v for o, v in env.items()}
                shared = {operand: t[:, : step.channels] for operand, t in dense.items()}
                value = dense[operands[0]].to(step.dtype, copy=True)
                value[:, : step.channels] = evaluate(
                    step.expr, shared, step.dtype, step.context, on_device
                )
            if on_device:
                values.placed[name] = value
        values[name] = value
        return value

    def _on_device(self, step: Compute, env: Mapping[str, Operand]) -> bool:
        """Whether `step` runs on the device: every method it calls can, it adds no
        LoRA's factors (their products are the CPU's), and on MPS, which lacks
        float64 (and much of torch.linalg), it computes in float32 with methods
        that give the CPU's bytes."""
        lane = self.lane
        if lane is None or any(isinstance(v, LowRankDelta) for v in env.values()):
            return False
        methods = [get_method(name) for name in method_calls(step.expr)]
        if lane.device.type == "mps":
            return step.dtype != torch.float64 and all(m.device == SAME_BYTES for m in methods)
        return all(method.on_device is not None for method in methods)

    def _moved(self, name: str, value: Operand, on_device: bool, values: _RangeValues) -> Operand:
        """`name`'s `value` where a step on the device (or the CPU) reads it: on the
        device, as computed there or copied there once per range through the
        lane's buffer for `name`."""
        if isinstance(value, LowRankDelta):
            return value
        if not on_device:
            return self._on_cpu(value)
        placed = values.placed.get(name)
        if placed is None and any(value is found for found in values.placed.values()):
            placed = value  # a value computed there, passed through another node
        if placed is None:
            assert self.lane is not None
            placed = values.placed[name] = self.lane.upload(self._on_cpu(value), name)
        return placed

    def _on_cpu(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in CPU memory of its own (a copy, if it is on a device)."""
        return tensor if tensor.device.type == "cpu" else tensor.cpu()

    def _input(self, name: str) -> Operand:
        """Input `name`'s tensor at this key, read once; a LoRA's delta as factors."""
        tensor = self.read.get(name)
        if tensor is None:
            reader = self.executor.readers[name]
            factors = reader.low_rank(self.key) if isinstance(reader, AdapterReader) else None
            if factors is not None:
                tensor = factors
            else:
                tensor = reader.tensor(self.key)
                self.result.read += tensor.nbytes
            self.read[name] = tensor
        return tensor

    def _explain_non_finite(self, output: str, values: _RangeValues, tensor: torch.Tensor) -> None:
        """Fail with the node (or the output's dtype) that turned finite values into
        infinities or NaN in this row range; return if an input already had them."""
        dtype = self.executor.writers[output].info(self.key).dtype
        for node in self.graph.order:
            step = self.plan.steps.get(node)
            if node not in values or not isinstance(step, Compute) or _finite(values[node]):
                continue
            if all(_finite(values[operand]) for operand in self.graph.operands(node)):
                raise _non_finite_error(
                    f"node {node!r}", self.key, "check its factors and parameters"
                )
            return  # carried over from an input: not this build's doing
        if is_finite(tensor):
            cause = f"they overflow {str(dtype).removeprefix('torch.')}, the output's dtype"
            raise _non_finite_error(f"output {output!r}", self.key, cause)


class _RangeValues(dict[str, Operand]):
    """The values of one row range by name, as computed (on the CPU or the
    device); `placed`, their copies on the device, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.placed: dict[str, torch.Tensor] = {}


def _finite(value: Operand) -> bool:
    return value.finite() if isinstance(value, LowRankDelta) else is_finite(value)


def _non_finite_error(where: str, key: str, cause: str) -> BuildError:
    return BuildError(
        f"{where} gives infinite or NaN values at {key} from finite inputs ({cause}); "
        "no output was written"
    )
