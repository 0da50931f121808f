"""The lock file `<recipe>.lock`: what the last successful build used and made.

It is YAML in a stable order, meant to be committed beside the recipe: each
input's size and sha256, each node's expression and identity, each output's
size, content digest (`fingerprint.content_digest`) and identity, and the
versions that built them. `sdrecipe verify` rebuilds the outputs and compares them with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from sdrecipe import OUTPUT_FORMAT, __version__
from sdrecipe.errors import BuildError, RecipeError, describe_os_error
from sdrecipe.io.atomic import write_text_atomically
from sdrecipe.io.fingerprint import FileStat
from sdrecipe.io.shard_layout import written_path
from sdrecipe.io.text_files import read_text_file
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.yaml_source import load_yaml

LOCK_FORMAT = 3
# A lock holds a few lines per input, node and output: 1,000 variants stay far below this.
MAX_LOCK_BYTES = 64 << 20
# Format 1 recorded each output's sha256 instead of its content digest; formats
# 1 and 2 called the identities `key`.
_SHA256_LOCK_FORMAT = 1
_KEY_LOCK_FORMATS = (1, 2)
_HEADER = (
    "# sdrecipe lock file: what the last successful build used and produced.\n"
    "# Commit it with the recipe; `sdrecipe verify` checks that the outputs reproduce.\n"
)


@dataclass(frozen=True)
class LockedInput:
    """An input as it was when the outputs were built; `quantization` says how
    a quantized input stores its tensors (see `sdrecipe.io.quantized`)."""

    path: str
    size: int
    sha256: str
    quantization: str | None = None


@dataclass(frozen=True)
class LockedNode:
    """A node's expression and the identity of all its tensors."""

    expression: str
    identity: str


@dataclass(frozen=True)
class LockedOutput:
    """An output file as built: `built_from` hashes what it depends on (see `built_from`)."""

    path: str
    size: int
    digest: str
    identity: str
    built_from: str
    # The device class its bytes follow (`cpu`, `cuda`, `mps`) when a method it
    # needs gives bytes of its own on each; None when they are the same on all.
    device: str | None = None


@dataclass(frozen=True)
class Lock:
    """The whole lock file."""

    recipe_sha256: str
    versions: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, LockedInput] = field(default_factory=dict)
    nodes: dict[str, LockedNode] = field(default_factory=dict)
    outputs: dict[str, LockedOutput] = field(default_factory=dict)


def lock_path(recipe: Path) -> Path:
    """`recipes/x.yaml` → `recipes/x.lock`."""
    return recipe.with_suffix(".lock")


def recipe_sha256(text: str) -> str:
    """The hash of a recipe's text."""
    return hashlib.sha256(text.encode()).hexdigest()


