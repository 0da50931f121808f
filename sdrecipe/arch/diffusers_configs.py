"""The config files of a diffusers folder, derived from its tensors' shapes.

Widths, depths, channel counts and block types are read off the shapes, so
shrunken test models get configs that match them. What shapes cannot tell
(attention heads, sample sizes, pipeline and scheduler classes, the VAE's
latent scaling) is per-family data, as in the original model configs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

Shapes = Mapping[str, tuple[int, ...]]

DIFFUSERS_VERSION = "0.30.0"
NORM_GROUPS = 32


FAMILIES: dict[str, dict] = {
    "sd1": {
        "attention_heads": 8,
        "sample_size": 64,
        "vae_sample_size": 512,
        "vae_scaling_factor": 0.18215,
        "scheduler": "PNDMScheduler",
        "pipelines": {
            "normal": "StableDiffusionPipeline",
            "inpainting": "StableDiffusionInpaintPipeline",
            "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline",
        },
    },
    "sd2": {
        "attention_heads": [5, 10, 20, 20],
        "sample_size": 64,
        "v_sample_size": 96,
        "vae_sample_size": 768,
        "vae_scaling_factor": 0.18215,
        "scheduler": "DDIMScheduler",
        "pipelines": {
            "normal": "StableDiffusionPipeline",
            "inpainting": "StableDiffusionInpaintPipeline",
            "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline",
        },
    },
    "sdxl": {
        "attention_heads": [5, 10, 20],
        "sample_size": 128,
        "vae_sample_size": 1024,
        "vae_scaling_factor": 0.13025,
        "scheduler": "EulerDiscreteScheduler",
        "time_ids": 6,
        "pipelines": {
            "normal": "StableDiffusionXLPipeline",
            "inpainting": "StableDiffusionXLInpaintPipeline",
            "instruct-pix2pix": "StableDiffusionXLInstructPix2PixPipeline",
        },
    },
    "sdxl-refiner": {
        "attention_heads": [6, 12, 24, 24],
        "sample_size": 128,
        "vae_sample_size": 1024,
        "vae_scaling_factor": 0.13025,
        "scheduler": "EulerDiscreteScheduler",
        "time_ids": 5,
        "pipelines": {
            "normal": "StableDiffusionXLImg2ImgPipeline",
            "inpainting": "StableDiffusionXLInpaintPipeline",
        },
    },
}

# (family, component) → transformers class, activation and attention heads.
TEXT_ENCODERS = {
    ("sd1", "text_encoder"): ("CLIPTextModel", "quick_gelu", 12),
    ("sd2", "text_encoder"): ("CLIPTextModel", "gelu", 16),
    ("sdxl", "text_encoder"): ("CLIPTextModel", "quick_gelu", 12),
    ("sdxl", "text_encoder_2"): ("CLIPTextModelWithProjection", "gelu", 20),
    ("sdxl-refiner", "text_encoder_2"): ("CLIPTextModelWithProjection", "gelu", 20),
}

SCHEDULER_BASE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SCHEDULER_EXTRA = {
    "PNDMScheduler": {"skip_prk_steps": True},
    "DDIMScheduler": {},
    "EulerDiscreteScheduler": {
        "interpolation_type": "linear",
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
}


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct values the `(\\d+)` group of `pattern` takes among the keys."""
    regex = re.compile(pattern)
    return len({match[1] for key in shapes if (match := regex.match(key))})


def _norm_groups(widths: list[int]) -> int:
    """32 groups, as in every real model; fewer where shrunken widths need it."""
    return math.gcd(NORM_GROUPS, *widths)


