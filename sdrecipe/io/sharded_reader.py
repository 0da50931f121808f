"""A sharded safetensors model (numbered shards behind an index JSON), read as one."""

from __future__ import annotations

from pathlib import Path

import torch

from sdrecipe.errors import RecipeError
from sdrecipe.io.fingerprint import Fingerprint, folder_sha256, plain_sha256
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.shard_index import read_index
from sdrecipe.io.tensor_info import TensorInfo


class ShardedSafetensorsReader:
    """The model an index names: one memory-mapped `SafetensorsReader` per shard
    (headers only at load), and the index checked against the shards' headers.

    Keys come shard by shard (shards sorted by name), each in storage order.
    The model's sha256 follows diffusers folders (`folder_sha256`): that of the
    `sha256sum`-style listing of the index and its shards, by file name.
    """

    def __init__(self, path: Path):
        self.path = path
        self.index = read_index(path)
        self.readers: dict[Path, SafetensorsReader] = {}
        self._owners: dict[str, SafetensorsReader] = {}
        holders: dict[str, str] = {}
        for name in self.index.shards:
            reader = SafetensorsReader(self.index.shard_path(name))
            self.readers[reader.path] = reader
            for key in reader.infos():
                if key in holders:
                    raise RecipeError(
                        f"tensor {key!r} is in two shards, {holders[key]} and {name}", path
                    )
                listed = self.index.weight_map.get(key)
                if listed is None:
                    raise RecipeError(
                        f"shard {name} holds tensor {key!r}, which the index does not list", path
                    )
                holders[key] = name
                self._owners[key] = reader
        for key, name in self.index.weight_map.items():
            if holders.get(key) != name:
                found = f" (it is in {holders[key]})" if key in holders else ""
                raise RecipeError(
                    f"the index maps tensor {key!r} to shard {name}, which lacks it{found}", path
                )
        first = next(iter(self.readers.values()))
        self.metadata: dict[str, str] = dict(first.metadata)

    def keys(self) -> list[str]:
        """Tensor names, shard by shard, in storage order."""
        return list(self._owners)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key`."""
        return self._owners[key].info(key)

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every tensor."""
        return {key: reader.info(key) for key, reader in self._owners.items()}

    def owners(self) -> dict[str, SafetensorsReader]:
        """Each key's shard reader."""
        return dict(self._owners)

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy view of `key`'s data; callers must not modify it."""
        return self._owners[key].tensor(key)

    def raw(self, key: str) -> memoryview:
        """The stored bytes of `key`, without a copy."""
        return self._owners[key].raw(key)

    def fingerprint(self) -> Fingerprint:
        """The model's sha256 (see the class) and each tensor's digest, from one
        read of every shard."""
        file_sha256s = {self.path.name: plain_sha256(self.path)}
        tensors: dict[str, str] = {}
        for file, reader in self.readers.items():
            found = reader.fingerprint()
            file_sha256s[file.name] = found.sha256
            tensors.update(found.tensors)
        return Fingerprint(folder_sha256(file_sha256s), "", tensors)
