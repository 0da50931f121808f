"""The shared second tier of the cache: content-addressed files under any
fsspec URL (`s3://bucket/sdrecipe-cache`, `gs://...`, `az://...`, a local or
network folder), used after the local cache.

Layout under the URL, every name fixed by its content, so uploads are
immutable and concurrent builds write identical bytes to a name:
- `objects/ab/<blake3>.safetensors`: cached intermediate tensors, as locally;
- `refs/<sha256>.json`: one per push, JSON `{identity: [entry, key, digest]}`,
  the object each tensor identity is in (named by its own content's hash);
- `packs/<content digest>.safetensors`: finished outputs;
- `outputs/<output id>`: JSON `{"digest": ...}`, the pack an output id built.

Only names of the tier's own form are read, and only those are ever deleted
or replaced (a 64-digit hex digest with the folder's suffix; `tmp/` names are
32 hex digits): any other file under the URL is ignored and left as it is. A
record or ref is read only if it is a regular file of at most 16 MiB, never
waiting on it (a FIFO is a corrupt entry, not a hang). For a local folder
(`file://`), a symlinked `outputs/ packs/ objects/ refs/ tmp/` folder is refused,
and a symlinked or special entry is counted as corrupt but never deleted.
A push removes the temporaries in `tmp/` older than 6 hours (others may be
uploads going on now), and an interrupted upload removes its own.

`pull` downloads what a build needs and the local cache lacks, checking every
file against the digest in its name before the local cache takes it. Nothing
read from the remote is trusted: a record or ref file must name entries by
64-digit hex digests, or it is corrupt. A corrupt or partial remote file is
reported, counted, deleted remotely, and left to the build to recompute and
`push` again. `push` uploads what the local cache holds and the
remote lacks. On an object store a PUT is atomic, and many go at once; on a
file system each file is written under a temporary name, then moved to its own.
Credentials and endpoints come from each fsspec backend's usual places (for
S3 and MinIO: the AWS variables and files, `AWS_ENDPOINT_URL`); none is ever
written into a recipe, lock or output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrecipe.cache.store import (
    OBJECT,
    PACK,
    Cache,
    Location,
    is_digest,
    is_location,
    output_digest,
)
from sdrecipe.io.atomic import publish, temporary_path
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.text_files import read_small_file

# fsspec protocols of object stores, where one PUT is atomic.
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss")
# Records and refs are small JSON files; anything larger is corrupt, not read.
MAX_RECORD_SIZE = 16 * 2**20
# An upload temporary in `tmp/` this old is one whose pusher was stopped.
STALE_UPLOAD_SECONDS = 6 * 3600
# The names the tier writes in each folder (paths relative to it); nothing else
# there is its to read, replace or delete.
FOLDERS = ("outputs", "packs", "objects", "refs", "tmp")
_OWN_NAME = {
    "outputs": re.compile(r"[0-9a-f]{64}"),
    "packs": re.compile(r"[0-9a-f]{64}\.safetensors"),
    "objects": re.compile(r"([0-9a-f]{2})/\1[0-9a-f]{62}\.safetensors"),
    "refs": re.compile(r"[0-9a-f]{64}\.json"),
    "tmp": re.compile(r"[0-9a-f]{32}"),
}


class UnsafeRemote(ValueError):
    """A local remote whose own folders are symbolic links: refused."""


@dataclass
class Transfer:
    """What one pull or push moved: counts and bytes, and what was rejected."""

    outputs: int = 0
    objects: int = 0
    refs: int = 0
    bytes: int = 0
    corrupt: list[str] = field(default_factory=list)


class RemoteCache:
    """The cache tier at `url`."""

    def __init__(self, url: str, notify: Callable[[str], None] = lambda text: None):
        import fsspec

        self.url = url
        self.notify = notify
        # A filesystem of its own: fsspec's shared instances keep listings that
        # other machines' uploads make stale.
        self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        self.root = root.rstrip("/")
        self._noted: set[str] = set()
        self._rejected: set[str] = set()
        self._check_folders()

    @property
    def local_root(self) -> Path | None:
        """The folder a `file://` (or plain path) remote is, else None."""
        from fsspec.implementations.local import LocalFileSystem

        return Path(self.root) if isinstance(self.fs, LocalFileSystem) else None

    def _check_folders(self) -> None:
        """Refuse a local remote whose own folders are symbolic links: nothing is
        read, written or deleted through one."""
        if self.local_root is None:
            return
        for folder in FOLDERS:
            if (self.local_root / folder).is_symlink():
                raise UnsafeRemote(
                    f"{self.local_root / folder} is a symbolic link; the remote cache's "
                    "folders must be real folders"
                )

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _names(self, folder: str) -> dict[str, dict[str, Any]]:
        """The tier's own files under `folder`, by file name, with their fsspec
        info (one listing, not a request per name). Files of other names are
        ignored, with one note."""
        base = self._path(folder)
        listing: dict[str, dict[str, Any]] = {}
        if self.local_root is not None:
            self._check_folders()
            for top, dirs, files in os.walk(base):  # symlinked folders are not entered
                links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
                for name in [*files, *links]:
                    path = os.path.join(top, name)
                    with contextlib.suppress(FileNotFoundError):
                        found = os.lstat(path)
                        regular = stat.S_ISREG(found.st_mode)
                        listing[path] = {
                            "type": "file" if regular else "other",
                            "size": found.st_size,
                            "mtime": found.st_mtime,
                        }
        else:
            self.fs.invalidate_cache()
            try:
                listing = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        own: dict[str, dict[str, Any]] = {}
        foreign = 0
        for path, info in listing.items():
            relative = path[len(base) + 1 :]
            if _OWN_NAME[folder].fullmatch(relative):
                own[relative.rsplit("/", 1)[-1]] = {**info, "name": path}
            else:
                foreign += 1
        if foreign and folder not in self._noted:
            self._noted.add(folder)
            self.notify(
                f"the remote cache {self.url}/{folder} holds {foreign} files that are not "
                "sdrecipe's; ignored and left as they are"
            )
        return own

    def _is_object_store(self) -> bool:
        protocols = self.fs.protocol
        protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        return bool(protocols & set(OBJECT_STORES))

    def _is_special(self, remote: str) -> bool:
        """On a local remote: whether `remote` is there and not a regular file (a
        FIFO would block a copy, a link leads elsewhere)."""
        if self.local_root is None:
            return False
        try:
            return not stat.S_ISREG(os.lstat(remote).st_mode)
        except OSError:
            return False

    def _read_small(self, path: str) -> bytes:
        """A record or ref file's bytes: a regular file of at most MAX_RECORD_SIZE,
        read without ever waiting on it; ValueError for anything else."""
        if self.local_root is not None:
            try:
                # A symlinked entry is refused: it could lead anywhere.
                return read_small_file(path, MAX_RECORD_SIZE, follow_symlinks=False)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise ValueError(f"cannot be opened ({exc})") from None
        info = self.fs.info(path)
        if info.get("type") != "file":
            raise ValueError("not a file")
        if (info.get("size") or 0) > MAX_RECORD_SIZE:
            raise ValueError(f"larger than {MAX_RECORD_SIZE} bytes")
        data = self.fs.cat_file(path, start=0, end=MAX_RECORD_SIZE + 1)
        if len(data) > MAX_RECORD_SIZE:
            raise ValueError(f"larger than {MAX_RECORD_SIZE} bytes")
        return data

    def _removable(self, remote: str) -> bool:
        """Whether `remote` may be deleted: on a local remote, a regular file
        reached through no symbolic link below the remote's root."""
        if self.local_root is None:
            return True
        root = os.path.realpath(self.root)
        relative = os.path.relpath(remote, self.root)
        if relative.startswith(".."):
            return False
        if os.path.realpath(os.path.dirname(remote)) != os.path.dirname(
            os.path.join(root, relative)
        ):
            return False
        try:
            return stat.S_ISREG(os.lstat(remote).st_mode)
        except OSError:
            return False

    def _remove_stale_uploads(self) -> None:
        """Delete the upload temporaries in `tmp/` older than STALE_UPLOAD_SECONDS:
        left by a pusher that was stopped (younger ones may be uploads going on)."""
        now = time.time()
        for info in self._names("tmp").values():
            path = info["name"]
            try:
                modified = info.get("mtime")
                if modified is None:
                    modified = self.fs.modified(path).timestamp()
                if now - float(modified) > STALE_UPLOAD_SECONDS and self._removable(path):
                    self.fs.rm_file(path)
            except (OSError, ValueError, NotImplementedError):
                continue

    def _upload(self, pairs: list[tuple[Path | bytes, str]]) -> None:
        """Write each (local file or bytes, remote name) so that no reader ever
        sees part of a file under its real name."""
        if not pairs:
            return
        if self._is_object_store():
            files = [(str(s), t) for s, t in pairs if isinstance(s, Path)]
            if files:
                self.fs.put([s for s, _ in files], [t for _, t in files])
            for source, target in pairs:
                if isinstance(source, bytes):
                    self.fs.pipe_file(target, source)
            return
        for source, target in pairs:
            temporary = self._path("tmp", uuid.uuid4().hex)
            for folder in (self._path("tmp"), target.rsplit("/", 1)[0]):
                self.fs.makedirs(folder, exist_ok=True)
            moved = False
            try:
                if isinstance(source, bytes):
                    self.fs.pipe_file(temporary, source)
                else:
                    self.fs.put_file(str(source), temporary)
                self.fs.mv(temporary, target)
                moved = True
            finally:
                if not moved:  # stopped or failed (Ctrl-C too): remove our temporary
                    with contextlib.suppress(Exception):
                        self.fs.rm_file(temporary)

    def _download(self, pairs: list[tuple[str, Path]]) -> list[Path]:
        """Copy each remote name beside its local target (many at once where the
        backend can); returns the temporary files, in order."""
        temporaries = [temporary_path(target, unique=True) for _, target in pairs]
        for _, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
        if pairs:
            try:
                self.fs.get([source for source, _ in pairs], [str(t) for t in temporaries])
            except BaseException:  # Ctrl-C too: leave no partial download behind
                for temporary in temporaries:
                    temporary.unlink(missing_ok=True)
                raise
        return temporaries

    def _reject(self, name: str, remote: str, transfer: Transfer) -> None:
        """A remote file of the tier's own naming that fails its check: say so, and
        delete it so that the next push replaces it (one that is not a regular
        file, or is reached through a symbolic link, is left in place)."""
        if name in self._rejected:  # left in place, and reported once already
            return
        removable = self._removable(remote)
        if not removable:
            self._rejected.add(name)
        outcome = "ignored and removed" if removable else "ignored (not a regular file; left)"
        self.notify(f"remote cache entry {self.url}/{name} is corrupt; {outcome}")
        transfer.corrupt.append(name)
        if removable:
            with contextlib.suppress(OSError):
                self.fs.rm_file(remote)

    # --- pull ---------------------------------------------------------------------------

    def pull(self, cache: Cache, identities: Iterable[str], output_ids: Iterable[str]) -> Transfer:
        """Download the outputs and tensors among these that the local cache lacks."""
        transfer = Transfer()
        available = self._names("outputs")
        for output_id in output_ids:
            if output_id in available and cache.find_pack(output_id) is None:
                self._pull_output(cache, output_id, transfer)
        identities = set(identities)
        wanted = identities - set(cache.lookup(identities))
        found = {i: location for i, location in self._refs(transfer).items() if i in wanted}
        digests = {location.entry: location for location in found.values()}
        # An object that a ref names and the remote lost (as corrupt) waits for a push.
        held = self._names("objects")
        missing = [
            d
            for d in sorted(digests)
            if f"{d}.safetensors" in held and not cache.entry_path(OBJECT, d).exists()
        ]
        for digest in [d for d in missing if held[f"{d}.safetensors"].get("type") != "file"]:
            name = f"objects/{digest[:2]}/{digest}.safetensors"
            self._reject(name, self._path(name), transfer)
            missing.remove(digest)
        names = [f"objects/{digest[:2]}/{digest}.safetensors" for digest in missing]
        temporaries = self._download(
            [
                (self._path(n), cache.entry_path(OBJECT, d))
                for n, d in zip(names, missing, strict=True)
            ]
        )
        try:
            for name, digest, temporary in zip(names, missing, temporaries, strict=True):
                self._take_object(cache, digests[digest], name, temporary, transfer)
        finally:  # stopped part way (Ctrl-C): the rest are not left behind
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
        local = [
            (i, loc, cache.entry_path(OBJECT, loc.entry))
            for i, loc in found.items()
            if cache.entry_path(OBJECT, loc.entry).exists()
        ]
        cache.add_objects((i, loc, path.stat().st_size) for i, loc, path in local)
        transfer.refs += len(local)
        return transfer

    def _refs(self, transfer: Transfer) -> dict[str, Location]:
        """Every tensor identity the remote holds, from all the pushes' ref files
        (one that is not a manifest sdrecipe wrote is rejected as corrupt)."""
        listing = self._names("refs")
        names = sorted(listing)
        paths = [self._path("refs", name) for name in names]
        contents: dict[str, bytes | None] = {}
        if self.local_root is not None:
            for path in paths:
                try:
                    contents[path] = self._read_small(path)
                except FileNotFoundError:  # rejected by another build since the listing
                    continue
                except ValueError:
                    contents[path] = None
        else:
            # Only listed files within the bound, and at most the bound of each.
            small = [
                p
                for p, n in zip(paths, names, strict=True)
                if (listing[n].get("size") or 0) <= MAX_RECORD_SIZE
            ]
            contents = dict.fromkeys(paths)
            if small:
                ends = [MAX_RECORD_SIZE + 1] * len(small)
                read = self.fs.cat_ranges(small, [0] * len(small), ends, on_error="return")
                for path, data in zip(small, read, strict=True):
                    if isinstance(data, FileNotFoundError):
                        del contents[path]
                    elif isinstance(data, bytes) and len(data) <= MAX_RECORD_SIZE:
                        contents[path] = data
        refs: dict[str, Location] = {}
        for path, data in sorted(contents.items()):
            name = path.rsplit("/", 1)[-1]
            good = data is not None and name == f"{hashlib.sha256(data).hexdigest()}.json"
            manifest = _manifest(data) if good and data is not None else None
            if manifest is None:
                self._reject(f"refs/{name}", path, transfer)
            else:
                refs.update(manifest)
        return refs

    def _record_digest(self, output_id: str, transfer: Transfer) -> str | None:
        """The pack digest that `outputs/<output_id>` names; a record that is not
        `{"digest": <64 hex digits>}` is rejected as corrupt (None)."""
        record = self._path("outputs", output_id)
        try:
            content = load_json(self._read_small(record))
        except FileNotFoundError:
            return None
        except ValueError:
            content = None
        digest = content.get("digest") if isinstance(content, dict) else None
        if not is_digest(digest):
            self._reject(f"outputs/{output_id}", record, transfer)
            return None
        return digest

    def _pull_output(self, cache: Cache, output_id: str, transfer: Transfer) -> None:
        digest = self._record_digest(output_id, transfer)
        if digest is None:
            return
        remote = self._path("packs", f"{digest}.safetensors")
        if self._is_special(remote):
            self._reject(f"packs/{digest}.safetensors", remote, transfer)
            return
        try:
            (temporary,) = self._download([(remote, cache.entry_path(PACK, digest))])
        except FileNotFoundError:  # a record naming a pack the remote lacks
            self._reject(f"outputs/{output_id}", self._path("outputs", output_id), transfer)
            return
        try:
            try:
                good = output_digest(temporary, None) == digest
            except Exception:
                good = False
            if not good:
                self._reject(f"packs/{digest}.safetensors", remote, transfer)
                return
            cache.add_pack(temporary, digest, output_id)
            transfer.outputs += 1
            transfer.bytes += temporary.stat().st_size
        finally:
            temporary.unlink(missing_ok=True)

    def _take_object(
        self, cache: Cache, location: Location, name: str, temporary: Path, transfer: Transfer
    ) -> None:
        """Check a downloaded object against its digest and give it to the local cache."""
        from sdrecipe.io.fingerprint import tensor_digest
        from sdrecipe.io.safetensors_reader import SafetensorsReader

        try:
            try:
                reader = SafetensorsReader(temporary)
                info = reader.info(location.key)
                good = tensor_digest(info, [reader.raw(location.key)]) == location.digest
            except Exception:
                good = False
            if not good:
                self._reject(name, self._path(name), transfer)
                return
            transfer.objects += 1
            transfer.bytes += temporary.stat().st_size
            publish(temporary, cache.entry_path(OBJECT, location.entry))
        finally:
            temporary.unlink(missing_ok=True)

    # --- push ---------------------------------------------------------------------------

    def push(self, cache: Cache, identities: Iterable[str], output_ids: Iterable[str]) -> Transfer:
        """Upload the outputs and tensors among these that the local cache holds
        and the remote lacks."""
        transfer = Transfer()
        if not self._is_object_store():
            self._remove_stale_uploads()
        outputs, packs = self._names("outputs"), self._names("packs")
        uploads: list[tuple[Path | bytes, str]] = []
        for output_id in output_ids:
            pack = cache.find_pack(output_id)
            if pack is None:
                continue
            if pack.name not in packs:  # new, or removed as corrupt by a pull
                uploads.append((pack, self._path("packs", pack.name)))
                transfer.bytes += pack.stat().st_size
                transfer.outputs += 1
            if output_id not in outputs or self._record_digest(output_id, transfer) is None:
                record = json.dumps({"digest": pack.name.removesuffix(".safetensors")})
                uploads.append((record.encode(), self._path("outputs", output_id)))
        self._upload(uploads)
        known, objects = self._refs(transfer), self._names("objects")
        held = {i: loc for i, loc in cache.lookup(identities).items() if loc.kind == OBJECT}
        new = {identity: location for identity, location in held.items() if identity not in known}
        files = []
        # Every object the remote lacks, also one it lost as corrupt that a ref still names.
        for digest in sorted({location.entry for location in held.values()}):
            local = cache.entry_path(OBJECT, digest)
            if f"{digest}.safetensors" not in objects and local.exists():
                files.append((local, self._path("objects", digest[:2], f"{digest}.safetensors")))
                transfer.objects += 1
                transfer.bytes += local.stat().st_size
        self._upload(files)
        if new:
            # Objects first, then the refs naming them: a reader never finds a ref
            # to an object that is not there yet.
            entries = {i: [loc.entry, loc.key, loc.digest] for i, loc in sorted(new.items())}
            manifest = json.dumps(entries, sort_keys=True).encode()
            name = f"{hashlib.sha256(manifest).hexdigest()}.json"
            self._upload([(manifest, self._path("refs", name))])
            transfer.refs += len(new)
        return transfer

    def info(self) -> dict[str, Any]:
        """The remote tier's counts and size."""
        sizes = {}
        for folder in ("objects", "packs"):
            try:
                sizes[folder] = self.fs.du(self._path(folder), total=True)
            except FileNotFoundError:
                sizes[folder] = 0
        return {
            "url": self.url,
            "outputs": len(self._names("outputs")),
            "objects": len(self._names("objects")),
            "tensors": len(self._names("refs")),
            "size": sum(sizes.values()),
        }


def _manifest(data: bytes) -> dict[str, Location] | None:
    """The object locations a ref file gives tensor identities, or None unless
    it is JSON `{identity: [entry, key, digest]}` with digests for names."""
    try:
        entries = load_json(data)
        refs = {identity: Location(OBJECT, *entry) for identity, entry in entries.items()}
    except (ValueError, TypeError, AttributeError):
        return None
    valid = all(is_digest(identity) and is_location(loc) for identity, loc in refs.items())
    return refs if valid else None
