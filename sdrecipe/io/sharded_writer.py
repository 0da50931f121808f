"""Streaming, atomic writing of a safetensors model as shards behind an index.

The split follows Hugging Face's (`sdrecipe.io.shard_files`); each shard is
one `SafetensorsWriter` with the output's metadata, so every shard is a
complete safetensors file written through its own temporary. Publishing
renames the shards into place, then the index: the index is the truth about
which files make the model. A model that fits in one shard is one plain file
at the output's path, with no index.

Publishing one form removes the other form a previous build of the same
output left (the plain file at the output's path when shards are written, the
index when a plain file is): both are the output's own paths (see
`sdrecipe.plan.guard`). Shards that the new index does not name, such as those of
an earlier split into another number of shards, are left alone.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrecipe.errors import BuildError, describe_os_error
from sdrecipe.io.atomic import publish, temporary_path
from sdrecipe.io.fingerprint import bytes_digest, folder_digest
from sdrecipe.io.safetensors_writer import SafetensorsWriter, layout_order
from sdrecipe.io.shard_files import index_path, shard_name, split_shards
from sdrecipe.io.tensor_info import TensorInfo


def open_safetensors_writer(
    path: Path,
    tensors: dict[str, TensorInfo],
    metadata: dict[str, str],
    max_shard_size: int | None = None,
    drop_written: bool = False,
) -> ComponentWriter:
    """A writer for the safetensors model at `path`: one file, or shards of at
    most `max_shard_size` bytes of tensor data when it is given."""
    if max_shard_size is None:
        return SafetensorsWriter(path, tensors, metadata, drop_written=drop_written)
    return ShardedSafetensorsWriter(path, tensors, metadata, max_shard_size, drop_written)


class ShardedSafetensorsWriter:
    """Writes a safetensors model as shards of at most `max_shard_size` bytes of
    tensor data and their index, or as one file when it fits in one shard.

    The interface is `SafetensorsWriter`'s: tensors may be written in pieces,
    in any order, from any thread; `finish` completes every temporary,
    `publish` puts them in place (index last), `abort` discards them. `path` is
    the file that stands for the model: the index, or the single file.
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        max_shard_size: int,
        drop_written: bool = False,
    ):
        self.target = path
        order = layout_order(tensors)
        groups = split_shards(((key, tensors[key].nbytes) for key in order), max_shard_size)
        if len(groups) > 1:
            self.index: Path | None = index_path(path)
            files = {
                path.with_name(shard_name(path, number, len(groups))): group
                for number, group in enumerate(groups, 1)
            }
        else:
            self.index = None
            files = {path: order}
        self.path = self.index or path
        self.total_size = sum(info.nbytes for info in tensors.values())
        self._index_temporary = temporary_path(self.index) if self.index else None
        self._index_digest: str | None = None
        self.shards: list[SafetensorsWriter] = []
        self._owners: dict[str, SafetensorsWriter] = {}
        try:
            for file, keys in files.items():
                writer = SafetensorsWriter(
                    file, {key: tensors[key] for key in keys}, metadata, drop_written=drop_written
                )
                self.shards.append(writer)
                self._owners.update(dict.fromkeys(keys, writer))
        except BaseException:
            self.abort()
            raise

    def weight_map(self) -> dict[str, str]:
        """Each tensor's shard file name."""
        return {key: writer.path.name for key, writer in self._owners.items()}

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of tensor `key`."""
        return self._owners[key].info(key)

    def write(self, key: str, data: memoryview | bytes, start: int = 0) -> None:
        """Write bytes of tensor `key`, beginning `start` bytes into its data."""
        self._owners[key].write(key, data, start)

    def write_tensor(self, key: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write a contiguous tensor's bytes into `key`'s data at byte `start`."""
        self._owners[key].write_tensor(key, tensor, start)

    def content_digest(self, tensor_digests: Mapping[str, str]) -> str | None:
        """The model's content digest without reading it back: the single file's,
        or the `folder_digest` of the index's bytes digest and each shard's
        content digest, by file name (as `output_digest` reads it); None when a
        tensor's digest is missing or the index is not written yet."""
        if self.index is None:
            return self.shards[0].content_digest(tensor_digests)
        if tensor_digests.keys() != self._owners.keys() or self._index_digest is None:
            return None
        digests = {self.index.name: self._index_digest}
        for writer in self.shards:
            digest = writer.content_digest({key: tensor_digests[key] for key in writer.slots})
            if digest is None:
                return None
            digests[writer.path.name] = digest
        return folder_digest(digests)

    def finish(self) -> None:
        """Close every complete shard and write the index's temporary."""
        for writer in self.shards:
            writer.finish()
        if self.index is None or self._index_temporary is None:
            return
        document = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map()}
        try:
            self._index_temporary.write_text(
                json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        except OSError as exc:
            raise BuildError(
                f"cannot write the output's index: {describe_os_error(exc)}", self.index
            ) from None
        self._index_digest = bytes_digest(self._index_temporary)

    def publish(self) -> None:
        """Rename the shards into place, then the index; remove the other form of
        the output that an earlier build left."""
        for writer in self.shards:
            writer.publish()
        if self.index is None or self._index_temporary is None:
            remove_superseded(index_path(self.target))
            return
        try:
            publish(self._index_temporary, self.index)
        except OSError as exc:
            self._index_temporary.unlink(missing_ok=True)
            raise BuildError(
                f"cannot publish the output's index: {describe_os_error(exc)}", self.index
            ) from None
        remove_superseded(self.target)

    def commit(self) -> None:
        """`finish`, then `publish`."""
        self.finish()
        self.publish()

    def abort(self) -> None:
        """Discard every temporary; what is at the output's paths is left as it was."""
        for writer in self.shards:
            writer.abort()
        if self._index_temporary is not None:
            self._index_temporary.unlink(missing_ok=True)


# One weights file of a model, sharded or not (a diffusers folder holds one per component).
ComponentWriter = SafetensorsWriter | ShardedSafetensorsWriter


def remove_superseded(path: Path) -> None:
    """Remove the file an earlier build wrote at `path` in the output's other
    form (a folder, or nothing, is left alone)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BuildError(
            f"cannot remove the output's earlier form: {describe_os_error(exc)}", path
        ) from None
