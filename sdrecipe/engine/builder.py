"""The build: restore what the cache holds, stream the rest into the outputs,
publish them together, then cache them and write the lock.

The pipeline is `recipe → graph → plan → execute → write`: `sdrecipe.plan.prepare`
checks everything that needs no tensor data, `sdrecipe.plan.assess` works out
identities and statuses, this module executes and publishes, reporting
events as it goes, and `sdrecipe.engine.verify` rebuilds from scratch to
compare with the lock.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdrecipe.cache.store import DIGEST, PACK, Cache, Location, output_digest
from sdrecipe.engine import events
from sdrecipe.engine.devices import Placement, device_class
from sdrecipe.engine.events import BUILT, KEPT, RESTORED, CacheCounts, Listener
from sdrecipe.engine.executor import CacheUse, Executor, KeyResult
from sdrecipe.io.atomic import publish, remove_stale_temporaries, staged_copy, uninterrupted
from sdrecipe.io.fingerprint import FileStat, tensor_digest
from sdrecipe.io.output_formats import WriteJob, open_writer, output_format
from sdrecipe.io.page_cache import memory_is_short
from sdrecipe.io.shard_files import index_path
from sdrecipe.io.shard_layout import shards_apply, written_path
from sdrecipe.io.sharded_writer import remove_superseded
from sdrecipe.io.writers import OutputWriter
from sdrecipe.plan.assess import Assessment, assess
from sdrecipe.plan.cache_policy import cache_choice
from sdrecipe.plan.graph import output_device
from sdrecipe.plan.prepare import Prepared, tokenizer_folders
from sdrecipe.plan.status import Status
from sdrecipe.plan.tensor_plan import MERGED
from sdrecipe.recipe.lock import BuiltOutput, read_lock, updated_lock, write_lock

if TYPE_CHECKING:
    from sdrecipe.cache.remote import RemoteCache, Transfer


@dataclass(frozen=True)
class OutputSummary:
    """What one output file holds, how its keys came to be, and what the build
    did: `result` (built, restored from cache, up to date) and `status`, what it
    needed (up to date, from cache: no tensor computed, rebuild)."""

    name: str
    path: Path
    result: str
    status: Status
    size: int
    digest: str
    merged: int
    passed_through: dict[str, int]
    dropped: int


@dataclass(frozen=True)
class BuildSummary:
    """The result of a build."""

    outputs: tuple[OutputSummary, ...]
    seconds: float
    cache: CacheCounts
    warnings: tuple[str, ...] = field(default=())


def default_threads() -> int:
    """Worker threads: one per available core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def update_outputs(
    prepared: Prepared,
    threads: int,
    cache: Cache | None = None,
    force: bool = False,
    update_lock: bool = True,
    remote: RemoteCache | None = None,
    on_event: Listener = events.ignore,
    placement: Placement | None = None,
) -> BuildSummary:
    """Bring every selected output up to date; on failure no output is touched.

    With a `remote` cache tier, what the local cache lacks is pulled from it
    first, and what the build stored is pushed to it after; the remote's corrupt
    entries count with the local ones, and a remote that fails (e.g. cannot be
    reached) is reported and the build goes on with the local cache alone.
    With a `placement`, the arithmetic runs on its device (see
    `sdrecipe.engine.devices`). Each step is reported to `on_event` (see
    `sdrecipe.engine.events`)."""
    started = time.perf_counter()
    recipe = str(prepared.recipe.path)
    progress = events.as_progress(on_event, recipe)
    lock = read_lock(prepared.recipe.path)
    with cache.locked() if cache else nullcontext():
        if cache is not None and cache.tensors:
            cache.remove_stale_temporaries()  # of a killed build or pull
        on = device_class(placement)
        assessment = assess(prepared, cache, threads, force, progress, lock, on)
        shared = remote is not None and cache is not None and cache.tensors
        pulled = None
        if shared and not force:
            pulled = _exchange(remote, "pull", cache, assessment, on_event, recipe)
            if pulled is not None and (pulled.outputs or pulled.refs):
                assessment = assess(prepared, cache, threads, force, progress, lock, on)
        for status in assessment.statuses:
            on_event(events.NodePlanned(recipe, status.node, status.status, status.reason))
        builder = _Builder(prepared, assessment, cache, threads, on_event, placement)
        if pulled:
            builder.stats.corrupt_entries += len(pulled.corrupt)
            builder.stats.remote_pulled += pulled.outputs + pulled.objects
        summary = builder.run(started, update_lock)
        if shared:
            pushed = _exchange(remote, "push", cache, assessment, on_event, recipe)
            summary.cache.corrupt_entries += len(pushed.corrupt) if pushed else 0
        return summary


