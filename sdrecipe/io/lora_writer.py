"""The `format: lora` output: a LoRA extracted from a difference, in kohya's
layout or (`naming: peft`) diffusers'.

The executor streams each layer's difference into the writer like into any
output; once a layer's bytes are complete the writer factors it (see
`sdrecipe.adapters.extract`) and keeps only the factors. `finish` writes the
file, whose size is known only then: the text encoders are left out when
`text_encoder: auto` finds them unchanged, as kohya does.
"""

from __future__ import annotations

import hashlib
import json
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
from sdrecipe.io.adapter_reader import PEFT_METADATA_KEY
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


def peft_file(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' tensors (`lora_A`, `lora_B`) and its PEFT config, by component
    as diffusers writes it (`{"transformer.r": 64, "transformer.lora_alpha": 64,
    ...}`). PEFT scales a module of rank r by lora_alpha / r, lora_alpha being
    the component's largest rank: a module whose rank is capped below it (by its
    layer's size) has `lora_B` divided by that scale, and is in `rank_pattern`."""
    components: dict[str, dict[str, int]] = {}
    for name in modules:
        component, _, path = name.partition(".")
        components.setdefault(component, {})[path] = modules[name][1].shape[0]
    factors = {}
    config: dict[str, object] = {}
    for component, ranks in sorted(components.items()):
        largest = max(ranks.values())
        for path, rank in ranks.items():
            up, down = modules[f"{component}.{path}"]
            factors[f"{component}.{path}.lora_B.weight"] = (up * (rank / largest)).to(up.dtype)
            factors[f"{component}.{path}.lora_A.weight"] = down
        # PEFT finds modules by the end of their names: a text encoder's without
        # `text_model.`, which transformers 5's CLIPTextModel no longer has; the
        # others whole (`^`), as diffusers writes them, lest `proj_out` match
        # `single_transformer_blocks.0.proj_out` too.
        encoder = component.startswith("text_encoder")
        names = {p: p.removeprefix("text_model.") if encoder else p for p in ranks}
        config[f"{component}.r"] = largest
        config[f"{component}.lora_alpha"] = largest
        config[f"{component}.target_modules"] = sorted(names.values())
        config[f"{component}.rank_pattern"] = {
            names[p] if encoder else "^" + p: r for p, r in ranks.items() if r != largest
        }
    return factors, {PEFT_METADATA_KEY: json.dumps(config, sort_keys=True)}


class LoraWriter:
    """Receives each layer's difference (float32, in row pieces, one thread per
    layer), extracts its factors (on `device`, if one is given), and writes
    them at `finish`."""

    def __init__(
        self,
        path: Path,
        differences: dict[str, TensorInfo],
        metadata: dict[str, str],
        family: str,
        options: LoraOptions,
        device: torch.device | None = None,
    ):
        self.path = path
        self._device = device
        self._differences = differences
        self._metadata = metadata
        self._family = family
        self._names = ModuleNames(family, differences)
        self._options = options
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[np.ndarray, int]] = {}
        # Each module's (up, down), by its name, and the names made from text encoders' keys.
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_encoder_modules: set[str] = set()
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
        """Factor one layer: whole, or by the parts its names patch (the thirds of
        OpenCLIP's fused q/k/v projection; with PEFT's names, each diffusers tensor)."""
        pieces = [
            (part.names[0], part.in_order(difference[part.rows(difference.shape[0])]))
            for part in extraction_parts(self._names, key, self._options.naming)
        ]
        factors = {}
        dtype = NAME_TO_DTYPE[self._options.dtype]
        for name, piece in pieces:
            rank = layer_rank(tuple(piece.shape), self._options)
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
            if self._device is not None:
                piece = piece.to(self._device)
            up, down = extract(piece, rank, self._options.clamp_quantile, seed >> 1)
            up, down = up.to(dtype).cpu(), down.to(dtype).cpu()
            if not bool(torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise BuildError(
                    f"the LoRA factors extracted at {key} are infinite or NaN in "
                    f"{str(dtype).removeprefix('torch.')} (the difference there reaches "
                    f"{float(difference.abs().max()):g}); use a wider dtype, or check the "
                    "models; no output was written"
                )
            factors[name] = (up, down)
        peak = float(difference.abs().max()) if is_text_encoder(key) else 0.0
        with self._lock:
            self._factors.update(factors)
            if is_text_encoder(key):
                self._text_encoder_modules.update(factors)
            self._text_encoder_peak = max(self._text_encoder_peak, peak)

    def content_digest(self, tensor_digests: Mapping[str, str]) -> None:
        """None: the file is read back to be digested (its tensors are factors of
        the keys written)."""

    def finish(self) -> None:
        """Write the factors into the temporary file (text encoders dropped when
        `auto` finds their differences all within kohya's 0.01)."""
        modules = self._factors
        unchanged = self._text_encoder_peak <= TEXT_ENCODER_MIN_DIFFERENCE
        if self._options.text_encoder == "auto" and unchanged:
            modules = {n: f for n, f in modules.items() if n not in self._text_encoder_modules}
        if self._options.naming == "peft":
            factors, metadata = peft_file(modules)
        else:
            factors, metadata = self._kohya_file(modules)
        metadata = {**self._metadata, **metadata}
        infos = {key: TensorInfo(t.dtype, tuple(t.shape)) for key, t in sorted(factors.items())}
        self._writer = SafetensorsWriter(self.path, infos, metadata)
        try:
            for key in infos:
                self._writer.write_tensor(key, factors[key])
            self._writer.finish()
        except BaseException:
            self._writer.abort()
            raise

    def _kohya_file(
        self, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """kohya's tensors (alpha = rank: scale 1) and training metadata."""
        factors = {}
        ranks = []
        for name, (up, down) in modules.items():
            rank = down.shape[0]
            factors[f"{name}.lora_up.weight"] = up
            factors[f"{name}.lora_down.weight"] = down
            factors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=up.dtype)
            ranks.append((rank, down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)))
        rank = max((r for r, conv in ranks if not conv), default=self._options.rank)
        conv_rank = max((r for r, conv in ranks if conv), default=self._options.conv_rank)
        return factors, lora_metadata(self._family, rank, conv_rank)

    def publish(self) -> None:
        """Rename the finished file into place."""
        assert self._writer is not None
        self._writer.publish()

    def abort(self) -> None:
        """Discard the temporary file."""
        if self._writer is not None:
            self._writer.abort()
