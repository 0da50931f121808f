"""What a checkpoint is, told from its key names and shapes alone (no tensor data).

Structure decides first: which text encoders exist, whether the UNet has a
`label_emb` (SDXL), how many input blocks it has, whether `proj_in` is a
linear layer or a 1x1 convolution, and how many channels `conv_in` takes.
Absolute widths are never needed, so detection also works on shrunken test
models. A layout none of the rules fits is `unknown`, with the prefixes found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sdrecipe.arch import (
    UNET_INPUT_CONV,
    UNET_PREFIX,
    V_PREDICTION_MARKER,
    VARIANT_BY_INPUT_CHANNELS,
    ZERO_TERMINAL_SNR_MARKER,
)
from sdrecipe.io.tensor_info import TensorInfo

# Text-encoder markers: a key that exists only in that family's checkpoints.
TEXT_ENCODER_MARKERS = (
    ("sdxl", "conditioner.embedders.1.model.ln_final.weight"),
    ("sdxl-refiner", "conditioner.embedders.0.model.ln_final.weight"),
    ("sd2", "cond_stage_model.model.ln_final.weight"),
    ("sd1", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
)
SDXL_LABEL_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"
# The highest input block index: SDXL base has three levels, the refiner four.
SDXL_REFINER_LAST_INPUT_BLOCK = 11

# SAI model spec architecture names.
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
}
PREDICTION_METADATA_KEYS = ("modelspec.prediction_type", "prediction_type")


@dataclass(frozen=True)
class Architecture:
    """Family (`sd1`, `sd2`, `sdxl`, `sdxl-refiner` or `unknown`), variant
    (`normal`, `inpainting`, `instruct-pix2pix` or `unknown`), EMA presence,
    prediction type when a `v_pred` marker or the metadata states it, and the
    key prefixes found. `prediction_source` names what stated the prediction
    type; `zero_terminal_snr` is set by a `ztsnr` marker."""

    family: str
    variant: str
    ema: bool
    prediction: str | None
    prefixes: tuple[str, ...]
    prediction_source: str | None = None
    zero_terminal_snr: bool = False

    def describe_prediction(self) -> str | None:
        """e.g. `v (v_pred marker), zero terminal SNR (ztsnr marker)`; None if unknown."""
        parts = []
        if self.prediction is not None:
            parts.append(f"{self.prediction} ({self.prediction_source})")
        if self.zero_terminal_snr:
            parts.append(f"zero terminal SNR ({ZERO_TERMINAL_SNR_MARKER} marker)")
        return ", ".join(parts) or None

    def describe(self) -> str:
        """e.g. `sd1 inpainting` or `unknown (keys under: a., b.)`."""
        if self.family == "unknown":
            return f"unknown (keys under: {', '.join(self.prefixes)})"
        return self.family if self.variant == "normal" else f"{self.family} {self.variant}"

    @property
    def modelspec(self) -> str | None:
        """The SAI model spec architecture name, where one is defined."""
        if self.family == "sd2" and self.prediction == "v":
            return "stable-diffusion-v2-768-v"
        return MODELSPEC_ARCHITECTURE.get(self.family)


def key_prefixes(keys: object) -> tuple[str, ...]:
    """The distinct first two dotted parts of the keys, e.g. `model.diffusion_model.`."""
    return tuple(sorted({".".join(key.split(".")[:2]) + "." for key in keys}))  # type: ignore[attr-defined]


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> Architecture:
    """Detect the architecture from key names, shapes and metadata."""
    family = _family(infos)
    conv_in = infos.get(UNET_INPUT_CONV)
    variant = "unknown"
    if conv_in is not None and len(conv_in.shape) == 4:
        variant = VARIANT_BY_INPUT_CHANNELS.get(conv_in.shape[1], "unknown")
    elif family != "unknown" and not any(key.startswith(UNET_PREFIX) for key in infos):
        variant = "normal"  # no UNet in the file: nothing says otherwise
    # The marker wins over metadata: it is what A1111 and ComfyUI sample by.
    source = next((k for k in PREDICTION_METADATA_KEYS if k in metadata), None)
    prediction = metadata[source] if source is not None else None
    if V_PREDICTION_MARKER in infos:
        prediction, source = "v", f"{V_PREDICTION_MARKER} marker"
    return Architecture(
        family=family,
        variant=variant,
        ema=any(key.startswith("model_ema.") for key in infos),
        prediction=prediction,
        prefixes=key_prefixes(infos),
        prediction_source=source,
        zero_terminal_snr=ZERO_TERMINAL_SNR_MARKER in infos,
    )


def _family(infos: Mapping[str, TensorInfo]) -> str:
    for family, marker in TEXT_ENCODER_MARKERS:
        if marker in infos:
            return family
    return _family_from_unet(infos)


def _family_from_unet(infos: Mapping[str, TensorInfo]) -> str:
    """For UNet-only files: SDXL has a label embedding; SD2's proj_in is linear."""
    if SDXL_LABEL_EMBEDDING in infos:
        last = max(
            (
                int(part)
                for key in infos
                if key.startswith(UNET_PREFIX + "input_blocks.")
                and (part := key.split(".")[3]).isdigit()
            ),
            default=0,
        )
        return "sdxl-refiner" if last >= SDXL_REFINER_LAST_INPUT_BLOCK else "sdxl"
    projections = [info for key, info in infos.items() if key.endswith(".proj_in.weight")]
    if not projections or not any(key.startswith(UNET_PREFIX) for key in infos):
        return "unknown"
    return "sd2" if len(projections[0].shape) == 2 else "sd1"
