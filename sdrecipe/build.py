"""The build pipeline: recipe → graph → plan → execute → write.

`prepare` does every check that needs no tensor data (it is all `validate`
runs); `build` then streams the tensors into the outputs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sdrecipe.errors import RecipeError
from sdrecipe.executor import Executor
from sdrecipe.graph import MergeGraph, build_graph
from sdrecipe.hashing import FileHashes, hash_files
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.plan import MERGED, BuildPlan, make_plan
from sdrecipe.provenance import output_metadata
from sdrecipe.recipe import Recipe, load_recipe

ProgressFactory = Callable[[int], Callable[[int], None]]


@dataclass(frozen=True)
class Prepared:
    """A recipe checked against its input files' headers, ready to build."""

    recipe: Recipe
    graph: MergeGraph
    readers: dict[str, SafetensorsReader]
    plan: BuildPlan


@dataclass(frozen=True)
class OutputSummary:
    """What one output file holds and how its keys came to be."""

    name: str
    path: Path
    size: int
    merged: int
    passed_through: dict[str, int]
    dropped: int


@dataclass(frozen=True)
class BuildSummary:
    """The result of a build."""

    outputs: tuple[OutputSummary, ...]
    seconds: float


def default_threads() -> int:
    """Worker threads: one per available core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_inputs(graph: MergeGraph) -> dict[str, SafetensorsReader]:
    """Open (headers only) every input the selected outputs depend on."""
    recipe = graph.recipe
    needed: dict[str, None] = {}
    for name in graph.outputs:
        needed.update(dict.fromkeys(graph.inputs_of(recipe.outputs[name].node)))
    readers = {}
    for name in needed:
        spec = recipe.inputs[name]
        if not spec.path.is_file():
            problem = "is a folder" if spec.path.is_dir() else "does not exist"
            raise RecipeError(f"input {name!r}: {spec.path} {problem}", recipe.path, spec.line)
        try:
            readers[name] = SafetensorsReader(spec.path)
        except RecipeError as exc:
            raise RecipeError(f"input {name!r}: {exc}", recipe.path, spec.line) from None
    return readers


def prepare(recipe_path: Path, selected: Iterable[str] | None = None) -> Prepared:
    """Load and check everything a build needs, without reading tensor data."""
    recipe = load_recipe(recipe_path)
    graph = build_graph(recipe, selected)
    readers = open_inputs(graph)
    plan = make_plan(graph, {name: reader.infos() for name, reader in readers.items()})
    return Prepared(recipe=recipe, graph=graph, readers=readers, plan=plan)


def input_hashes(prepared: Prepared, threads: int) -> dict[str, FileHashes]:
    """Hash every input and check the pinned sha256s."""
    names = list(prepared.readers)
    recipe = prepared.recipe
    hashes = dict(
        zip(names, hash_files([recipe.inputs[n].path for n in names], threads), strict=True)
    )
    for name, found in hashes.items():
        pinned = recipe.inputs[name].sha256
        if pinned and pinned != found.sha256:
            raise RecipeError(
                f"input {name!r}: {recipe.inputs[name].path} has sha256 {found.sha256}, "
                f"but the recipe pins {pinned}",
                recipe.path,
                recipe.inputs[name].line,
            )
    return hashes


def build(
    prepared: Prepared, threads: int, progress: ProgressFactory | None = None
) -> BuildSummary:
    """Stream every selected output into place; on any failure no output is touched."""
    started = time.perf_counter()
    plan = prepared.plan
    hashes = input_hashes(prepared, threads)
    metadata = {name: reader.metadata for name, reader in prepared.readers.items()}
    with ExitStack() as cleanup:
        writers = {}
        for name, output_plan in plan.outputs.items():
            writer = SafetensorsWriter(
                output_plan.output.path,
                output_plan.tensors,
                output_metadata(prepared.graph, name, output_plan.tensors, hashes, metadata),
            )
            cleanup.callback(writer.abort)
            writers[name] = writer
        total = sum(sum(info.nbytes for info in p.tensors.values()) for p in plan.outputs.values())
        advance = progress(total) if progress else (lambda _: None)
        Executor(plan, prepared.readers, writers, threads).run(advance)
        for writer in writers.values():
            writer.commit()
        cleanup.pop_all()
    return BuildSummary(
        outputs=tuple(_summarise(plan, name, writers[name].size) for name in plan.outputs),
        seconds=time.perf_counter() - started,
    )


def _summarise(plan: BuildPlan, name: str, size: int) -> OutputSummary:
    output_plan = plan.outputs[name]
    counts: Counter[str] = output_plan.counts()
    merged = counts.pop(MERGED, 0)
    return OutputSummary(
        name=name,
        path=output_plan.output.path,
        size=size,
        merged=merged,
        passed_through=dict(sorted(counts.items())),
        dropped=output_plan.dropped,
    )
