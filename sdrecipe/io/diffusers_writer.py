"""Streaming, atomic writing of diffusers folders from single-file keys.

The executor writes single-file tensors, in pieces, as it does into a
safetensors file; this writer routes each piece to its place in the
component files (`unet/diffusion_pytorch_model.safetensors`,
`text_encoder/model.safetensors`, ...). OpenCLIP's fused q/k/v projection is
split by byte range; its text projection, which must be transposed, is held
until complete (at most a few MB). Everything is written into a hidden
temporary folder, which replaces the target only when complete.
"""

from __future__ import annotations

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
    model_index,
    scheduler_config,
    text_encoder_config,
    unet_config,
    vae_config,
)
from sdrecipe.arch.diffusers_names import Source, diffusers_source
from sdrecipe.errors import BuildError
from sdrecipe.io.atomic import temporary_path
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
TOKENIZERS = ("tokenizer", "tokenizer_2")
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


def diffusers_layout(
    family: str, tensors: Mapping[str, TensorInfo]
) -> tuple[dict[str, Source], dict[str, dict[str, TensorInfo]]]:
    """Where each single-file tensor goes, and each component's stored tensors.

    Not kept, as in diffusers' own conversion: EMA weights, OpenCLIP's
    `logit_scale`, CLIP's position ids (recreated on load), and SD2's last
    text-encoder layer (SD2 conditions on the penultimate layer, so its
    diffusers text encoder has one layer fewer). The prediction markers
    (`v_pred`, `ztsnr`) have no place either: the scheduler config says it.
    """
    sd2_layers = [int(m[1]) for key in tensors if (m := _OPEN_CLIP_LAYER.match(key))]
    sd2_unused = max(sd2_layers) if family == "sd2" and sd2_layers else None
    routes: dict[str, Source] = {}
    components: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        source = diffusers_source(family, key)
        layer = _OPEN_CLIP_LAYER.match(key)
        if source is None or key.endswith(CLIP_POSITION_IDS):
            continue
        if layer is not None and int(layer[1]) == sd2_unused:
            continue
        routes[key] = source
        stored = _stored_info(source, info)
        for name in source.keys:
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
    ):
        self.path = path
        self.temporary = temporary_path(path)
        self.architecture = architecture
        self.tokenizers = dict(tokenizers)
        self.tensors = tensors
        self.routes, self.components = diffusers_layout(architecture.family, tensors)
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
        self._writers: dict[str, SafetensorsWriter] = {}
        try:
            for component, stored in self.components.items():
                self._writers[component] = SafetensorsWriter(
                    self.temporary / component / WEIGHT_FILES[component],
                    stored,
                    {**COMPONENT_METADATA, **metadata}
                    if component == "unet"
                    else COMPONENT_METADATA,
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
        elif source.kind == "qkv":
            self._write_split(writer, source, memoryview(data).cast("B"), start)
        else:
            self._write_transposed(writer, key, source, data, start)

    def _write_split(
        self, writer: SafetensorsWriter, source: Source, view: memoryview, start: int
    ) -> None:
        part = self._writers[source.component].info(source.keys[0]).nbytes
        position = start
        while view:
            index, offset = divmod(position, part)
            length = min(len(view), part - offset)
            writer.write(source.keys[index], view[:length], offset)
            view = view[length:]
            position += length

    def _write_transposed(
        self,
        writer: SafetensorsWriter,
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
                family, prediction, self.architecture.zero_terminal_snr
            ),
        }
        if "unet" in shapes:
            configs["unet/config.json"] = unet_config(family, shapes["unet"], pooled, prediction)
        if "vae" in shapes:
            configs["vae/config.json"] = vae_config(family, shapes["vae"])
        for component in ("text_encoder", "text_encoder_2"):
            if component in shapes:
                configs[f"{component}/config.json"] = text_encoder_config(
                    family, component, shapes[component]
                )
        return configs

    def publish(self) -> None:
        """Swap the finished folder in; an old output goes only once the new one is there.

        The old folder is one sdrecipe wrote (`sdrecipe.guard` checked it)."""
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
