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

from sdrecipe.arch.family import families

Shapes = Mapping[str, tuple[int, ...]]

DIFFUSERS_VERSION = "0.30.0"
NORM_GROUPS = 32


FAMILIES: dict[str, dict] = {
    data.name: data.diffusers.config for data in families() if data.diffusers is not None
}

# (family, component) → transformers class, activation and attention heads.
TEXT_ENCODERS = {
    (data.name, component): (encoder.model_class, encoder.activation, encoder.heads)
    for data in families()
    if data.diffusers is not None
    for component, encoder in data.diffusers.text_encoders.items()
}
# (family, component) → the class of the text encoder's tokenizer.
TOKENIZERS = {
    (data.name, component): encoder.tokenizer
    for data in families()
    if data.diffusers is not None
    for component, encoder in data.diffusers.text_encoders.items()
}
# The component folders of an SD pipeline that are diffusers models, and their classes.
SD_MODEL_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}

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
        "upcast_attention": bool(data.get("upcast_attention_for_v")) and prediction == "v",
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
    """`vae/config.json` for an `AutoencoderKL` with these tensors. The 16-channel
    VAE of Flux.1 and SD3 has no quant_conv / post_quant_conv, and its latents
    are shifted as well as scaled."""
    data = FAMILIES[family]
    levels = range(_count(shapes, r"^encoder\.down_blocks\.(\d+)\."))
    widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in levels]
    quantized = "post_quant_conv.weight" in shapes
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes[
            "post_quant_conv.weight" if quantized else "decoder.conv_in.weight"
        ][0 if quantized else 1],
        "layers_per_block": _count(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "norm_num_groups": _norm_groups(widths),
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": data["vae_sample_size"],
        "scaling_factor": data["vae_scaling_factor"],
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
    }
    extra: dict[str, object] = {}
    if "vae_shift_factor" in data:
        extra["shift_factor"] = data["vae_shift_factor"]
    if not quantized:
        extra.update(use_quant_conv=False, use_post_quant_conv=False)
    return dict(sorted({**config, **extra}.items())) if extra else config


def _rope_axes(axes: list[int], head_dim: int) -> list[int]:
    """Flux's rotary axes for heads `head_dim` wide: the released axes when they
    fill the head, else each scaled down to an even width, the first taking the rest."""
    if sum(axes) == head_dim:
        return list(axes)
    scaled = [2 * max(1, axis * head_dim // sum(axes) // 2) for axis in axes[1:]]
    return [head_dim - sum(scaled), *scaled]


def flux_transformer_config(family: str, shapes: Shapes) -> dict:
    """`transformer/config.json` for a `FluxTransformer2DModel` with these tensors."""
    data = FAMILIES[family]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    hidden, in_channels = shapes["x_embedder.weight"]
    patch = data["patch_size"]
    return {
        "_class_name": data["transformer_class"],
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": head_dim,
        "axes_dims_rope": _rope_axes(data["axes_dims_rope"], head_dim),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "in_channels": in_channels,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "num_attention_heads": hidden // head_dim,
        "num_layers": _count(shapes, r"^transformer_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, r"^single_transformer_blocks\.(\d+)\."),
        "out_channels": shapes["proj_out.weight"][0] // (patch * patch),
        "patch_size": patch,
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
    }


def sd3_transformer_config(family: str, shapes: Shapes) -> dict:
    """`transformer/config.json` for an `SD3Transformer2DModel` with these tensors.

    The heads are as wide as the q/k norms (SD3.5); without them (SD3 Medium),
    there are as many heads as blocks, as in Stability AI's own loader."""
    data = FAMILIES[family]
    hidden, in_channels, patch, _ = shapes["pos_embed.proj.weight"]
    layers = _count(shapes, r"^transformer_blocks\.(\d+)\.")
    norm = shapes.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = norm[0] if norm is not None else hidden // layers
    dual = re.compile(r"^transformer_blocks\.(\d+)\.attn2\.")
    return {
        "_class_name": data["transformer_class"],
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": head_dim,
        "caption_projection_dim": shapes["context_embedder.weight"][0],
        "dual_attention_layers": sorted({int(m[1]) for key in shapes if (m := dual.match(key))}),
        "in_channels": in_channels,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "num_attention_heads": hidden // head_dim,
        "num_layers": layers,
        "out_channels": shapes["proj_out.weight"][0] // (patch * patch),
        "patch_size": patch,
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        "pos_embed_max_size": math.isqrt(shapes["pos_embed.pos_embed"][1]),
        "qk_norm": "rms_norm" if norm is not None else None,
        "sample_size": data["sample_size"],
    }


TRANSFORMER_CONFIGS = {
    "FluxTransformer2DModel": flux_transformer_config,
    "SD3Transformer2DModel": sd3_transformer_config,
}


def transformer_config(family: str, shapes: Shapes) -> dict:
    """`transformer/config.json` for the family's transformer class."""
    return TRANSFORMER_CONFIGS[FAMILIES[family]["transformer_class"]](family, shapes)


def t5_config(family: str, component: str, shapes: Shapes) -> dict:
    """`text_encoder_N/config.json` for a transformers `T5EncoderModel` (T5 v1.1,
    gated GELU) with these tensors: heads from the relative attention bias."""
    model_class, activation, _ = TEXT_ENCODERS[(family, component)]
    vocabulary, width = shapes["shared.weight"]
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[attention + "relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    feed_forward = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi")
    layers = _count(shapes, r"^encoder\.block\.(\d+)\.")
    return {
        "architectures": [model_class],
        "classifier_dropout": 0.0,
        "d_ff": shapes[feed_forward + ".weight"][0],
        "d_kv": shapes[attention + "q.weight"][0] // heads,
        "d_model": width,
        "decoder_start_token_id": 0,
        "dense_act_fn": activation if gated else "relu",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": gated,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": layers,
        "num_heads": heads,
        "num_layers": layers,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": buckets,
        "tie_word_embeddings": False,
        "vocab_size": vocabulary,
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


def scheduler_config(
    family: str, prediction: str, zero_terminal_snr: bool = False, kind: str | None = None
) -> dict:
    """`scheduler/scheduler_config.json`: the family's usual sampler; with
    `zero_terminal_snr` (a `ztsnr` marker), its betas rescaled to zero terminal SNR.
    A flow-matching family's config is data, per kind (Flux.1 dev or schnell)."""
    name = FAMILIES[family]["scheduler"]
    flow = FAMILIES[family].get("scheduler_config")
    if flow is not None:
        chosen = flow.get(kind or "default") or flow.get("default") or next(iter(flow.values()))
        return {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **chosen}
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
    for component, model_class in data.get("model_classes", SD_MODEL_CLASSES).items():
        index[component] = ["diffusers", model_class] if component in present else [None, None]
    for component in data["text_encoder_slots"]:
        classes = TEXT_ENCODERS.get((family, component))
        tokenizer = component.replace("text_encoder", "tokenizer")
        loaded = classes is not None and component in present
        index[component] = ["transformers", classes[0]] if loaded else [None, None]
        tokenized = loaded and tokenizer in present
        tokenizer_class = TOKENIZERS.get((family, component), "CLIPTokenizer")
        index[tokenizer] = ["transformers", tokenizer_class] if tokenized else [None, None]
    index.update(data.get("model_index", {}))
    return index
