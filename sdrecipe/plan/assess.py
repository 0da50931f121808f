"""What a build would do: each input's fingerprint, every tensor's identity,
and, against the lock file and the cache, each node's status (`plan`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sdrecipe.cache.store import Cache, Location, output_digest
from sdrecipe.errors import RecipeError
from sdrecipe.io.fingerprint import FileStat, Fingerprint, sha256_of
from sdrecipe.io.model_reader import RenamedReader, file_reader
from sdrecipe.io.output_formats import output_format
from sdrecipe.io.quantized import quantization_of
from sdrecipe.io.readers import tensor_digests
from sdrecipe.io.shard_layout import written_path
from sdrecipe.methods.registry import CPU
from sdrecipe.plan.identity import Identities, tensor_identities
from sdrecipe.plan.prepare import Prepared, tokenizer_folders
from sdrecipe.plan.provenance import output_metadata
from sdrecipe.plan.staleness import node_statuses
from sdrecipe.plan.status import NodeStatus, OutputFacts
from sdrecipe.recipe.lock import Lock
from sdrecipe.recipe.model import LORA_EXTRACTION

Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(label: str, total: int) -> Callable[[int], None]:
    """A progress reporter that shows nothing."""
    return lambda done: None


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
    # Each input's quantized storage, in words (None: none).
    quantization: dict[str, str | None]


def _written_as(prepared: Prepared, output: str) -> dict[str, str]:
    """What decides an output's bytes besides its tensors and metadata: the
    format, the shard size, and for a diffusers folder the tokenizer files it copies."""
    spec = prepared.recipe.outputs[output]
    if spec.lora is not None:
        naming = {} if spec.lora.naming == "kohya" else {"naming": spec.lora.naming}
        lora = {"format": spec.format, "lora": repr(spec.lora), **naming}
        return {**lora, "extraction": LORA_EXTRACTION}
    shards = {} if spec.max_shard_size is None else {"max_shard_size": str(spec.max_shard_size)}
    if spec.scaled:
        shards["scaled"] = "true"
    if spec.quant is not None:
        shards["quant"] = spec.quant
    if not output_format(spec.format).copies_tokenizers:
        return {"format": spec.format, **shards}
    tokenizers = tokenizer_folders(prepared, output)
    return {"format": spec.format, **shards, **{n: sha256_of(f) for n, f in tokenizers.items()}}


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
        reader = prepared.readers[name]
        if found is not None and isinstance(reader, RenamedReader):
            # Earlier versions remembered a renamed view's names: read the file again.
            found = found if set(found.tensors) == set(reader.inner.keys()) else None
        if found is None:
            missing.append(name)
        else:
            known[name] = found
    if missing:
        advance = progress("hashing", sum(stats[name].size for name in missing))

        def take(name: str) -> Fingerprint:
            result = file_reader(prepared.readers[name]).fingerprint()
            advance(stats[name].size)
            return result

        with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
            for name, result in zip(missing, pool.map(take, missing), strict=True):
                known[name] = result
                if cache is not None:
                    cache.remember_fingerprint(recipe.inputs[name].path, stats[name], result)
    # What is remembered is the file's own; a renamed view names its tensors anew.
    for name, reader in prepared.readers.items():
        if isinstance(reader, RenamedReader):
            known[name] = reader.renamed(known[name])
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
    lock: Lock | None = None,
    device_class: str = CPU,
) -> Assessment:
    """Fingerprint the inputs and decide, against `lock` (the recipe's lock file)
    and the cache, what each node needs, for a build on `device_class`."""
    plan = prepared.plan
    fingerprints = fingerprint_inputs(prepared, cache, threads, progress)
    digests = {n: tensor_digests(prepared.readers[n], f) for n, f in fingerprints.items()}
    identities = tensor_identities(plan, digests, device_class)
    quantization = {name: quantization_of(reader) for name, reader in prepared.readers.items()}
    metadata = {
        name: output_metadata(
            prepared.graph,
            name,
            output_plan.tensors,
            fingerprints,
            {n: r.metadata for n, r in prepared.readers.items()},
            prepared.architectures[prepared.graph.base_input(output_plan.output.node)],
            quantization,
        )
        for name, output_plan in plan.outputs.items()
    }
    output_ids = {
        name: identities.output_id(name, metadata[name], _written_as(prepared, name))
        for name in plan.outputs
    }
    # --force recomputes everything: cached tensors are written, never read.
    found = cache.lookup(identities.every()) if cache and cache.tensors and not force else {}
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
    return Assessment(
        fingerprints, identities, metadata, output_ids, lock, found, facts, statuses, quantization
    )


def _output_facts(
    prepared: Prepared,
    name: str,
    output_id: str,
    lock: Lock | None,
    cache: Cache | None,
    force: bool,
) -> OutputFacts:
    path = written_path(prepared.recipe.outputs[name])
    exists = path.exists()
    locked = lock.outputs.get(name) if lock else None
    current = (
        not force
        and exists
        and locked is not None
        and locked.identity == output_id
        and output_digest(path, cache) == locked.digest
    )
    pack = (
        not force and cache is not None and cache.tensors and cache.find_pack(output_id) is not None
    )
    return OutputFacts(exists=exists, current=current, pack_available=pack)
