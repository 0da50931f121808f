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
import dataclasses
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrecipe.adapters.naming import LOCON_LAYERS, LORA_LAYERS
from sdrecipe.arch import DDPM_SCHEDULE_BUFFERS, PREDICTION_MARKERS, layout
from sdrecipe.arch.family import family
from sdrecipe.io.safetensors_writer import SafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo


@dataclass(frozen=True)
class ModelSpec:
    """A synthetic model: family, variant (the input layer's width, from the
    family file), `layout` (the family's own when None: e.g. `flux1-schnell` or
    `flux1-dev-aio` for family `flux1`), value seed, an optional fine-tune
    delta, optionally the DDPM schedule buffers of an LDM checkpoint, its
    scaled-linear betas ending at `beta_end` (SD's is 0.012), and optionally
    prediction `markers` (`v_pred`, `ztsnr`: empty float32 tensors, as NoobAI-XL
    and Illustrious v-prediction checkpoints carry them)."""

    family: str = "sd1"
    variant: str = "normal"
    shrink: int = 1
    seed: int = 0
    delta_seed: int | None = None
    dtype: torch.dtype = torch.float16
    beta_end: float | None = None
    markers: tuple[str, ...] = ()
    layout: str | None = None


def schedule_buffers(beta_end: float, beta_start: float = 0.00085) -> dict[str, torch.Tensor]:
    """The 12 DDPM schedule buffers LDM's `register_schedule` stores (1000 steps,
    scaled-linear betas), computed in float64 and stored in float32 as LDM does."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, 1000, dtype=torch.float64) ** 2
    cumprod = torch.cumprod(1.0 - betas, 0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - previous) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": cumprod.reciprocal().sqrt(),
        "sqrt_recipm1_alphas_cumprod": (cumprod.reciprocal() - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - cumprod),
    }
    return {key: value.float() for key, value in buffers.items()}


def shrink_dim(dim: int, shrink: int) -> int:
    """Divide the widths (multiples of 64) by `shrink`; keep kernels, channels and token counts."""
    return dim // shrink if shrink > 1 and dim >= 64 and dim % 64 == 0 else dim


def model_layout(spec: ModelSpec) -> dict[str, TensorInfo]:
    """Key → dtype and shape of the synthetic model, in the real checkpoint's key order.

    Widths shrink; the dims a family file keeps (channel counts, patch
    positions) and the variant's input width do not."""
    data = family(spec.family)
    name = spec.layout or data.layout
    if name is None:
        raise ValueError(f"family {spec.family} has no reference layout")
    shapes, integer_keys = layout(name)
    prefixes = ("", data.model_prefix) if data.model_prefix else ("",)
    kept = {prefix + key: dims for key, dims in data.keep_dims.items() for prefix in prefixes}
    widths = {name: width for width, name in data.variants.values.items()} if data.variants else {}
    if data.variants and spec.variant not in widths:
        raise ValueError(f"{spec.family} has no variant {spec.variant!r} ({', '.join(widths)})")
    variant_keys = {prefix + data.variants.key for prefix in prefixes} if data.variants else set()
    tensors = {}
    if spec.beta_end is not None:
        tensors = {key: TensorInfo(torch.float32, (1000,)) for key in DDPM_SCHEDULE_BUFFERS}
    for key in spec.markers:
        if key not in PREDICTION_MARKERS:
            raise ValueError(
                f"{key!r} is not a prediction marker ({', '.join(PREDICTION_MARKERS)})"
            )
        tensors[key] = TensorInfo(torch.float32, (0,))
    for key, shape in shapes.items():
        keep = kept.get(key, ())
        new_shape = tuple(
            dim if index in keep else shrink_dim(dim, spec.shrink)
            for index, dim in enumerate(shape)
        )
        if key in variant_keys and spec.variant != "normal":
            dim = data.variants.dim  # type: ignore[union-attr]
            new_shape = (*new_shape[:dim], widths[spec.variant], *new_shape[dim + 1 :])
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
    if key in DDPM_SCHEDULE_BUFFERS and spec.beta_end is not None:
        return schedule_buffers(spec.beta_end)[key]
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


NORM_LAYERS = re.compile(
    r"\.(norm[123]?|in_layers\.0|out_layers\.0|layer_norm[12]|ln_[12])\.weight$"
)


