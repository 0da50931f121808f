"""How quantized outputs store each tensor.

- fp8 (`dtype: fp8_e4m3fn | fp8_e5m2`): tensors of two or more dimensions in
  fp8, as the public fp8 releases are; 1-D tensors (norms, biases) and the VAE
  in bf16. Torch rounds to nearest even and saturates e4m3fn, so a value past
  the format's largest is refused, not clipped.
- scaled fp8 (`scaled: true`, ComfyUI's form): each matrix of the diffusion
  model divided by a scale (its largest magnitude over the format's largest)
  before rounding, the scale written as `<layer>.scale_weight`, and an empty
  `scaled_fp8` marker beside the model's keys; every other tensor in bf16.
- GGUF (`format: gguf`, `quant:`): the diffusion model's tensors under their
  names without the model prefix; matrices whose rows are whole blocks in the
  `quant` type, 1-D and small tensors (<= 1,024 values) in F32 and other
  tensors in F16, as city96's converter does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdrecipe.arch import component_of
from sdrecipe.io import ggml_quants
from sdrecipe.io.tensor_info import TensorInfo

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
SCALE_SUFFIX = "scale_weight"
SCALED_MARKER = "scaled_fp8"
# Tensors of at most this many values stay F32 in a GGUF (city96's QUANTIZATION_THRESHOLD).
GGUF_SMALL = 1024
_KEPT_WIDE = ("vae",)


@dataclass(frozen=True)
class ScaledFp8:
    """A matrix stored as fp8 values over a scale written to `scale_key`."""

    dtype: torch.dtype
    scale_key: str

    whole = True  # the scale needs the whole tensor's largest magnitude
    holds_non_finite = False

    def describe(self) -> str:
        return f"scaled {str(self.dtype).removeprefix('torch.')}"

    def scale(self, largest: float) -> float:
        """The scale for a tensor whose largest magnitude is `largest`."""
        return largest / FP8_MAX[self.dtype] if largest > 0 else 1.0

    def encode(self, values: torch.Tensor, scale: float) -> torch.Tensor:
        """`values` over `scale`, in fp8, as bytes."""
        limit = FP8_MAX[self.dtype]
        stored = (values.to(torch.float32) / scale).clamp_(-limit, limit).to(self.dtype)
        return stored.reshape(-1).view(torch.uint8)

    def companions(self, scale: float) -> dict[str, torch.Tensor]:
        """The scale tensor."""
        return {self.scale_key: torch.tensor(scale, dtype=torch.float32)}


@dataclass(frozen=True)
class GgmlType:
    """A tensor stored as GGML `type_name` blocks, row after row."""

    type_name: str

    whole = False

    @property
    def holds_non_finite(self) -> bool:
        """F32, F16 and BF16 hold NaN and infinity; blocks' scales do not."""
        return self.type_name in ("F32", "F16", "BF16")

    def describe(self) -> str:
        return f"GGUF {self.type_name}"

    def encode(self, values: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """`values` (whole rows) as GGML blocks."""
        rows = values.to(torch.float32).reshape(-1, values.shape[-1] if values.dim() else 1)
        return ggml_quants.quantize(rows.contiguous(), self.type_name)

    def companions(self, scale: float | None = None) -> dict[str, torch.Tensor]:
        """Nothing beside the tensor."""
        return {}

    def stored(self, info: TensorInfo) -> TensorInfo:
        """The bytes the tensor takes, as a flat uint8 tensor."""
        return TensorInfo(torch.uint8, (ggml_quants.stored_nbytes(self.type_name, info.numel),))


Encoding = ScaledFp8 | GgmlType


def fp8_dtype(
    key: str, info: TensorInfo, family: str, target: torch.dtype, scaled: bool
) -> torch.dtype:
    """The dtype `key` is written in by an fp8 output."""
    component = component_of(key, family)
    if component in _KEPT_WIDE or len(info.shape) < 2:
        return torch.bfloat16
    if scaled and not is_scaled_matrix(key, info, family):
        return torch.bfloat16
    return target


def is_scaled_matrix(key: str, info: TensorInfo, family: str) -> bool:
    """True for the tensors a scaled-fp8 output scales: the diffusion model's
    matrices (what ComfyUI's scaled fp8 Linear layers hold)."""
    return (
        len(info.shape) == 2
        and key.endswith(".weight")
        and component_of(key, family) in ("unet", "transformer")
    )


def scale_key(key: str) -> str:
    """`<layer>.weight` → `<layer>.scale_weight`."""
    return f"{key.removesuffix('.weight')}.{SCALE_SUFFIX}"


def gguf_type(info: TensorInfo, quant: str) -> str:
    """The GGML type a GGUF output stores a tensor of `info` in, for `quant`."""
    if len(info.shape) < 2 or info.numel <= GGUF_SMALL:
        return "F32"
    if quant in ("F32", "F16", "BF16"):
        return quant
    elements, _ = ggml_quants.block_size(quant)
    return quant if info.shape[-1] % elements == 0 else "F16"
