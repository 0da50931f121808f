"""Inputs named by URL (`s3://bucket/models/base.safetensors`, any fsspec URL).

Loading a recipe reads only a remote file's header, with ranged reads. Before a
build, each remote input is streamed once into a local content-addressed store
(`<cache>/inputs/<sha256>.safetensors`), hashed on the way and checked against
the recipe's `sha256` pin when it has one, then memory-mapped like a local
file. The store remembers which URL and version (ETag, version id, else size
and modification time) gave which file, so the same URL at the same version is
never downloaded twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sdrecipe.errors import RecipeError
from sdrecipe.io.adapter_files import has_adapter_header
from sdrecipe.io.atomic import publish, temporary_path, write_text_atomically
from sdrecipe.io.bounded_json import load_json

if TYPE_CHECKING:
    from sdrecipe.recipe import Recipe

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 8 << 20
SOURCES = "sources.json"


def is_url(text: str) -> bool:
    """True for `scheme://...` other than `file://`, in any case (a local path by
    another name)."""
    return bool(_SCHEME.match(text)) and text[:7].lower() != "file://"


def remote_placeholder(url: str) -> Path:
    """The `path` a remote input has until it is fetched: a name no file has."""
    return Path("/nonexistent-remote-input") / hashlib.sha256(url.encode()).hexdigest()


def _open(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def is_adapter_url(url: str) -> bool:
    """Whether the remote safetensors file is an adapter, from its header alone."""
    if PurePosixPath(url).suffix.lower() != ".safetensors":
        return False
    fs, path = _open(url)
    with fs.open(path, "rb", block_size=1 << 20) as handle:
        return has_adapter_header(handle)


def _version(info: dict) -> str:
    """What changes when the remote file does: its ETag or version, else size and time."""
    for field in ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash"):
        if info.get(field):
            return f"{field}={info[field]}"
    return f"size={info.get('size')},mtime={info.get('mtime') or info.get('LastModified')}"


def fetch(url: str, store: Path, pin: str | None) -> Path:
    """The local copy of `url` in `store`: the one already there for this URL
    and version, else a new download, verified against `pin`."""
    fs, path = _open(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise RecipeError(f"{url} does not exist") from None
    if info.get("type") != "file" or url.endswith("/"):
        raise RecipeError(f"{url} is a folder (a prefix), not a model file")
    if info.get("size") == 0:
        raise RecipeError(f"{url} is empty, not a model file")
    source = f"{url} {_version(info)}"
    sources_file = store / SOURCES
    sources = _sources(sources_file)
    suffix = PurePosixPath(url).suffix.lower()
    known = sources.get(source)
    if known and (store / f"{known}{suffix}").exists() and (pin is None or pin == known):
        return store / f"{known}{suffix}"
    store.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(store / f"download{suffix}", unique=True)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb", block_size=CHUNK) as remote, open(temporary, "wb") as local:
            while chunk := remote.read(CHUNK):
                digest.update(chunk)
                local.write(chunk)
        sha256 = digest.hexdigest()
        if pin is not None and pin != sha256:
            raise RecipeError(f"{url} has sha256 {sha256}, and the recipe pins {pin}")
        target = store / f"{sha256}{suffix}"
        publish(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    sources[source] = sha256
    write_text_atomically(sources_file, json.dumps(sources, indent=1, sort_keys=True))
    return target


def _sources(sources_file: Path) -> dict[str, str]:
    """Which URL and version gave which stored file (by sha256). The file is the
    cache's, and untrusted like it: an entry that is not a sha256 is forgotten,
    so nothing outside the store is ever named; a damaged file is forgotten whole."""
    try:
        sources = load_json(sources_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(sources, dict):
        return {}
    return {
        source: sha256
        for source, sha256 in sources.items()
        if isinstance(sha256, str) and _SHA256.fullmatch(sha256)
    }


def fetch_inputs(recipe: Recipe, store: Path) -> Recipe:
    """`recipe` with every remote input's `path` set to its local copy."""
    inputs = dict(recipe.inputs)
    for name, spec in inputs.items():
        if spec.url is None:
            continue
        try:
            inputs[name] = replace(spec, path=fetch(spec.url, store, spec.sha256))
        except RecipeError as exc:
            raise RecipeError(f"input {name!r}: {exc.message}", recipe.path, spec.line) from None
        except Exception as exc:  # each fsspec backend raises its own kinds
            raise RecipeError(
                f"input {name!r}: cannot fetch {spec.url} ({type(exc).__name__}: {exc})",
                recipe.path,
                spec.line,
            ) from None
    return replace(recipe, inputs=inputs)
