"""Safe reading of pickled PyTorch checkpoints (.ckpt, .pt, .pth).

The pickle is read with `torch.load(weights_only=True)`, which only rebuilds
tensors and plain containers: a pickle that tries to run code is refused, and
its code never runs. Zip-format checkpoints are memory-mapped; the old
pre-zip format cannot be, so it is loaded into memory.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from sdrecipe.arch import normalise_key
from sdrecipe.errors import RecipeError
from sdrecipe.io.fingerprint import Fingerprint, legacy_hash_of, sha256_of, tensor_digest
from sdrecipe.io.tensor_info import TensorInfo


class CheckpointReader:
    """A pickled checkpoint's tensors, unwrapped from `{"state_dict": ...}` and with
    legacy SD1 text-encoder names brought up to date."""

    def __init__(self, path: Path):
        self.path = path
        if path.stat().st_size == 0:
            raise RecipeError("the checkpoint is empty (0 bytes; incomplete download?)", path)
        data = _load(path)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise RecipeError("the checkpoint holds no state dict of tensors", path)
        self._tensors = {
            normalise_key(str(key)): value
            for key, value in data.items()
            if isinstance(value, torch.Tensor)
        }
        if not self._tensors:
            raise RecipeError("the checkpoint holds no tensors", path)
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        """Tensor names, in the checkpoint's order."""
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key`."""
        tensor = self._tensors[key]
        return TensorInfo(tensor.dtype, tuple(tensor.shape))

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every tensor."""
        return {key: self.info(key) for key in self._tensors}

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor (memory-mapped for zip checkpoints); callers must not modify it."""
        return self._tensors[key]

    def raw(self, key: str) -> memoryview:
        """The tensor's bytes in row-major order."""
        tensor = self._tensors[key].contiguous()
        return tensor.reshape(-1).view(torch.uint8).numpy().data

    def fingerprint(self) -> Fingerprint:
        """The file's sha256 and each tensor's digest."""
        digests = {key: tensor_digest(self.info(key), [self.raw(key)]) for key in self._tensors}
        return Fingerprint(sha256_of(self.path), legacy_hash_of(self.path), digests)


def _load(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise RecipeError(
            "refused to load: the pickle asks to run code or build objects other than "
            f"tensors, and was not executed ({detail.strip() or 'weights_only load failed'}). "
            "Convert the model to safetensors with a tool you trust, or ask its author for one.",
            path,
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise RecipeError(f"cannot read the checkpoint: {reason}", path) from None
    except (IndexError, KeyError, TypeError) as exc:
        # What torch.load's unpickler raises on bytes that are no pickle at all.
        reason = f"not a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        raise RecipeError(f"cannot read the checkpoint: {reason}", path) from None
