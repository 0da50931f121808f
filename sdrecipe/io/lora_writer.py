"""The `format: lora` output: a LoRA extracted from a difference, in kohya's layout.

The executor streams each layer's difference into the writer like into any
output; once a layer's bytes are complete the writer factors it (see
`sdrecipe.adapters.extract`) and keeps only the factors. `finish` writes the
file, whose size is known only then: the text encoders are left out when
`text_encoder: auto` finds them unchanged, as kohya does.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sdrecipe.adapters.extract import (
    TEXT_ENCODER_MIN_DIFFERENCE,
    extract,
    is_text_encoder,
    layer_rank,
)
from sdrecipe.adapters.naming import ModuleNames, extraction_parts
from sdrecipe.arch.family import known
from sdrecipe.errors import BuildError
from sdrecipe.io.dtypes import NAME_TO_DTYPE
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.recipe.model import LoraOptions


def lora_metadata(family: str, rank: int, conv_rank: int | None) -> dict[str, str]:
    """The training metadata A1111, ComfyUI and kohya's tools read from a LoRA
    whose largest rank is `rank` (`conv_rank` for 3x3 convolutions, if any);
    kohya's `ss_base_model_version` and the modelspec architecture are the family file's."""
    data = known(family)
    lora = data.adapters.lora if data is not None else None
    metadata = {
        "ss_network_module": lora.network_module if lora else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_v2": str(lora is not None and lora.v2),
        "ss_base_model_version": lora.base_model_version if lora else family,
        "modelspec.architecture": lora.modelspec if lora else family,
    }
    if conv_rank:
        metadata["ss_network_args"] = (
            f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{float(conv_rank)}"}}'
        )
    return metadata


class LoraWriter:
    """Receives each layer's difference (float32, in row pieces, one thread per
    layer), extracts its factors, and writes them at `finish`."""

    def __init__(
        self,
        path: Path,
        differences: dict[str, TensorInfo],
        metadata: dict[str, str],
        family: str,
        options: LoraOptions,
    ):
        self.path = path
        self._differences = differences
        self._metadata = metadata
        self._family = family
        self._names = ModuleNames(family, differences)
        self._options = options
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[np.ndarray, int]] = {}
        self._factors: dict[str, torch.Tensor] = {}
        # The rank each module got (capped by its layer's sizes), and whether it is a 3x3 conv.
        self._ranks: dict[str, tuple[int, bool]] = {}
        self._text_encoder_peak = 0.0
        self._writer: SafetensorsWriter | None = None

    def info(self, key: str) -> TensorInfo:
        """The difference the writer takes at `key`."""
        return self._differences[key]

    def write(self, key: str, data: memoryview | bytes, start: int = 0) -> None:
        """Take bytes of `key`'s difference; factor it once all have come."""
        info = self._differences[key]
        with self._lock:
            # torch allocates 64-byte aligned memory: LAPACK's results may depend on alignment.
            buffer, received = self._pending.get(key) or (
                torch.empty(info.nbytes, dtype=torch.uint8).numpy(),
                0,
            )
        piece = np.frombuffer(data, np.uint8)
        buffer[start : start + piece.size] = piece
        received += piece.size
        if received < info.nbytes:
            with self._lock:
                self._pending[key] = (buffer, received)
            return
        with self._lock:
            self._pending.pop(key, None)
        difference = torch.from_numpy(buffer).view(info.dtype).reshape(info.shape)
        self._factor(key, difference)

    def _factor(self, key: str, difference: torch.Tensor) -> None:
        """Factor one layer: whole, or by the parts kohya's names patch (the
        thirds of OpenCLIP's fused q/k/v projection)."""
        pieces = [
            (part.names[0], difference[part.rows(difference.shape[0])])
            for part in extraction_parts(self._names, key)
        ]
        factors = {}
        ranks = {}
        dtype = NAME_TO_DTYPE[self._options.dtype]
        for name, piece in pieces:
            rank = layer_rank(tuple(piece.shape), self._options)
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
            up, down = extract(piece, rank, self._options.clamp_quantile, seed >> 1)
            up, down = up.to(dtype), down.to(dtype)
            if not bool(torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise BuildError(
                    f"the LoRA factors extracted at {key} are infinite or NaN in "
                    f"{str(dtype).removeprefix('torch.')} (the difference there reaches "
                    f"{float(difference.abs().max()):g}); use a wider dtype, or check the "
                    "models; no output was written"
                )
            factors[f"{name}.lora_up.weight"] = up
            factors[f"{name}.lora_down.weight"] = down
            factors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=dtype)
            ranks[name] = (rank, piece.dim() == 4 and tuple(piece.shape[2:]) != (1, 1))
        peak = float(difference.abs().max()) if is_text_encoder(key) else 0.0
        with self._lock:
            self._factors.update(factors)
            self._ranks.update(ranks)
            self._text_encoder_peak = max(self._text_encoder_peak, peak)

    def content_digest(self, tensor_digests: Mapping[str, str]) -> None:
        """None: the file is read back to be digested (its tensors are factors of
        the keys written)."""

    def finish(self) -> None:
        """Write the factors into the temporary file (text encoders dropped when
        `auto` finds their differences all within kohya's 0.01)."""
        factors = self._factors
        unchanged = self._text_encoder_peak <= TEXT_ENCODER_MIN_DIFFERENCE
        if self._options.text_encoder == "auto" and unchanged:
            factors = {k: v for k, v in factors.items() if not k.startswith("lora_te")}
        kept = [ranked for name, ranked in self._ranks.items() if f"{name}.alpha" in factors]
        rank = max((r for r, conv in kept if not conv), default=self._options.rank)
        conv_rank = max((r for r, conv in kept if conv), default=self._options.conv_rank)
        metadata = {**self._metadata, **lora_metadata(self._family, rank, conv_rank)}
        infos = {key: TensorInfo(t.dtype, tuple(t.shape)) for key, t in sorted(factors.items())}
        self._writer = SafetensorsWriter(self.path, infos, metadata)
        try:
            for key in infos:
                self._writer.write_tensor(key, factors[key])
            self._writer.finish()
        except BaseException:
            self._writer.abort()
            raise

    def publish(self) -> None:
        """Rename the finished file into place."""
        assert self._writer is not None
        self._writer.publish()

    def abort(self) -> None:
        """Discard the temporary file."""
        if self._writer is not None:
            self._writer.abort()
