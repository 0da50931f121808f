"""The build pipeline: recipe → graph → plan → execute → write.

`prepare` does every check that needs no tensor data (it is all `validate`
runs). `assess` fingerprints the inputs and works out, against the lock file
and the cache, what each node needs. `build` then restores what it can from
the cache and streams the rest into the outputs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from sdrecipe.arch.detect import Architecture, detect
from sdrecipe.cache import PACK, Cache, Location, file_sha256
from sdrecipe.errors import RecipeError
from sdrecipe.executor import CacheUse, Executor, KeyResult
from sdrecipe.fingerprint import FileStat, Fingerprint, sha256_of
from sdrecipe.graph import MergeGraph, build_graph
from sdrecipe.guard import check_outputs
from sdrecipe.identity import Identities, tensor_identities
from sdrecipe.io.atomic import publish, remove_stale_temporaries, temporary_path
from sdrecipe.io.diffusers_writer import TOKENIZERS
from sdrecipe.io.readers import ModelReader, open_model
from sdrecipe.io.writers import OutputWriter, open_writer
from sdrecipe.lock import (
    Lock,
    LockedInput,
    LockedNode,
    LockedOutput,
    built_from,
    read_lock,
    recipe_sha256,
    relative_to_recipe,
    tool_versions,
    write_lock,
)
from sdrecipe.plan import MERGED, BuildPlan, make_plan
from sdrecipe.provenance import output_metadata
from sdrecipe.recipe import Recipe, load_recipe
from sdrecipe.staleness import (
    FROM_CACHE,
    REBUILD,
    UP_TO_DATE,
    NodeStatus,
    OutputFacts,
    node_statuses,
)

Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(label: str, total: int) -> Callable[[int], None]:
    """A progress reporter that shows nothing."""
    return lambda done: None


@dataclass(frozen=True)
class Prepared:
    """A recipe checked against its input files' headers, ready to build."""

    recipe: Recipe
    graph: MergeGraph
    readers: dict[str, ModelReader]
    plan: BuildPlan
    architectures: dict[str, Architecture]


@dataclass(frozen=True)
class Assessment:
    """What a build would do: identities, lock comparison and node states."""

    fingerprints: dict[str, Fingerprint]
    identities: Identities
    metadata: dict[str, dict[str, str]]
    output_ids: dict[str, str]
    lock: Lock | None
    found: dict[str, Location]
    facts: dict[str, OutputFacts]
    statuses: list[NodeStatus]


@dataclass(frozen=True)
class OutputSummary:
    """What one output file holds, how its keys came to be, and what the build did:
    `state` in words, `status` in plan's terms (up to date, from cache, rebuild)."""

    name: str
    path: Path
    state: str
    status: str
    size: int
    merged: int
    passed_through: dict[str, int]
    dropped: int


@dataclass
class CacheStats:
    """How the cache served a build."""

    tensors_from_cache: int = 0
    tensors_computed: int = 0
    outputs_restored: int = 0
    outputs_up_to_date: int = 0
    corrupt_entries: int = 0


@dataclass(frozen=True)
class BuildSummary:
    """The result of a build."""

    outputs: tuple[OutputSummary, ...]
    seconds: float
    cache: CacheStats
    warnings: tuple[str, ...] = field(default=())


