"""Synthetic checkpoints with real key names and shapes and random values.

For tests, the demo (`make demo`) and benchmarks only: no build uses it.

Model hubs are out of reach for tests, demos and benchmarks, so sdrecipe makes
its own models: the real layout of a family (from `sdrecipe.arch` data), with
widths optionally divided by `shrink`, written tensor by tensor. Values are a
deterministic function of (seed, key), so a "fine-tune" is its base plus a
small, seeded delta.
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrecipe.arch import UNET_INPUT_CONV, layout
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo

INPUT_CHANNELS = {"normal": None, "inpainting": 9, "instruct-pix2pix": 8}


@dataclass(frozen=True)
class ModelSpec:
    """A synthetic model: family layout, variant, value seed, and an optional fine-tune delta."""

    family: str = "sd1"
    variant: str = "normal"
    shrink: int = 1
    seed: int = 0
    delta_seed: int | None = None
    dtype: torch.dtype = torch.float16


def shrink_dim(dim: int, shrink: int) -> int:
    """Divide the widths (multiples of 64) by `shrink`; keep kernels, channels and token counts."""
    return dim // shrink if shrink > 1 and dim >= 64 and dim % 64 == 0 else dim


def model_layout(spec: ModelSpec) -> dict[str, TensorInfo]:
    """Key → dtype and shape of the synthetic model, in the real checkpoint's key order."""
    shapes, integer_keys = layout(spec.family)
    tensors = {}
    for key, shape in shapes.items():
        new_shape = tuple(shrink_dim(dim, spec.shrink) for dim in shape)
        if key == UNET_INPUT_CONV and INPUT_CHANNELS[spec.variant]:
            new_shape = (new_shape[0], INPUT_CHANNELS[spec.variant], *new_shape[2:])
        dtype = torch.int64 if key in integer_keys else spec.dtype
        tensors[key] = TensorInfo(dtype, new_shape)
    return tensors


def _random(key: str, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    # torch's CPU generator uses only the low 32 bits of a seed: hash both into 32.
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    return torch.randn(shape, generator=generator)


def tensor_value(spec: ModelSpec, key: str, info: TensorInfo) -> torch.Tensor:
    """The value of `key`: seeded noise (plus the fine-tune delta), or an index table."""
    if not info.is_floating:
        return torch.arange(info.numel, dtype=info.dtype).reshape(info.shape)
    value = _random(key, spec.seed, info.shape).mul_(0.05)
    if spec.delta_seed is not None:
        value.add_(_random(key, spec.delta_seed, info.shape), alpha=0.005)
    return value.to(info.dtype)


def write_model(path: Path, spec: ModelSpec, metadata: dict[str, str] | None = None) -> Path:
    """Write the synthetic model to `path` (atomically, one tensor at a time)."""
    tensors = model_layout(spec)
    writer = SafetensorsWriter(path, tensors, metadata or {})
    try:
        for key, info in tensors.items():
            writer.write_tensor(key, tensor_value(spec, key, info).contiguous())
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return path


DEMO_MODELS = {
    "sd15-base.safetensors": ModelSpec(seed=1),
    "sd15-finetune.safetensors": ModelSpec(seed=1, delta_seed=2),
    "sd15-inpainting.safetensors": ModelSpec(variant="inpainting", seed=3),
}
# Models that only the other demo recipes use.
EXTRA_DEMO_MODELS = {
    "sd15-other-finetune.safetensors": ModelSpec(seed=1, delta_seed=4),
    "sd15-noise-offset.safetensors": ModelSpec(seed=1, delta_seed=5),
    "sd15-instruct-pix2pix.safetensors": ModelSpec(variant="instruct-pix2pix", seed=6),
}


def write_model_set(folder: Path, models: dict[str, ModelSpec], shrink: int) -> list[Path]:
    """Write each model of `models` into `folder` unless it is already there."""
    paths = []
    for name, spec in models.items():
        path = folder / name
        if not path.exists():
            write_model(path, ModelSpec(**{**spec.__dict__, "shrink": shrink}))
        paths.append(path)
    return paths


def main() -> None:
    """`python -m sdrecipe.synthetic demo FOLDER`: the demo recipes' small SD1.5 models."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("set", choices=["demo"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shrink", type=int, default=8, help="divide widths by this")
    args = parser.parse_args()
    for path in write_model_set(args.folder, {**DEMO_MODELS, **EXTRA_DEMO_MODELS}, args.shrink):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
