"""Architecture knowledge kept as data: key layouts and keys with special rules."""

from __future__ import annotations

import json
from functools import cache, lru_cache
from importlib import resources

EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
UNET_INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"

# CLIP's position ids: an index table, never merged (averaging corrupts the text encoder).
CLIP_POSITION_IDS = "text_model.embeddings.position_ids"
# The buffers LDM's `register_schedule` stores at the top level of a checkpoint:
# the DDPM noise schedule, a constant of the sampler rather than a weight.
DDPM_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# Empty top-level tensors that tell a UI how to sample the model, read for their
# presence only: NoobAI-XL and Illustrious v-prediction SDXL checkpoints carry
# them (A1111 PR #16567; ComfyUI's SDXL `model_type`). Not weights: never merged,
# kept from the base as they are. Key -> what it marks.
V_PREDICTION_MARKER = "v_pred"
ZERO_TERMINAL_SNR_MARKER = "ztsnr"
PREDICTION_MARKERS = {
    V_PREDICTION_MARKER: "v-prediction marker",
    ZERO_TERMINAL_SNR_MARKER: "zero terminal SNR marker",
}


# The component each key prefix belongs to, most specific first, where the
# family is not known (the SD families' prefixes); a family's own file says it
# for its models (`sdrecipe.arch.family`).
COMPONENT_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    (VAE_PREFIX, "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    (EMA_PREFIX, "ema"),
)


COMPONENTS = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "ema",
    "other",
)


@lru_cache(maxsize=1 << 16)  # asked for every key of every node while planning
def component_of(key: str, family: str = "unknown") -> str:
    """The component of `key` in a model of `family`: one of `COMPONENTS`."""
    from sdrecipe.arch.family import known

    data = known(family)
    if data is not None and data.components:
        return data.component_of(key)
    return next((name for prefix, name in COMPONENT_PREFIXES if key.startswith(prefix)), "other")


def family_components(family: str) -> frozenset[str] | None:
    """The components a model of `family` has (None for an unknown family)."""
    from sdrecipe.arch.family import known

    data = known(family)
    if data is None or not data.components:
        return None
    return frozenset({c.name for c in data.components} | {data.unprefixed})


def vae_prefix(family: str) -> str:
    """Where a checkpoint of `family` keeps its VAE (`first_stage_model.`, or
    `vae.` in ComfyUI's Flux.1 checkpoints)."""
    from sdrecipe.arch.family import known

    data = known(family)
    prefix = next((c.prefix for c in data.components if c.name == "vae"), None) if data else None
    return prefix or VAE_PREFIX


# Old SD1 checkpoints name the CLIP text model without `text_model.`.
_SD1_CLIP = "cond_stage_model.transformer."
LEGACY_KEY_PREFIXES = {
    _SD1_CLIP + part: _SD1_CLIP + "text_model." + part
    for part in ("embeddings.", "encoder.", "final_layer_norm.")
}


def normalise_key(key: str) -> str:
    """The current name of a key that old checkpoints spell differently."""
    for old, new in LEGACY_KEY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@lru_cache(maxsize=1 << 16)
def never_merged_reason(key: str) -> str | None:
    """Why `key` always keeps the base model's value, or None if it may be merged.

    CLIP's position ids are an index table. The DDPM schedule buffers lie
    outside every network and are constants of the sampler, not weights; A1111
    (which merges only keys containing `model`) and sd-meh keep them from A too.
    The prediction markers (`v_pred`, `ztsnr`) hold no values: only their
    presence in the base says anything.
    """
    if key.endswith(CLIP_POSITION_IDS):
        return "CLIP position ids"
    if key in DDPM_SCHEDULE_BUFFERS:
        return "sampler schedule buffer"
    return PREDICTION_MARKERS.get(key)


@cache
def layout(family: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """The real key→shape layout of a full-size `family` checkpoint and its integer keys."""
    text = resources.files(__package__).joinpath("layouts", f"{family}.json").read_text()
    data = json.loads(text)
    shapes = {key: tuple(shape) for key, shape in data["shapes"].items()}
    return shapes, frozenset(data["integer_keys"])
