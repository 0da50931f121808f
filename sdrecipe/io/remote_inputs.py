"""Inputs named by URL (`s3://bucket/models/base.safetensors`, any fsspec URL).

A build streams each remote input once into a local content-addressed store
(`<cache>/inputs/<sha256>.safetensors`), hashed on the way and checked against
the recipe's `sha256` pin when it has one, then memory-mapped like a local
file. The store remembers which URL and version (ETag, version id, else size
and modification time) gave which file, so the same URL at the same version is
never downloaded twice. What reads no tensor data (validate, plan) opens a
remote safetensors file that is not in the store by its header alone, with
ranged reads (`RemoteSafetensorsReader`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import publish, temporary_path, write_text_atomically
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.fingerprint import Fingerprint
from sdrecipe.io.safetensors_reader import (
    SafetensorsReader,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 8 << 20
SOURCES = "sources.json"
# One ranged read of this size holds most safetensors headers.
HEADER_BLOCK = 1 << 20


def _open(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _version(info: dict) -> str:
    """What changes when the remote file does: its ETag or version, else size and time."""
    for field in ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash"):
        if info.get(field):
            return f"{field}={info[field]}"
    return f"size={info.get('size')},mtime={info.get('mtime') or info.get('LastModified')}"


def local_copy(url: str, store: Path, pin: str | None, download: bool = True) -> Path | None:
    """The local copy of `url` in `store`: the one already there for this URL
    and version, else (when `download`) a new download, verified against `pin`;
    else None."""
    fs, path = _open(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise RecipeError(f"cannot read {url}: it does not exist") from None
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
    if not download:
        return None
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


class RemoteSafetensorsReader(SafetensorsReader):
    """A remote safetensors file opened by its header alone, with ranged reads;
    `path` names where its local copy would be kept (there is none). A tensor
    is read by a ranged read when asked for, the one-number tensors (an
    adapter's alphas, scaled-fp8 scales) all at once; the fingerprint needs the
    whole file, so it is refused until a build downloads it."""

    def __init__(self, url: str, path: Path):
        self.url = url
        self.path = path
        self._fs, self._remote = _open(url)
        with self._fs.open(self._remote, "rb", block_size=HEADER_BLOCK) as handle:
            self._read_header(handle)
        self._mmap = None
        self._scalars: dict[str, bytes] | None = None

    def _error(self, message: str) -> RecipeError:
        return RecipeError(message, self.url)

    def _not_downloaded(self, what: str) -> RecipeError:
        return RecipeError(
            f"{self.url} is not downloaded, and {what} needs the whole file (a build downloads it)"
        )

    def fingerprint(self) -> Fingerprint:
        """Refused: the file's sha256 and digests need all of its bytes."""
        raise self._not_downloaded("its fingerprint")

    def content_digest(self) -> str:
        """Refused, as the fingerprint is."""
        raise self._not_downloaded("its content digest")

    def _mapped(self) -> mmap.mmap:
        """Refused: there is no local file to map (tensors come by ranged reads)."""
        raise self._not_downloaded("mapping it")

    def raw(self, key: str) -> memoryview:
        """The stored bytes of `key`, by a ranged read; the first one-number
        tensor asked for reads every one-number tensor at once."""
        start, info = self._offsets[key], self._infos[key]
        if info.numel != 1:
            return memoryview(self._fs.cat_file(self._remote, start, start + info.nbytes))
        if self._scalars is None:
            keys = [name for name, found in self._infos.items() if found.numel == 1]
            starts = [self._offsets[name] for name in keys]
            ends = [at + self._infos[name].nbytes for name, at in zip(keys, starts, strict=True)]
            found = self._fs.cat_ranges([self._remote] * len(keys), starts, ends, on_error="raise")
            self._scalars = dict(zip(keys, found, strict=True))
        return memoryview(self._scalars[key])

    def tensor(self, key: str) -> torch.Tensor:
        """`key`'s data, read as `raw` reads it."""
        info = self._infos[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(bytearray(self.raw(key)), dtype=info.dtype).view(info.shape)
