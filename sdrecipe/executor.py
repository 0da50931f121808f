"""Streaming, threaded evaluation of a build plan, straight into the output files.

Work is split into units of one key, or of a range of rows of one key, so that
memory stays a small multiple of the unit size however large the model. Units
run on a thread pool (torch releases the GIL) with a bounded number in flight;
each unit writes its bytes to their final place in every output file.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from sdrecipe.evaluate import evaluate
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.plan import BuildPlan, Compute, KeyPlan

# Elements per unit: 4 Mi elements is 16 MiB in float32.
UNIT_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) of one key; `sliced` False means the whole tensor."""

    plan: KeyPlan
    start: int
    stop: int
    sliced: bool


def work_units(plan: BuildPlan, unit_elements: int = UNIT_ELEMENTS) -> Iterator[WorkUnit]:
    """Units in key order; the split depends only on shapes, never on thread count."""
    for key_plan in plan.keys:
        rows = key_plan.rows
        if not key_plan.reads or rows is None or rows == 0:
            yield WorkUnit(key_plan, 0, rows or 0, sliced=False)
            continue
        step = max(1, unit_elements // max(1, key_plan.row_width))
        for start in range(0, rows, step):
            yield WorkUnit(key_plan, start, min(rows, start + step), sliced=step < rows)


class Executor:
    """Runs a plan with `threads` workers, writing into the given writers."""

    def __init__(
        self,
        plan: BuildPlan,
        readers: Mapping[str, SafetensorsReader],
        writers: Mapping[str, SafetensorsWriter],
        threads: int,
    ):
        self.plan = plan
        self.readers = readers
        self.writers = writers
        self.threads = max(1, threads)
        recipe = plan.graph.recipe
        self.output_nodes = {name: recipe.outputs[name].node for name in plan.graph.outputs}

    def run(self, progress: Callable[[int], None]) -> None:
        """Process every unit; `progress` gets the bytes each finished unit wrote."""
        torch.set_num_threads(1)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="sdrecipe") as pool:
            window: deque[Future[int]] = deque()
            try:
                for unit in work_units(self.plan):
                    window.append(pool.submit(self.run_unit, unit))
                    if len(window) >= 2 * self.threads:
                        progress(window.popleft().result())
                while window:
                    progress(window.popleft().result())
            finally:
                for future in window:
                    future.cancel()

    def run_unit(self, unit: WorkUnit) -> int:
        """Compute and write one unit; return the bytes written."""
        key_plan = unit.plan
        key = key_plan.key
        written = 0
        for output, source in key_plan.copies.items():
            data = self.readers[source].raw(key)
            start, stop = self._byte_range(unit, len(data))
            self.writers[output].write(key, data[start:stop], start)
            written += stop - start
        if not key_plan.reads:
            return written
        values = self._node_values(unit)
        for output in key_plan.computed_outputs:
            writer = self.writers[output]
            info = writer.slots[key].info
            tensor = values[self.output_nodes[output]].to(info.dtype).contiguous()
            start, _ = self._byte_range(unit, info.nbytes)
            writer.write_tensor(key, tensor, start)
            written += tensor.numel() * tensor.element_size()
        return written

    @staticmethod
    def _byte_range(unit: WorkUnit, nbytes: int) -> tuple[int, int]:
        if not unit.sliced:
            return 0, nbytes
        row_bytes = nbytes // unit.plan.rows  # type: ignore[operator]
        return unit.start * row_bytes, unit.stop * row_bytes

    def _node_values(self, unit: WorkUnit) -> dict[str, torch.Tensor]:
        key_plan = unit.plan
        graph = self.plan.graph
        values: dict[str, torch.Tensor] = {}

        def value(name: str) -> torch.Tensor:
            if name not in values:
                tensor = self.readers[name].tensor(key_plan.key)
                values[name] = tensor[unit.start : unit.stop] if unit.sliced else tensor
            return values[name]

        for node, step in key_plan.steps:
            operands = graph.operands(node)
            if not isinstance(step, Compute):
                values[node] = value(operands[0])
                continue
            env = {name: value(name) for name in operands}
            if step.channels is None:
                values[node] = evaluate(graph.recipe.nodes[node].expr, env, key_plan.compute_dtype)
                continue
            shared = {name: tensor[:, : step.channels] for name, tensor in env.items()}
            result = env[operands[0]].to(key_plan.compute_dtype, copy=True)
            result[:, : step.channels] = evaluate(
                graph.recipe.nodes[node].expr, shared, key_plan.compute_dtype
            )
            values[node] = result
        return values