def _one_or_list(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def unet_config(family: str, shapes: Shapes, pooled_width: int | None, prediction: str) -> dict:
    """`unet/config.json` for a `UNet2DConditionModel` with these tensors."""
    data = FAMILIES[family]
    levels = range(_count(shapes, r"^down_blocks\.(\d+)\."))
    widths = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels]
    with_attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in levels]
    # Levels without attention take the middle block's depth: diffusers gives
    # the middle block the last level's.
    middle = _count(shapes, r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
    depths = [
        _count(shapes, rf"^down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") or middle
        for i in levels
    ]
    cross_attention = next(
        shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")
    )
    proj_in = next(shape for key, shape in shapes.items() if key.endswith(".proj_in.weight"))
    sample_size = data["sample_size"]
    if prediction == "v" and "v_sample_size" in data:
        sample_size = data["v_sample_size"]
    config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": data["attention_heads"],
        "block_out_channels": widths,
        "center_input_sample": False,
        "cross_attention_dim": cross_attention,
        "down_block_types": [
            "CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in with_attention
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": shapes["conv_in.weight"][1],
        "layers_per_block": _count(shapes, r"^down_blocks\.0\.resnets\.(\d+)\."),
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": _norm_groups(widths),
        "out_channels": shapes["conv_out.weight"][0],
        "sample_size": sample_size,
        "transformer_layers_per_block": _one_or_list(depths),
        "up_block_types": [
            "CrossAttnUpBlock2D" if attention else "UpBlock2D"
            for attention in reversed(with_attention)
        ],
        "upcast_attention": family == "sd2" and prediction == "v",
        "use_linear_projection": len(proj_in) == 2,
    }
    if "time_ids" in data and "add_embedding.linear_1.weight" in shapes:
        embedded = shapes["add_embedding.linear_1.weight"][1]
        config.update(
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=(embedded - (pooled_width or 0)) // data["time_ids"],
            projection_class_embeddings_input_dim=embedded,
        )
    return config


def vae_config(family: str, shapes: Shapes) -> dict:
    """`vae/config.json` for an `AutoencoderKL` with these tensors."""
    data = FAMILIES[family]
    levels = range(_count(shapes, r"^encoder\.down_blocks\.(\d+)\."))
    widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes["post_quant_conv.weight"][0],
        "layers_per_block": _count(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "norm_num_groups": _norm_groups(widths),
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": data["vae_sample_size"],
        "scaling_factor": data["vae_scaling_factor"],
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
    }


def text_encoder_config(family: str, component: str, shapes: Shapes) -> dict:
    """`text_encoder[_2]/config.json` for a transformers CLIP text model."""
    model_class, activation, heads = TEXT_ENCODERS[(family, component)]
    vocabulary, width = shapes["text_model.embeddings.token_embedding.weight"]
    projection = shapes.get("text_projection.weight", (width,))[0]
    return {
        "architectures": [model_class],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": activation,
        "hidden_size": width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": _count(shapes, r"^text_model\.encoder\.layers\.(\d+)\."),
        "pad_token_id": 1,
        "projection_dim": projection,
        "vocab_size": vocabulary,
    }


def scheduler_config(family: str, prediction: str, zero_terminal_snr: bool = False) -> dict:
    """`scheduler/scheduler_config.json`: the family's usual sampler; with
    `zero_terminal_snr` (a `ztsnr` marker), its betas rescaled to zero terminal SNR."""
    name = FAMILIES[family]["scheduler"]
    config = {
        "_class_name": name,
        "_diffusers_version": DIFFUSERS_VERSION,
        **SCHEDULER_BASE,
        **SCHEDULER_EXTRA[name],
        "prediction_type": "v_prediction" if prediction == "v" else "epsilon",
    }
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    return config


def model_index(family: str, variant: str, present: set[str]) -> dict:
    """`model_index.json`: the pipeline class and the class of each component
    folder in `present`; components without a folder are `[null, null]`."""
    data = FAMILIES[family]
    pipeline = data["pipelines"].get(variant, data["pipelines"]["normal"])
    index: dict[str, object] = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", data["scheduler"]],
    }
    for component, model_class in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        index[component] = ["diffusers", model_class] if component in present else [None, None]
    for component in ("text_encoder", "text_encoder_2"):
        classes = TEXT_ENCODERS.get((family, component))
        if classes is None and not family.startswith("sdxl"):
            continue
        tokenizer = component.replace("text_encoder", "tokenizer")
        loaded = classes is not None and component in present
        index[component] = ["transformers", classes[0]] if loaded else [None, None]
        tokenized = loaded and tokenizer in present
        index[tokenizer] = ["transformers", "CLIPTokenizer"] if tokenized else [None, None]
    if family.startswith("sdxl"):
        index["force_zeros_for_empty_prompt"] = family == "sdxl"
        if family == "sdxl-refiner":
            index["requires_aesthetics_score"] = True
    else:
        index.update(
            feature_extractor=[None, None],
            safety_checker=[None, None],
            requires_safety_checker=False,
        )
    return index