def built_from(recipe: Recipe, input_sha256: dict[str, str]) -> str:
    """What an output's bytes depend on: the recipe's meaning, inputs' contents,
    sdrecipe's version and output format."""
    parts = [recipe.meaning, __version__, OUTPUT_FORMAT, sorted(input_sha256.items())]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    """The versions of sdrecipe and of the libraries it reads and writes tensors with,
    recorded for reference (read without importing torch)."""
    versions = {"sdrecipe": __version__}
    for package in ("torch", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def relative_to_recipe(path: Path, recipe: Path) -> str:
    """`path` as written relative to the recipe's folder."""
    return os.path.relpath(path, recipe.parent)


def read_lock(recipe: Path) -> Lock | None:
    """The recipe's lock, or None if there is none; a malformed lock is an error."""
    path = lock_path(recipe)
    try:
        text = read_text_file(path, "the lock file", MAX_LOCK_BYTES)
    except FileNotFoundError:
        return None
    try:
        # Parsed as recipes are, with their bounds on size, depth and aliases.
        data = load_yaml(text, path).data
    except RecipeError as exc:
        raise RecipeError(f"cannot read the lock file: {exc.message}", path, exc.line) from None
    try:
        lock_format = data.get("format")
        if lock_format not in (LOCK_FORMAT, *_KEY_LOCK_FORMATS):
            raise ValueError(f"unknown lock format {lock_format!r}")
        nodes = {k: dict(v) for k, v in (data.get("nodes") or {}).items()}
        outputs = {k: dict(v) for k, v in (data.get("outputs") or {}).items()}
        if lock_format in _KEY_LOCK_FORMATS:
            for entry in (*nodes.values(), *outputs.values()):
                entry["identity"] = entry.pop("key")
        if lock_format == _SHA256_LOCK_FORMAT:
            # A sha256 is no content digest: these outputs are built afresh once.
            for entry in outputs.values():
                del entry["sha256"]
                entry["digest"] = ""
        return _checked(
            Lock(
                recipe_sha256=data["recipe_sha256"],
                versions=dict(data.get("versions") or {}),
                inputs={k: LockedInput(**v) for k, v in (data.get("inputs") or {}).items()},
                nodes={k: LockedNode(**v) for k, v in nodes.items()},
                outputs={k: LockedOutput(**v) for k, v in outputs.items()},
            )
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RecipeError(
            f"the lock file is malformed ({exc}); delete it and build again", path
        ) from None


_HASH = re.compile(r"[0-9a-f]{64}")


def _checked(lock: Lock) -> Lock:
    """`lock` if every field holds what sdrecipe writes there (hashes: 64 hex
    digits; sizes: numbers), else ValueError naming the first that does not."""

    def require(ok: bool, where: str) -> None:
        if not ok:
            raise ValueError(f"{where} is not what sdrecipe writes there")

    def is_hash(value: object) -> bool:
        return isinstance(value, str) and _HASH.fullmatch(value) is not None

    def is_size(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    require(is_hash(lock.recipe_sha256), "recipe_sha256")
    for name, found in lock.inputs.items():
        require(isinstance(found.path, str) and is_size(found.size), f"input {name!r}")
        require(is_hash(found.sha256), f"input {name!r}'s sha256")
        require(
            found.quantization is None or isinstance(found.quantization, str), f"input {name!r}"
        )
    for name, node in lock.nodes.items():
        require(isinstance(node.expression, str), f"node {name!r}'s expression")
        require(is_hash(node.identity), f"node {name!r}'s identity")
    for name, output in lock.outputs.items():
        require(isinstance(output.path, str) and is_size(output.size), f"output {name!r}")
        # Format 1 recorded no content digest: "" rebuilds the output once.
        require(output.digest == "" or is_hash(output.digest), f"output {name!r}'s digest")
        require(is_hash(output.identity), f"output {name!r}'s identity")
        require(is_hash(output.built_from), f"output {name!r}'s built_from")
        require(output.device in (None, "cpu", "cuda", "mps"), f"output {name!r}'s device")
    return lock


def write_lock(recipe: Path, lock: Lock) -> Path:
    """Write the lock atomically beside the recipe."""
    path = lock_path(recipe)
    data = {"format": LOCK_FORMAT, **asdict(lock)}
    for entry in data["inputs"].values():
        if entry["quantization"] is None:
            del entry["quantization"]
    for entry in data["outputs"].values():
        if entry["device"] is None:
            del entry["device"]
    text = _HEADER + yaml.safe_dump(data, sort_keys=False, width=1000)
    try:
        write_text_atomically(path, text)
    except OSError as exc:
        raise BuildError(
            f"the outputs were built, but the lock file cannot be written: "
            f"{describe_os_error(exc)}",
            path,
        ) from None
    return path


@dataclass(frozen=True)
class BuiltOutput:
    """An output as a build left it: its content digest, its id and the inputs it is made from."""

    digest: str
    output_id: str
    inputs: list[str]


def updated_lock(
    previous: Lock | None,
    recipe: Recipe,
    input_sha256: Mapping[str, str],
    node_ids: Mapping[str, str],
    built: Mapping[str, BuiltOutput],
    quantization: Mapping[str, str | None] | None = None,
    devices: Mapping[str, str | None] | None = None,
) -> Lock:
    """The lock after a build of some of `recipe`'s outputs: what the build used
    and made replaces the previous entries; entries of names the recipe no
    longer has are dropped; everything is in the recipe's order."""
    inputs = dict(previous.inputs) if previous else {}
    nodes = dict(previous.nodes) if previous else {}
    outputs = dict(previous.outputs) if previous else {}
    for name, sha256 in input_sha256.items():
        spec = recipe.inputs[name]
        where = spec.url or relative_to_recipe(spec.path, recipe.path)
        inputs[name] = LockedInput(
            where, FileStat.of(spec.path).size, sha256, (quantization or {}).get(name)
        )
    for node, node_id in node_ids.items():
        nodes[node] = LockedNode(recipe.nodes[node].signature, node_id)
    for name, output in built.items():
        path = written_path(recipe.outputs[name])  # the index, for an output written as shards
        outputs[name] = LockedOutput(
            path=relative_to_recipe(path, recipe.path),
            size=FileStat.of(path).size,
            digest=output.digest,
            identity=output.output_id,
            built_from=built_from(recipe, {leaf: input_sha256[leaf] for leaf in output.inputs}),
            device=(devices or {}).get(name),
        )
    return Lock(
        recipe_sha256=recipe_sha256(recipe.text),
        versions=tool_versions(),
        inputs=_in_recipe_order(inputs, recipe.inputs),
        nodes=_in_recipe_order(nodes, recipe.nodes),
        outputs=_in_recipe_order(outputs, recipe.outputs),
    )


def _in_recipe_order(table: dict, names: Iterable[str]) -> dict:
    """`table`'s entries in the recipe's order, dropping names the recipe no longer has."""
    return {name: table[name] for name in names if name in table}
