"""What every model reader is, and the views over one that rename its keys
(imports no reader of a format, so that each of them may import this)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from sdrecipe.arch import VAE_PREFIX
from sdrecipe.io.dtypes import DTYPE_TO_CODE
from sdrecipe.io.fingerprint import Fingerprint
from sdrecipe.io.tensor_info import TensorInfo


class ModelReader(Protocol):
    """What the build needs from an input model, whatever its format."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def infos(self) -> dict[str, TensorInfo]: ...

    def tensor(self, key: str) -> torch.Tensor: ...

    def raw(self, key: str) -> memoryview: ...

    def fingerprint(self) -> Fingerprint: ...


# Top-level names in a VAE distributed on its own (e.g. vae-ft-mse-840000).
STANDALONE_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class RenamedReader:
    """A model file seen under other key names (`names`: new name → the file's),
    holding only the named tensors."""

    def __init__(self, reader: ModelReader, names: dict[str, str]):
        self.wrapped = reader
        self.path = reader.path
        self.metadata = reader.metadata
        self.inner = file_reader(reader)  # the file itself, under any number of views
        self._names = names

    def keys(self) -> list[str]:
        """Tensor names, as renamed."""
        return list(self._names)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key`."""
        return self.wrapped.info(self._names[key])

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every tensor."""
        return {key: self.info(key) for key in self._names}

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor, as the file's reader gives it."""
        return self.wrapped.tensor(self._names[key])

    def raw(self, key: str) -> memoryview:
        """The tensor's bytes."""
        return self.wrapped.raw(self._names[key])

    def stored(self, key: str) -> tuple[str, int]:
        """How `key` is stored in the file (see `stored_as`)."""
        return stored_as(self.wrapped, self._names[key])

    def fingerprint(self) -> Fingerprint:
        """The file's fingerprint, under the new names."""
        return self.renamed(self.inner.fingerprint())

    def renamed(self, found: Fingerprint) -> Fingerprint:
        """The file's own fingerprint `found` under the new names."""
        if isinstance(self.wrapped, RenamedReader):
            found = self.wrapped.renamed(found)
        tensors = {key: found.tensors[name] for key, name in self._names.items()}
        return Fingerprint(found.sha256, found.legacy, tensors)


class StandaloneVaeReader(RenamedReader):
    """A VAE file whose keys lack `first_stage_model.` (or `prefix`), as VAEs
    are distributed, seen under that prefix; other tensors (a training loss's)
    are left out."""

    def __init__(self, reader: ModelReader, prefix: str = VAE_PREFIX):
        names = {
            prefix + key: key for key in reader.infos() if key.startswith(STANDALONE_VAE_PREFIXES)
        }
        super().__init__(reader, names)


def stored_as(reader: ModelReader, key: str) -> tuple[str, int]:
    """The type `key` is stored as (a safetensors dtype code, a GGML type, or a
    quantized format) and the bytes it takes in the file, scales included."""
    stored = getattr(reader, "stored", None)
    if stored is not None:
        return stored(key)
    info = reader.info(key)
    return DTYPE_TO_CODE[info.dtype], info.nbytes


def file_reader(reader: ModelReader) -> ModelReader:
    """The reader of the file itself under any renamed view."""
    return reader.inner if isinstance(reader, RenamedReader) else reader


def with_model_prefix(reader: ModelReader, old: str, new: str) -> RenamedReader:
    """`reader` with the keys of its diffusion model (those under `old`, every
    key when `old` is empty) moved under `new`; the other keys as they are."""
    names = {}
    for key in reader.infos():
        if old == "":
            names[new + key] = key
        elif key.startswith(old):
            names[new + key[len(old) :]] = key
        else:
            names[key] = key
    return RenamedReader(reader, names)


def is_standalone_vae(keys: list[str]) -> bool:
    """True when the keys are a bare VAE's: a decoder, and no model prefixes."""
    return any(key.startswith("decoder.") for key in keys) and not any(
        key.startswith(("model.diffusion_model.", VAE_PREFIX)) for key in keys
    )
