"""Streaming, atomic writing of diffusers folders from single-file keys.

The executor writes single-file tensors, in pieces, as it does into a
safetensors file; this writer routes each piece to its place in the
component files (`unet/diffusion_pytorch_model.safetensors` or
`transformer/...`, `text_encoder/model.safetensors`, ...). Fused projections
(OpenCLIP's q/k/v, Flux's and SD3's q/k/v, Flux's q/k/v/MLP `linear1`) are
split by byte range, and modulations whose halves diffusers keeps the other
way round are swapped by byte range too; OpenCLIP's text projection, which
must be transposed, is held until complete (at most a few MB). Everything is
written into a hidden temporary folder, which replaces the target only when
complete.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from sdrecipe.arch import CLIP_POSITION_IDS
from sdrecipe.arch.detect import Architecture
from sdrecipe.arch.diffusers_configs import (
    FAMILIES,
    model_index,
    scheduler_config,
    t5_config,
    text_encoder_config,
    transformer_config,
    unet_config,
    vae_config,
)
from sdrecipe.arch.diffusers_names import COMPONENTS, DiffusersNaming, Source
from sdrecipe.errors import BuildError
from sdrecipe.io.atomic import temporary_path
from sdrecipe.io.sharded_writer import ComponentWriter, open_safetensors_writer
from sdrecipe.io.tensor_info import TensorInfo

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
    "text_encoder_3": "model.safetensors",
}
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# The folders whose weights file carries the output's metadata (its provenance).
MODEL_FOLDERS = ("unet", "transformer")
# diffusers and transformers mark their safetensors files this way.
COMPONENT_METADATA = {"format": "pt"}
_OPEN_CLIP_LAYER = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


def _stored_info(source: Source, info: TensorInfo) -> TensorInfo:
    """The dtype and shape a single-file tensor is stored with in a diffusers folder."""
    if source.kind == "conv1x1":
        return TensorInfo(info.dtype, info.shape[:2])
    if source.kind == "transpose":
        return TensorInfo(info.dtype, tuple(reversed(info.shape)))
    if source.kind == "qkv":
        return TensorInfo(info.dtype, (info.shape[0] // 3, *info.shape[1:]))
    return info


def _split_infos(source: Source, info: TensorInfo) -> list[TensorInfo]:
    """The stored tensors a `split` tensor's rows go to, in the proportions `parts`."""
    rows, total = info.shape[0], sum(source.parts)
    if rows % total:
        raise BuildError(
            f"cannot split {info.shape[0]} rows into the parts {source.parts} of "
            f"{', '.join(source.keys)}"
        )
    return [
        TensorInfo(info.dtype, (rows // total * part, *info.shape[1:])) for part in source.parts
    ]


def diffusers_layout(
    family: str, tensors: Mapping[str, TensorInfo], model_prefix: str | None = None
) -> tuple[dict[str, Source], dict[str, dict[str, TensorInfo]]]:
    """Where each single-file tensor goes, and each component's stored tensors.

    Not kept, as in diffusers' own conversion: EMA weights, OpenCLIP's
    `logit_scale`, CLIP's position ids (recreated on load), and SD2's last
    text-encoder layer (SD2 conditions on the penultimate layer, so its
    diffusers text encoder has one layer fewer). The prediction markers
    (`v_pred`, `ztsnr`) have no place either: the scheduler config says it.
    Keys outside every component (the `logit_scale` of ComfyUI's text
    encoders) are not kept. `model_prefix` is where detection found the
    model's keys: empty for a file without prefixes (Flux.1 as BFL ships it).
    """
    sd2_layers = [int(m[1]) for key in tensors if (m := _OPEN_CLIP_LAYER.match(key))]
    sd2_unused = max(sd2_layers) if family == "sd2" and sd2_layers else None
    naming = DiffusersNaming(family, tensors, model_prefix)
    routes: dict[str, Source] = {}
    components: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        try:
            source = naming.source(key)
        except KeyError:
            raise BuildError(
                f"{key} has no name in a {family} diffusers folder (a key the family's "
                "layout does not have)"
            ) from None
        layer = _OPEN_CLIP_LAYER.match(key)
        if source is None or key.endswith(CLIP_POSITION_IDS):
            continue
        if layer is not None and int(layer[1]) == sd2_unused:
            continue
        routes[key] = source
        if source.kind == "swap" and (not info.shape or info.shape[0] % 2):
            raise BuildError(f"{key} of shape {list(info.shape)} has no two halves to swap")
        if source.kind == "split":
            stored_parts = _split_infos(source, info)
        else:
            stored_parts = [_stored_info(source, info)] * len(source.keys)
        for name, stored in zip(source.keys, stored_parts, strict=True):
            components.setdefault(source.component, {})[name] = stored
    return routes, components


class DiffusersWriter:
    """Writes one diffusers folder through a temporary folder; `commit()` publishes it.

    Tensors are given by single-file key and may be written in pieces, in any
    order, from any thread (each key from one thread at a time).
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        architecture: Architecture,
        tokenizers: Mapping[str, Path],
        drop_written: bool = False,
        max_shard_size: int | None = None,
    ):
        self.path = path
        self.temporary = temporary_path(path)
        self.architecture = architecture
        self.tokenizers = dict(tokenizers)
        self.tensors = tensors
        self.routes, self.components = diffusers_layout(
            architecture.family, tensors, architecture.model_prefix
        )
        if max_shard_size is None:
            # A family may shard by default, as diffusers' save_pretrained does (10 GB).
            max_shard_size = FAMILIES[architecture.family].get("max_shard_size")
        self._pending: dict[str, bytearray] = {}
        self._received: Counter[str] = Counter()
        try:
            if path.exists() and not path.is_dir():
                raise BuildError("a diffusers output must be a folder, and a file is there", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary.mkdir()
        except OSError as exc:
            raise BuildError(f"cannot create the output: {exc.strerror or exc}", path) from None
        self._writers: dict[str, ComponentWriter] = {}
        try:
            for component, stored in self.components.items():
                # With `max_shard_size`, each weights file is shards behind an index.
                self._writers[component] = open_safetensors_writer(
                    self.temporary / component / WEIGHT_FILES[component],
                    stored,
                    {**COMPONENT_METADATA, **metadata}
                    if component in MODEL_FOLDERS
                    else COMPONENT_METADATA,
                    max_shard_size,
                    drop_written=drop_written,
                )
        except BaseException:
            self.abort()
            raise

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of single-file tensor `key` as the executor writes it."""
        return self.tensors[key]

    def write(self, key: str, data: memoryview | bytes, start: int = 0) -> None:
        """Write bytes of single-file tensor `key`, beginning `start` bytes into its data."""
        source = self.routes.get(key)
        if source is None:
            return
        writer = self._writers[source.component]
        if source.kind in ("same", "conv1x1"):
            writer.write(source.keys[0], data, start)
        elif source.kind in ("qkv", "split"):
            self._write_split(writer, source, memoryview(data).cast("B"), start)
        elif source.kind == "swap":
            self._write_swapped(writer, key, source, memoryview(data).cast("B"), start)
        else:
            self._write_transposed(writer, key, source, data, start)

    def _write_split(
        self, writer: ComponentWriter, source: Source, view: memoryview, start: int
    ) -> None:
        """Rows concatenated along dim 0 are consecutive byte ranges, one per stored part."""
        ends = list(itertools.accumulate(writer.info(name).nbytes for name in source.keys))
        position = start
        while view:
            index = bisect.bisect_right(ends, position)
            offset = position - (ends[index - 1] if index else 0)
            length = min(len(view), ends[index] - position)
            writer.write(source.keys[index], view[:length], offset)
            view = view[length:]
            position += length

    def _write_swapped(
        self, writer: ComponentWriter, key: str, source: Source, view: memoryview, start: int
    ) -> None:
        """The first half of the rows is stored second, and the second first."""
        half = self.tensors[key].nbytes // 2
        position = start
        while view:
            if position < half:
                length, target = min(len(view), half - position), position + half
            else:
                length, target = len(view), position - half
            writer.write(source.keys[0], view[:length], target)
            view = view[length:]
            position += length

    def _write_transposed(
        self,
        writer: ComponentWriter,
        key: str,
        source: Source,
        data: memoryview | bytes,
        start: int,
    ) -> None:
        info = self.tensors[key]
        buffer = self._pending.setdefault(key, bytearray(info.nbytes))
        view = memoryview(data).cast("B")
        buffer[start : start + len(view)] = view
        self._received[key] += len(view)
        if self._received[key] == info.nbytes:
            whole = torch.frombuffer(buffer, dtype=info.dtype).view(info.shape)
            writer.write_tensor(source.keys[0], whole.t().contiguous())
            del self._pending[key]

    def content_digest(self, tensor_digests: Mapping[str, str]) -> None:
        """None: the folder is read back to be digested (its files hold the keys
        renamed and reshaped)."""

    def finish(self) -> None:
        """Finish the weights, write the configs and copy the tokenizers;
        `publish` then puts the folder in place."""
        for writer in self._writers.values():
            writer.commit()
        try:
            for name, content in self._configs().items():
                (self.temporary / name).parent.mkdir(exist_ok=True)
                (self.temporary / name).write_text(json.dumps(content, indent=2) + "\n")
            for name, source in self.tokenizers.items():
                shutil.copytree(source, self.temporary / name)
        except OSError as exc:
            self.abort()
            raise BuildError(f"cannot write the output: {exc.strerror or exc}", self.path) from None

    def _configs(self) -> dict[str, dict]:
        family = self.architecture.family
        prediction = self.architecture.prediction or "epsilon"
        shapes = {
            component: {name: info.shape for name, info in stored.items()}
            for component, stored in self.components.items()
        }
        pooled = shapes.get("text_encoder_2", {}).get("text_projection.weight", (None,))[0]
        configs: dict[str, dict] = {
            "model_index.json": model_index(
                family, self.architecture.variant, {*self.components, *self.tokenizers}
            ),
            "scheduler/scheduler_config.json": scheduler_config(
                family, prediction, self.architecture.zero_terminal_snr, self.architecture.kind
            ),
        }
        if "unet" in shapes:
            configs["unet/config.json"] = unet_config(family, shapes["unet"], pooled, prediction)
        if "transformer" in shapes:
            configs["transformer/config.json"] = transformer_config(family, shapes["transformer"])
        if "vae" in shapes:
            configs["vae/config.json"] = vae_config(family, shapes["vae"])
        schemes = {folder: scheme for _, folder, scheme in COMPONENTS[family]}
        for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if component in shapes:
                config = t5_config if schemes.get(component) == "t5" else text_encoder_config
                configs[f"{component}/config.json"] = config(family, component, shapes[component])
        return configs

    def publish(self) -> None:
        """Swap the finished folder in; an old output goes only once the new one is there.

        The old folder is one sdrecipe wrote (`sdrecipe.plan.guard` checked it)."""
        old = temporary_path(self.path, unique=True) if self.path.exists() else None
        try:
            if old is not None:
                os.replace(self.path, old)
            try:
                os.replace(self.temporary, self.path)
            except OSError:
                if old is not None:
                    os.replace(old, self.path)
                raise
        except OSError as exc:
            raise BuildError(
                f"cannot publish the output: {exc.strerror or exc}", self.path
            ) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard the temporary folder; the target is left as it was."""
        for writer in self._writers.values():
            writer.abort()
        shutil.rmtree(self.temporary, ignore_errors=True)