def _exchange(
    remote: RemoteCache,
    direction: str,
    cache: Cache,
    assessment: Assessment,
    on_event: Listener,
    recipe: str,
) -> Transfer | None:
    """`pull` or `push` the assessment's tensors and outputs; None if the remote failed.

    Any exception counts as a failed remote: fsspec backends raise their own
    kinds (botocore's, aiohttp's), and a remote tier must never fail a build."""
    try:
        move = remote.pull if direction == "pull" else remote.push
        moved = move(cache, assessment.identities.every(), list(assessment.output_ids.values()))
    except Exception as exc:
        remote.notify(
            f"the remote cache {remote.url} failed ({type(exc).__name__}: {exc}); "
            "going on with the local cache alone"
        )
        return None
    on_event(
        events.RemoteTransfer(
            recipe, direction, remote.url, moved.outputs, moved.objects, moved.refs, moved.bytes
        )
    )
    verb = "pulled from" if direction == "pull" else "pushed to"
    if moved.outputs or moved.objects or moved.refs:
        remote.notify(
            f"{verb} {remote.url}: {moved.outputs} outputs, {moved.objects} tensors "
            f"({moved.bytes / 1e6:,.1f} MB)"
        )
    return moved


class _Builder:
    def __init__(
        self,
        prepared: Prepared,
        assessment: Assessment,
        cache: Cache | None,
        threads: int,
        on_event: Listener,
        placement: Placement | None,
    ):
        self.prepared = prepared
        self.placement = placement
        self.assessment = assessment
        self.cache = cache
        self.threads = threads
        self.recipe = str(prepared.recipe.path)
        self.on_event = on_event
        self.progress = events.as_progress(on_event, self.recipe)
        self.stats = CacheCounts()
        self.warnings: list[str] = []
        for warning in prepared.plan.warnings:
            self._warn(warning)
        self.results: dict[str, str] = {}
        self.digests: dict[str, str] = {}  # each output's content digest
        self._tensor_digests: dict[str, dict[str, str]] = {}
        self._not_from_cache: set[str] = set()
        self._discarded_packs: set[str] = set()

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
        planned = {s.output: s for s in self.assessment.statuses if s.output is not None}
        with ExitStack() as cleanup:
            for name in plan.outputs:
                status = planned[name]
                path = str(written_path(plan.outputs[name].output))
                self.on_event(
                    events.OutputStarted(self.recipe, name, path, status.status, status.reason)
                )
                if status.status == Status.UP_TO_DATE:
                    self.results[name] = KEPT
                    self.digests[name] = self.assessment.lock.outputs[name].digest  # type: ignore[union-attr]
                    self.stats.outputs_up_to_date += 1
                    continue
                facts = self.assessment.facts[name]
                restore = status.status == Status.FROM_CACHE and facts.pack_available
                staged = self._stage_restore(name) if restore else None
                if staged is None:
                    built.append(name)
                else:
                    cleanup.callback(staged.unlink, missing_ok=True)
                    restored[name] = staged
            writers = self._build(built, cleanup) if built else {}
            # From the first rename to the lock, a Ctrl-C or SIGTERM waits: the
            # outputs and their lock are all published, or none.
            with uninterrupted():
                for name, staged in restored.items():
                    self._publish_restored(name, staged)
                for writer in writers.values():
                    writer.publish()
                cleanup.pop_all()
                for name in built:
                    self.results[name] = BUILT
                    self._cache_output(name, writers[name])
                if update_lock:
                    self._write_lock()
        # Events go out once everything is published: a listener that fails
        # cannot stop the outputs and their lock half way.
        for name in restored:
            self.on_event(events.CacheHit(self.recipe, "output", name))
        if self.cache is not None:
            self.cache.record_stats(vars(self.stats))
        summaries = tuple(self._summarise(name) for name in plan.outputs)
        for output in summaries:
            self.on_event(
                events.OutputFinished(
                    self.recipe,
                    output.name,
                    str(output.path),
                    output.result,
                    output.size,
                    output.digest,
                    output.merged,
                    output.passed_through,
                    output.dropped,
                )
            )
        return BuildSummary(
            outputs=summaries,
            seconds=time.perf_counter() - started,
            cache=self.stats,
            warnings=tuple(self.warnings),
        )

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.on_event(events.BuildWarning(self.recipe, message))

    def _stage_restore(self, name: str) -> Path | None:
        """Link a verified cached copy of the output beside it, under a temporary name."""
        assert self.cache is not None
        pack = self.cache.find_pack(self.assessment.output_ids[name])
        if pack is None:
            return None
        digest = pack.name.removesuffix(".safetensors")
        if output_digest(pack, None) != digest:
            self._warn(f"cache entry {pack} is corrupt; discarded and rebuilt")
            self.on_event(events.CacheCorrupt(self.recipe, f"output pack {pack}"))
            self.stats.corrupt_entries += 1
            self.cache.discard(Location(PACK, digest, "", ""))
            self._discarded_packs.add(digest)
            return None
        output = self.prepared.recipe.outputs[name].path
        output.parent.mkdir(parents=True, exist_ok=True)
        self.digests[name] = digest
        return staged_copy(pack, output)

    def _publish_restored(self, name: str, staged: Path) -> None:
        assert self.cache is not None
        spec = self.prepared.recipe.outputs[name]
        output = spec.path
        publish(staged, output)
        if shards_apply(spec):  # one shard: the index of an earlier, sharded build goes
            remove_superseded(index_path(output))
        self.cache.remember(DIGEST, output, FileStat.of(output), self.digests[name])
        self.results[name] = RESTORED
        self.stats.outputs_restored += 1

    def _build(self, names: list[str], cleanup: ExitStack) -> dict[str, OutputWriter]:
        """Compute and write `names` into finished, unpublished temporaries; the
        writers are aborted by `cleanup` unless the caller publishes them."""
        plan = self.prepared.plan
        assessment = self.assessment
        cache_use = None
        if self.cache is not None and self.cache.tensors:
            # Intermediates are stored as objects when the cost rule says so;
            # outputs are cached whole, as packs.
            stored = frozenset(
                node for node in plan.graph.order if cache_choice(plan.graph, node).store
            )
            # Tensors in a pack found corrupt above are gone with it: one warning is enough.
            found = {
                identity: location
                for identity, location in assessment.found.items()
                if location.entry not in self._discarded_packs
            }
            cache_use = CacheUse(self.cache, assessment.identities, found, stored)
        total = sum(sum(i.nbytes for i in plan.outputs[n].tensors.values()) for n in names)
        inputs = self.prepared.recipe.inputs
        read = sum(FileStat.of(inputs[name].path).size for name in self.prepared.readers)
        # When the inputs and outputs do not fit in memory together, the outputs
        # leave the page cache as they are written, so the inputs stay cached.
        drop_written = memory_is_short(read + total)
        writers: dict[str, OutputWriter] = {}
        for name in names:
            output_plan = plan.outputs[name]
            output = output_plan.output
            job = WriteJob(
                output,
                output_plan.tensors,
                assessment.metadata[name],
                self.prepared.architectures[plan.graph.base_input(output.node)],
                tokenizer_folders(self.prepared, name),
                drop_written,
                output_plan.encodings,
                self._extraction_device(),
            )
            writer = open_writer(job)
            cleanup.callback(writer.abort)
            writers[name] = writer
        advance = self.progress("merging", total)
        self._tensor_digests.update({name: {} for name in names})

        def record(result: KeyResult) -> None:
            advance(result.written)
            self._not_from_cache.update(result.not_from_cache)
            self.stats.tensors_from_cache += result.hits
            self.stats.tensors_computed += result.computed
            self.stats.bytes_read += result.read
            self.stats.bytes_written += result.written
            if result.hits:
                self.on_event(events.CacheHit(self.recipe, "tensor", result.key))
            if result.computed:
                self.on_event(events.CacheMiss(self.recipe, "tensor", result.key))
            for output, digest in result.output_digests.items():
                self._tensor_digests[output][result.key] = digest
            for output, digests in result.companion_digests.items():
                self._tensor_digests[output].update(digests)
            if self.cache is None:
                return
            # Forget corrupt entries first: a recomputed tensor may be stored
            # again under the same name.
            for corrupt in result.corrupt:
                self._warn(f"{corrupt}; recomputed")
                self.on_event(events.CacheCorrupt(self.recipe, str(corrupt)))
                self.stats.corrupt_entries += 1
                self.cache.forget(corrupt.location)
            if result.new_objects:
                self.cache.add_objects(result.new_objects)
            if result.used:
                self.cache.touch(result.used)

        for name, writer in writers.items():
            for key, tensor in plan.outputs[name].constants.items():
                data = tensor.reshape(-1).view(torch.uint8).numpy().data
                writer.write(key, data)
                self._tensor_digests[name][key] = tensor_digest(writer.info(key), [data])
        executor = Executor(
            plan, self.prepared.readers, writers, self.threads, cache_use, self.placement
        )
        executor.run(record)
        for writer in writers.values():
            writer.finish()
        return writers

    def _extraction_device(self) -> torch.device | None:
        """Where LoRA outputs' factors are extracted: the build's device, but
        the CPU on MPS (whose torch.linalg lacks the SVD)."""
        placement = self.placement
        return None if placement is None or placement.device.type == "mps" else placement.device

    def _cache_output(self, name: str, writer: OutputWriter) -> None:
        """Take the new output's content digest (from its tensors' digests when
        the writer can) and link the output into the cache as a pack, with refs
        to its computed tensors."""
        spec = self.prepared.recipe.outputs[name]
        output = written_path(spec)  # the index, for an output written as shards
        digests = self._tensor_digests[name]
        digest = writer.content_digest(digests)
        if digest is None:
            digest = output_digest(output, self.cache)
        elif self.cache is not None:
            self.cache.remember(DIGEST, output, FileStat.of(output), digest)
        self.digests[name] = digest
        if self.cache is None or not self.cache.tensors or output.is_dir() or output != spec.path:
            return  # folders and shards are not kept as packs
        if not output_format(spec.format).packable:
            return  # nor GGUF files: the cache reads tensors back as safetensors
        self.cache.add_pack(output, digest, self.assessment.output_ids[name])
        if self.prepared.recipe.outputs[name].lora is not None:
            return  # a LoRA's tensors are factors, not the node's values
        identities = self.assessment.identities.outputs[name]
        encoded = self.prepared.plan.outputs[name].encodings
        self.cache.add_refs(
            (identities[key], Location(PACK, digest, key, tensor))
            for key, tensor in digests.items()
            # copied from an input: no ref needed; an encoded one needs what goes with it
            if key in identities and key not in encoded
        )

    def _write_lock(self) -> None:
        graph = self.prepared.graph
        assessment = self.assessment
        lock = updated_lock(
            assessment.lock,
            self.prepared.recipe,
            {name: fingerprint.sha256 for name, fingerprint in assessment.fingerprints.items()},
            {node: assessment.identities.node_id(node) for node in graph.order},
            {
                name: BuiltOutput(
                    self.digests[name], assessment.output_ids[name], graph.output_inputs(name)
                )
                for name in self.prepared.plan.outputs
            },
            assessment.quantization,
            {
                name: output_device(graph, name, device_class(self.placement))
                for name in self.prepared.plan.outputs
            },
        )
        write_lock(self.prepared.recipe.path, lock)

    def _summarise(self, name: str) -> OutputSummary:
        output_plan = self.prepared.plan.outputs[name]
        counts: Counter[str] = output_plan.counts()
        merged = counts.pop(MERGED, 0)
        result = self.results[name]
        if result == BUILT:
            status = Status.REBUILD if name in self._not_from_cache else Status.FROM_CACHE
        else:
            status = Status.UP_TO_DATE if result == KEPT else Status.FROM_CACHE
        path = written_path(output_plan.output)
        return OutputSummary(
            name=name,
            path=path,
            result=result,
            status=status,
            size=FileStat.of(path).size,
            digest=self.digests[name],
            merged=merged,
            passed_through=dict(sorted(counts.items())),
            dropped=output_plan.dropped,
        )
