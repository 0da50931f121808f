"""The single-file ↔ diffusers key-name mapping, on every real layout."""

from __future__ import annotations

import pytest

from sdrecipe.arch import layout
from sdrecipe.arch.diffusers_names import (
    COMPONENTS,
    DiffusersNaming,
    Source,
    diffusers_source,
    unet_from_diffusers,
    up_levels_with_attention,
    vae_from_diffusers,
)
from sdrecipe.arch.family import family as family_data

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}


@pytest.mark.parametrize("family", list(COMPONENTS))
def test_names_are_unique_and_round_trip(family):
    shapes, _ = layout(family_data(family).layout)
    # model_prefix "": Flux.1's reference layout is BFL's file, without prefixes.
    naming = DiffusersNaming(family, shapes, model_prefix="")
    sources = {key: naming.source(key) for key in shapes}
    seen: dict[tuple[str, str], str] = {}
    for key, source in sources.items():
        if source is None:
            assert key.endswith("logit_scale"), key
            continue
        for name in source.keys:
            assert (source.component, name) not in seen, (key, seen.get((source.component, name)))
            seen[(source.component, name)] = key
    unet = [s.keys[0] for s in sources.values() if s and s.component == "unet"]
    levels = up_levels_with_attention(unet)
    for key, source in sources.items():
        if source and source.component == "unet":
            assert PREFIX["unet"] + unet_from_diffusers(source.keys[0], levels) == key
        if source and source.component == "vae":
            assert PREFIX["vae"] + vae_from_diffusers(source.keys[0]) == key


@pytest.mark.parametrize(
    ("family", "key", "expected"),
    [
        (
            "sd1",
            "model.diffusion_model.input_blocks.4.1.proj_in.weight",
            Source("unet", ("down_blocks.1.attentions.0.proj_in.weight",)),
        ),
        (
            "sd1",
            "model.diffusion_model.output_blocks.2.1.conv.bias",
            Source("unet", ("up_blocks.0.upsamplers.0.conv.bias",)),
        ),
        (
            "sdxl",
            "model.diffusion_model.output_blocks.2.2.conv.bias",
            Source("unet", ("up_blocks.0.upsamplers.0.conv.bias",)),
        ),
        (
            "sd1",
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            Source("unet", ("down_blocks.0.resnets.0.conv1.weight",)),
        ),
        (
            "sd1",
            "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight",
            Source("vae", ("decoder.up_blocks.0.resnets.0.conv_shortcut.weight",)),
        ),
        (
            "sd1",
            "first_stage_model.encoder.mid.attn_1.q.weight",
            Source("vae", ("encoder.mid_block.attentions.0.to_q.weight",), "conv1x1"),
        ),
        (
            "sd1",
            "cond_stage_model.transformer.text_model.final_layer_norm.bias",
            Source("text_encoder", ("text_model.final_layer_norm.bias",)),
        ),
        (
            "sdxl",
            "conditioner.embedders.1.model.text_projection",
            Source("text_encoder_2", ("text_projection.weight",), "transpose"),
        ),
        (
            "sd2",
            "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_bias",
            Source(
                "text_encoder",
                tuple(f"text_model.encoder.layers.3.self_attn.{p}_proj.bias" for p in "qkv"),
                "qkv",
            ),
        ),
    ],
)
def test_known_names(family, key, expected):
    assert diffusers_source(family, key) == expected