@dataclass(frozen=True)
class AdapterSpec:
    """A synthetic adapter for a synthetic model of `family` (widths divided by `shrink`).

    `algorithm` is lora, loha, lokr or full; `convs` adds the UNet's resnet
    layers (LoCon); `tucker` stores 3x3 layers in CP form; `dora` adds DoRA
    magnitudes (per output row, per input column on every other layer);
    `naming` is kohya, peft (diffusers' `lora_A`/`lora_B` by diffusers tensor,
    LoRA only), xlabs (XLabs' Flux modules, LoRA only) or split (kohya's, with
    sd-scripts' split LoRA for fused layers); `layout` as `ModelSpec`'s.
    """

    family: str = "sd1"
    shrink: int = 1
    algorithm: str = "lora"
    rank: int = 4
    alpha: float | None = 2.0
    seed: int = 0
    convs: bool = False
    tucker: bool = False
    dora: bool = False
    naming: str = "kohya"
    dtype: torch.dtype = torch.float16
    layout: str | None = None


def adapter_tensors(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The adapter's tensors, by file key: one module per patched layer or part
    of one (see `AdapterSpec.naming`), factors seeded by (seed, module name)."""
    from sdrecipe.adapters.naming import ModuleNames, extraction_parts

    tensors: dict[str, torch.Tensor] = {}
    model = model_layout(ModelSpec(family=spec.family, shrink=spec.shrink, layout=spec.layout))
    names = ModuleNames(spec.family, model)
    patched = [
        key
        for key in model
        if LORA_LAYERS.search(key)
        or (spec.convs and LOCON_LAYERS.search(key))
        or (spec.algorithm == "full" and NORM_LAYERS.search(key))
    ]
    for index, key in enumerate(patched):
        shape = model[key].shape
        bias = key.removesuffix("weight") + "bias" in model
        if spec.naming == "xlabs":
            parts = [p for p in names(key) if ".processor." in p.names[0]]
        else:
            style = "peft" if spec.naming == "peft" else "kohya"
            parts = extraction_parts(names, key, style)
        for part in parts:
            name = part.names[0]
            rows = part.rows(shape[0])
            split = spec.naming == "split" and [
                p.rows(shape[0])
                for p in extraction_parts(names, key, "peft")
                if not p.whole and not p.swapped
            ]
            if split and part.whole:
                factors = _split_factors(spec, shape, name, split)
            else:
                factors = _module_factors(
                    spec, (rows.stop - rows.start, *shape[1:]), name, index, bias
                )
            renamed = ADAPTER_PARAMETERS.get(spec.naming, {})
            if renamed:
                factors = {renamed.get(p, p): t for p, t in factors.items() if p != "alpha"}
            tensors.update({f"{name}.{parameter}": t for parameter, t in factors.items()})
    return tensors


# Factor names by `AdapterSpec.naming`, where they are not kohya's (which also
# stores alpha; these do not).
ADAPTER_PARAMETERS = {
    "peft": {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"},
    "xlabs": {"lora_up.weight": "up.weight", "lora_down.weight": "down.weight"},
}


def _split_factors(
    spec: AdapterSpec, shape: tuple[int, ...], name: str, parts: list[slice]
) -> dict[str, torch.Tensor]:
    """sd-scripts' split LoRA of a fused layer: a down and an up per part, one alpha."""
    rank = max(1, min(spec.rank, shape[1]))
    factors = {}
    for index, rows in enumerate(parts):
        for side, dims in (("down", (rank, shape[1])), ("up", (rows.stop - rows.start, rank))):
            seed = f"{name}:{side}:{index}"
            factors[f"lora_{side}.{index}.weight"] = (
                _random(seed, spec.seed, dims).mul_(0.1).to(spec.dtype)
            )
    if spec.alpha is not None:
        factors["alpha"] = torch.tensor(spec.alpha)
    return factors


def _module_factors(
    spec: AdapterSpec, shape: tuple[int, ...], name: str, index: int, bias: bool
) -> dict[str, torch.Tensor]:
    """One module's factors for a layer of `shape` (the rank is capped by its
    sizes); a full module patches the layer's bias too, if it has one, on every
    other layer."""
    out, inputs, kernel = shape[0], shape[1] if len(shape) > 1 else 1, tuple(shape[2:])
    rank = max(1, min(spec.rank, out, inputs))

    def noise(*dims: int) -> torch.Tensor:
        return _random(f"{name}:{len(dims)}:{dims}", spec.seed, dims).mul_(0.1).to(spec.dtype)

    cp = spec.tucker and kernel not in ((), (1, 1))
    factors: dict[str, torch.Tensor] = {}
    if len(shape) == 1:
        factors = {"w_norm": noise(out), **({"b_norm": noise(out)} if bias else {})}
    elif spec.algorithm == "lora":
        if cp:
            factors = {
                "lora_down.weight": noise(rank, inputs, 1, 1),
                "lora_mid.weight": noise(rank, rank, *kernel),
                "lora_up.weight": noise(out, rank, 1, 1),
            }
        else:
            ones = (1,) * len(kernel)
            factors = {
                "lora_down.weight": noise(rank, inputs, *kernel),
                "lora_up.weight": noise(out, rank, *ones),
            }
    elif spec.algorithm == "loha":
        if cp:
            factors = {
                f"hada_{p}": t
                for i in "12"
                for p, t in (
                    (f"t{i}", noise(rank, rank, *kernel)),
                    (f"w{i}_a", noise(rank, out)),
                    (f"w{i}_b", noise(rank, inputs)),
                )
            }
        else:
            width = inputs * math.prod(kernel)
            factors = {
                f"hada_w{i}_{p}": noise(*dims)
                for i in "12"
                for p, dims in (("a", (out, rank)), ("b", (rank, width)))
            }
    elif spec.algorithm == "lokr":
        a, c = _small_factor(out), _small_factor(inputs)
        b, d = out // a, inputs // c
        style = index % 3  # both halves whole, the first a product, the second a product
        factors["lokr_w1"] = noise(a, c)
        if style == 1:
            factors = {"lokr_w1_a": noise(a, rank), "lokr_w1_b": noise(rank, c)}
        if style == 2 and cp:
            factors |= {
                "lokr_t2": noise(rank, rank, *kernel),
                "lokr_w2_a": noise(rank, b),
                "lokr_w2_b": noise(rank, d),
            }
        elif style == 2:
            factors |= {"lokr_w2_a": noise(b, rank), "lokr_w2_b": noise(rank, d, *kernel)}
        else:
            factors["lokr_w2"] = noise(b, d, *kernel)
    else:
        factors = {"diff": noise(*shape)}
        if bias and index % 2 == 0:
            factors["diff_b"] = noise(out)
    if spec.alpha is not None and spec.algorithm != "full" and len(shape) > 1:
        factors["alpha"] = torch.tensor(spec.alpha)
    if spec.dora and len(shape) > 1 and spec.algorithm != "full":
        magnitude = (
            (1, inputs, *(1,) * len(kernel)) if index % 2 else (out, *(1,) * (len(shape) - 1))
        )
        factors["dora_scale"] = noise(*magnitude).abs_().add_(0.5)
    return factors


def _small_factor(dim: int) -> int:
    """The smallest divisor of `dim` above 1 (the dim itself when prime)."""
    return next((f for f in range(2, math.isqrt(dim) + 1) if dim % f == 0), dim)


def write_adapter(path: Path, spec: AdapterSpec) -> Path:
    """Write the synthetic adapter to `path` (atomically)."""
    tensors = adapter_tensors(spec)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank)}
    writer = SafetensorsWriter(
        path, {k: TensorInfo(t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata
    )
    try:
        for key, tensor in tensors.items():
            writer.write_tensor(key, tensor.contiguous())
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
    "sd15-style-lora.safetensors": AdapterSpec(rank=8, alpha=4.0, seed=7, convs=True),
    # Flux.1 at a 32nd of its width (23 MB a file): the Fill transplant's demo.
    "flux1-fill.safetensors": ModelSpec(family="flux1", variant="fill", seed=11, shrink=32),
    "flux1-dev.safetensors": ModelSpec(family="flux1", seed=12, shrink=32),
    "flux1-my-finetune.safetensors": ModelSpec(family="flux1", seed=12, delta_seed=13, shrink=32),
}


def write_model_set(
    folder: Path, models: Mapping[str, ModelSpec | AdapterSpec], shrink: int
) -> list[Path]:
    """Write each model or adapter of `models` into `folder` unless it is already
    there, with widths divided by `shrink` or by the spec's own, if larger."""
    paths = []
    for name, spec in models.items():
        path = folder / name
        if not path.exists():
            sized = dataclasses.replace(spec, shrink=max(shrink, spec.shrink))
            if isinstance(sized, AdapterSpec):
                write_adapter(path, sized)
            else:
                write_model(path, sized)
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