def default_threads() -> int:
    """Worker threads: one per available core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- prepare: everything that needs only headers -------------------------------------


def open_inputs(graph: MergeGraph) -> dict[str, ModelReader]:
    """Open (headers only) every input the selected outputs depend on."""
    recipe = graph.recipe
    needed: dict[str, None] = {}
    for name in graph.outputs:
        needed.update(dict.fromkeys(graph.output_inputs(name)))
    readers = {}
    for name in needed:
        spec = recipe.inputs[name]
        if not spec.path.exists():
            raise RecipeError(f"input {name!r}: {spec.path} does not exist", recipe.path, spec.line)
        try:
            readers[name] = open_model(spec.path)
        except RecipeError as exc:
            raise RecipeError(f"input {name!r}: {exc}", recipe.path, spec.line) from None
    return readers


def prepare(
    recipe_path: Path,
    selected: Iterable[str] | None = None,
    force: bool = False,
    cache_root: Path | None = None,
) -> Prepared:
    """Load and check everything a build needs, without reading tensor data.

    Operands of different architectures are refused unless `force` (or the
    node's `force: true`) says the per-key merge is meant. Outputs that would
    replace an input, the recipe, its lock, another output or anything in
    `cache_root` are refused (see `sdrecipe.guard`).
    """
    return prepare_recipe(load_recipe(recipe_path), selected, force, cache_root)


def prepare_recipe(
    recipe: Recipe,
    selected: Iterable[str] | None = None,
    force: bool = False,
    cache_root: Path | None = None,
) -> Prepared:
    """`prepare` for a recipe already loaded."""
    graph = build_graph(recipe, selected)
    check_outputs(recipe, cache_root, graph.outputs)
    readers = open_inputs(graph)
    architectures = {name: detect(r.infos(), r.metadata) for name, r in readers.items()}
    if not force:
        check_architectures(graph, architectures)
    for name in graph.outputs:
        output = recipe.outputs[name]
        base = graph.base_input(output.node)
        if output.format == "diffusers" and architectures[base].family == "unknown":
            raise RecipeError(
                f"output {name!r}: a diffusers folder needs a known architecture, and "
                f"{base} is {architectures[base].describe()}",
                recipe.path,
                output.line,
            )
    plan = make_plan(
        graph,
        {name: reader.infos() for name, reader in readers.items()},
        {name: architecture.family for name, architecture in architectures.items()},
    )
    return Prepared(recipe, graph, readers, plan, architectures)


def check_architectures(graph: MergeGraph, architectures: Mapping[str, Architecture]) -> None:
    """Refuse a node whose inputs are of different known families."""
    recipe = graph.recipe
    for node in graph.order:
        if recipe.nodes[node].force:
            continue
        families = {
            leaf: architectures[leaf].family
            for leaf in graph.inputs_of(node)
            if architectures[leaf].family != "unknown"
        }
        if len(set(families.values())) > 1:
            described = ", ".join(
                f"{leaf} is {architectures[leaf].describe()}" for leaf in families
            )
            raise RecipeError(
                f"node {node!r} mixes architectures ({described}); a per-key merge of "
                "different architectures gives a broken model. If you mean it, set "
                "`force: true` on the node or build with --force",
                recipe.path,
                recipe.nodes[node].line,
            )


def tokenizer_folders(prepared: Prepared, output: str) -> dict[str, Path]:
    """The tokenizer folders a diffusers output copies: those of the first
    diffusers-folder input it depends on (the base first) that has any."""
    for leaf in prepared.graph.output_inputs(output):
        folder = prepared.recipe.inputs[leaf].path
        found = {name: folder / name for name in TOKENIZERS if (folder / name).is_dir()}
        if found:
            return found
    return {}


def _written_as(prepared: Prepared, output: str) -> dict[str, str]:
    """What decides an output's bytes besides its tensors and metadata: the
    format, and for a diffusers folder the tokenizer files it copies."""
    spec = prepared.recipe.outputs[output]
    if spec.format != "diffusers":
        return {"format": spec.format}
    tokenizers = tokenizer_folders(prepared, output)
    return {"format": spec.format, **{n: sha256_of(f) for n, f in tokenizers.items()}}


# --- assess: fingerprints, identities, and what is stale -----------------------------


def fingerprint_inputs(
    prepared: Prepared, cache: Cache | None, threads: int, progress: Progress = no_progress
) -> dict[str, Fingerprint]:
    """Each input's fingerprint: remembered by stat, or read once and remembered."""
    recipe = prepared.recipe
    known: dict[str, Fingerprint] = {}
    missing: list[str] = []
    stats = {name: FileStat.of(recipe.inputs[name].path) for name in prepared.readers}
    for name in prepared.readers:
        found = cache.known_fingerprint(recipe.inputs[name].path, stats[name]) if cache else None
        if found is None:
            missing.append(name)
        else:
            known[name] = found
    if missing:
        advance = progress("hashing", sum(stats[name].size for name in missing))

        def take(name: str) -> Fingerprint:
            result = prepared.readers[name].fingerprint()
            advance(stats[name].size)
            return result

        with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
            for name, result in zip(missing, pool.map(take, missing), strict=True):
                known[name] = result
                if cache is not None:
                    cache.remember_file(
                        recipe.inputs[name].path, stats[name], result.sha256, result
                    )
    for name, result in known.items():
        pinned = recipe.inputs[name].sha256
        if pinned and pinned != result.sha256:
            raise RecipeError(
                f"input {name!r}: {recipe.inputs[name].path} has sha256 {result.sha256}, "
                f"but the recipe pins {pinned}",
                recipe.path,
                recipe.inputs[name].line,
            )
    return {name: known[name] for name in prepared.readers}


def assess(
    prepared: Prepared,
    cache: Cache | None,
    threads: int,
    force: bool = False,
    progress: Progress = no_progress,
) -> Assessment:
    """Fingerprint the inputs and decide, against lock and cache, what each node needs."""
    plan = prepared.plan
    fingerprints = fingerprint_inputs(prepared, cache, threads, progress)
    identities = tensor_identities(plan, {n: f.tensors for n, f in fingerprints.items()})
    metadata = {
        name: output_metadata(
            prepared.graph,
            name,
            output_plan.tensors,
            fingerprints,
            {n: r.metadata for n, r in prepared.readers.items()},
            prepared.architectures[prepared.graph.base_input(output_plan.output.node)],
        )
        for name, output_plan in plan.outputs.items()
    }
    output_ids = {
        name: identities.output_id(name, metadata[name], _written_as(prepared, name))
        for name in plan.outputs
    }
    lock = read_lock(prepared.recipe.path)
    wanted = set()
    for values in identities.values.values():
        wanted.update(values.values())
    for values in identities.outputs.values():
        wanted.update(values.values())
    # --force recomputes everything: cached tensors are written, never read.
    found = cache.lookup(wanted) if cache and cache.tensors and not force else {}
    facts = {
        name: _output_facts(prepared, name, output_ids[name], lock, cache, force)
        for name in plan.outputs
    }
    statuses = node_statuses(
        plan,
        identities,
        lock,
        {n: f.sha256 for n, f in fingerprints.items()},
        set(found),
        facts,
        force,
    )
    return Assessment(fingerprints, identities, metadata, output_ids, lock, found, facts, statuses)


def _output_facts(
    prepared: Prepared,
    name: str,
    output_id: str,
    lock: Lock | None,
    cache: Cache | None,
    force: bool,
) -> OutputFacts:
    path = prepared.recipe.outputs[name].path
    exists = path.exists()
    locked = lock.outputs.get(name) if lock else None
    current = (
        not force
        and exists
        and locked is not None
        and locked.key == output_id
        and file_sha256(path, cache) == locked.sha256
    )
    pack = (
        not force and cache is not None and cache.tensors and cache.find_pack(output_id) is not None
    )
    return OutputFacts(exists=exists, current=current, pack_available=pack)


# --- build ----------------------------------------------------------------------------


def build(
    prepared: Prepared,
    threads: int,
    cache: Cache | None = None,
    force: bool = False,
    progress: Progress = no_progress,
    update_lock: bool = True,
) -> BuildSummary:
    """Bring every selected output up to date; on failure no output is touched."""
    started = time.perf_counter()
    with cache.locked() if cache else nullcontext():
        assessment = assess(prepared, cache, threads, force, progress)
        builder = _Builder(prepared, assessment, cache, threads, progress)
        return builder.run(started, update_lock)


@dataclass(frozen=True)
class VerifyResult:
    """One output rebuilt from scratch, against the lock."""

    name: str
    expected: str
    actual: str

    @property
    def reproducible(self) -> bool:
        """True when the rebuilt bytes are the locked bytes."""
        return self.expected == self.actual


def verify(recipe_path: Path, threads: int, progress: Progress = no_progress) -> list[VerifyResult]:
    """Rebuild every locked output without the cache, elsewhere, and compare with the lock."""
    lock = read_lock(recipe_path)
    if lock is None or not lock.outputs:
        raise RecipeError("there is no lock file to verify against; build first", recipe_path)
    recipe = load_recipe(recipe_path)
    names = [name for name in recipe.outputs if name in lock.outputs]
    first = recipe.outputs[names[0]].path
    first.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(first.parent)
    # Named like every temporary, so a verify that is killed is cleaned up later.
    with tempfile.TemporaryDirectory(
        prefix=".verify-", suffix=f".sdrecipe-{os.getpid()}.tmp", dir=first.parent
    ) as folder:
        moved = {
            name: dataclasses.replace(spec, path=Path(folder) / str(index) / spec.path.name)
            for index, (name, spec) in enumerate(recipe.outputs.items())
        }
        elsewhere = dataclasses.replace(recipe, outputs=moved)
        prepared = prepare_recipe(elsewhere, names, force=True)
        build(prepared, threads, cache=None, force=True, progress=progress, update_lock=False)
        return [
            VerifyResult(name, lock.outputs[name].sha256, file_sha256(moved[name].path, None))
            for name in names
        ]


class _Builder:
    def __init__(
        self,
        prepared: Prepared,
        assessment: Assessment,
        cache: Cache | None,
        threads: int,
        progress: Progress,
    ):
        self.prepared = prepared
        self.assessment = assessment
        self.cache = cache
        self.threads = threads
        self.progress = progress
        self.stats = CacheStats()
        self.warnings: list[str] = list(prepared.plan.warnings)
        self.states: dict[str, str] = {}
        self.sha256: dict[str, str] = {}
        self._digests: dict[str, dict[str, str]] = {}
        self._not_from_cache: set[str] = set()

    def run(self, started: float, update_lock: bool) -> BuildSummary:
        """Stage every output that is not up to date (restored from the cache or
        built), publish them together once all are complete, then cache the new
        ones and write the lock. A failure before publishing leaves every output
        as it was; the lock is written last, so it never describes a file that
        is not on disk."""
        plan = self.prepared.plan
        for folder in {spec.output.path.parent for spec in plan.outputs.values()}:
            remove_stale_temporaries(folder)
        restored: dict[str, Path] = {}
        built: list[str] = []
        planned = {s.output: s.state for s in self.assessment.statuses if s.output is not None}
        with ExitStack() as cleanup:
            for name in plan.outputs:
                if planned[name] == UP_TO_DATE:
                    self.states[name] = "up to date"
                    self.sha256[name] = self.assessment.lock.outputs[name].sha256  # type: ignore[union-attr]
                    self.stats.outputs_up_to_date += 1
                    continue
                facts = self.assessment.facts[name]
                restore = planned[name] == FROM_CACHE and facts.pack_available
                staged = self._stage_restore(name) if restore else None
                if staged is None:
                    built.append(name)
                else:
                    cleanup.callback(staged.unlink, missing_ok=True)
                    restored[name] = staged
            writers = self._build(built, cleanup) if built else {}
            for name, staged in restored.items():
                self._publish_restored(name, staged)
            for writer in writers.values():
                writer.publish()
            cleanup.pop_all()
        for name in built:
            self.states[name] = "built"
            self._cache_output(name, self._digests[name])
        if update_lock:
            self._write_lock()
        if self.cache is not None:
            self.cache.record_stats(vars(self.stats))
        return BuildSummary(
            outputs=tuple(self._summarise(name) for name in plan.outputs),
            seconds=time.perf_counter() - started,
            cache=self.stats,
            warnings=tuple(self.warnings),
        )

    def _stage_restore(self, name: str) -> Path | None:
        """Link a verified cached copy of the output beside it, under a temporary name."""
        assert self.cache is not None
        pack = self.cache.find_pack(self.assessment.output_ids[name])
        if pack is None:
            return None
        sha256 = pack.name.removesuffix(".safetensors")
        if file_sha256(pack, None) != sha256:
            self.warnings.append(f"cache entry {pack} is corrupt; discarded and rebuilt")
            self.stats.corrupt_entries += 1
            self.cache.discard(Location(PACK, sha256, "", ""))
            return None
        output = self.prepared.recipe.outputs[name].path
        output.parent.mkdir(parents=True, exist_ok=True)
        staged = temporary_path(output, unique=True)
        try:
            os.link(pack, staged)
        except OSError:
            shutil.copyfile(pack, staged)
        self.sha256[name] = sha256
        return staged

    def _publish_restored(self, name: str, staged: Path) -> None:
        assert self.cache is not None
        output = self.prepared.recipe.outputs[name].path
        publish(staged, output)
        self.cache.remember_file(output, FileStat.of(output), self.sha256[name])
        self.states[name] = "restored from cache"
        self.stats.outputs_restored += 1

    def _build(self, names: list[str], cleanup: ExitStack) -> dict[str, OutputWriter]:
        """Compute and write `names` into finished, unpublished temporaries; the
        writers are aborted by `cleanup` unless the caller publishes them."""
        plan = self.prepared.plan
        assessment = self.assessment
        cache_use = None
        if self.cache is not None and self.cache.tensors:
            # Intermediates are stored as objects (unless `cache: false`); outputs
            # are cached whole, as packs.
            nodes = self.prepared.recipe.nodes
            stored = frozenset(
                node
                for node in plan.graph.order
                if plan.graph.dag.out_degree(node) > 0 and nodes[node].cache
            )
            cache_use = CacheUse(self.cache, assessment.identities, assessment.found, stored)
        writers: dict[str, OutputWriter] = {}
        for name in names:
            output_plan = plan.outputs[name]
            output = output_plan.output
            writer = open_writer(
                output.path,
                output.format,
                output_plan.tensors,
                assessment.metadata[name],
                self.prepared.architectures[plan.graph.base_input(output.node)],
                tokenizer_folders(self.prepared, name),
            )
            cleanup.callback(writer.abort)
            writers[name] = writer
        total = sum(sum(i.nbytes for i in plan.outputs[n].tensors.values()) for n in names)
        advance = self.progress("merging", total)
        self._digests.update({name: {} for name in names})

        def record(result: KeyResult) -> None:
            advance(result.written)
            self._not_from_cache.update(result.not_from_cache)
            self.stats.tensors_from_cache += result.hits
            self.stats.tensors_computed += result.computed
            for output, digest in result.output_digests.items():
                self._digests[output][result.key] = digest
            if self.cache is None:
                return
            # Forget corrupt entries first: a recomputed tensor may be stored
            # again under the same name.
            for corrupt in result.corrupt:
                self.warnings.append(f"{corrupt}; recomputed")
                self.stats.corrupt_entries += 1
                self.cache.forget(corrupt.location)
            if result.new_objects:
                self.cache.add_objects(result.new_objects)
            if result.used:
                self.cache.touch(result.used)

        Executor(plan, self.prepared.readers, writers, self.threads, cache_use).run(record)
        for writer in writers.values():
            writer.finish()
        return writers

    def _cache_output(self, name: str, digests: dict[str, str]) -> None:
        """Link the new output into the cache as a pack, with refs to its tensors."""
        output = self.prepared.recipe.outputs[name].path
        sha256 = self.sha256[name] = file_sha256(output, self.cache)
        if self.cache is None or not self.cache.tensors or output.is_dir():
            return  # folders are not kept as packs
        self.cache.add_pack(output, sha256, self.assessment.output_ids[name])
        identities = self.assessment.identities.outputs[name]
        self.cache.add_refs(
            (identities[key], Location(PACK, sha256, key, digest))
            for key, digest in digests.items()
        )

    def _write_lock(self) -> None:
        prepared = self.prepared
        recipe = prepared.recipe
        assessment = self.assessment
        graph = prepared.graph
        previous = assessment.lock
        inputs = {
            k: v for k, v in (previous.inputs if previous else {}).items() if k in recipe.inputs
        }
        nodes = {k: v for k, v in (previous.nodes if previous else {}).items() if k in recipe.nodes}
        outputs = {
            k: v for k, v in (previous.outputs if previous else {}).items() if k in recipe.outputs
        }
        for name, fingerprint in assessment.fingerprints.items():
            path = recipe.inputs[name].path
            inputs[name] = LockedInput(
                relative_to_recipe(path, recipe.path), FileStat.of(path).size, fingerprint.sha256
            )
        for node in graph.order:
            nodes[node] = LockedNode(
                recipe.nodes[node].signature, assessment.identities.node_id(node)
            )
        for name in prepared.plan.outputs:
            path = recipe.outputs[name].path
            leaves = graph.output_inputs(name)
            outputs[name] = LockedOutput(
                path=relative_to_recipe(path, recipe.path),
                size=FileStat.of(path).size,
                sha256=self.sha256[name],
                key=assessment.output_ids[name],
                built_from=built_from(
                    recipe.text, {leaf: assessment.fingerprints[leaf].sha256 for leaf in leaves}
                ),
            )
        write_lock(
            recipe.path,
            Lock(
                recipe_sha256=recipe_sha256(recipe.text),
                versions=tool_versions(),
                inputs=_in_recipe_order(inputs, recipe.inputs),
                nodes=_in_recipe_order(nodes, recipe.nodes),
                outputs=_in_recipe_order(outputs, recipe.outputs),
            ),
        )

    def _summarise(self, name: str) -> OutputSummary:
        output_plan = self.prepared.plan.outputs[name]
        counts: Counter[str] = output_plan.counts()
        merged = counts.pop(MERGED, 0)
        state = self.states[name]
        if state == "built":
            status = REBUILD if name in self._not_from_cache else FROM_CACHE
        else:
            status = UP_TO_DATE if state == "up to date" else FROM_CACHE
        return OutputSummary(
            name=name,
            path=output_plan.output.path,
            state=state,
            status=status,
            size=FileStat.of(output_plan.output.path).size,
            merged=merged,
            passed_through=dict(sorted(counts.items())),
            dropped=output_plan.dropped,
        )


def _in_recipe_order(table: dict, names: Iterable[str]) -> dict:
    """`table`'s entries in the recipe's order, dropping names the recipe no longer has."""
    return {name: table[name] for name in names if name in table}
