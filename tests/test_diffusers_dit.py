"""Diffusers folders of Flux.1 and SD3 / SD3.5: names, configs, round trips.

The expectations here are written independently of the family files: a
hand-written table of diffusers names (from diffusers' own converters,
`convert_flux_transformer_checkpoint_to_diffusers` and
`convert_sd3_transformer_checkpoint_to_diffusers`), and tensor counts worked
out from the key structure in the reference notes (FAMILIES.md).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SHRINK, convert, run_in_process, write_recipe
from sdrecipe.arch import layout
from sdrecipe.arch.detect import detect
from sdrecipe.arch.diffusers_names import DiffusersNaming, Source, diffusers_source
from sdrecipe.arch.diffusers_tables import UnknownLastBlock
from sdrecipe.io.diffusers_writer import DiffusersWriter
from sdrecipe.io.readers import open_model
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.synthetic import ModelSpec, write_model

# name → (synthetic model, the family detected)
MODELS = {
    "flux1-dev": (ModelSpec("flux1", shrink=SHRINK, seed=11), "flux1"),
    "flux1-schnell": (ModelSpec("flux1", layout="flux1-schnell", shrink=SHRINK, seed=12), "flux1"),
    "flux1-fill": (ModelSpec("flux1", variant="fill", shrink=SHRINK, seed=13), "flux1"),
    "flux1-dev-aio": (ModelSpec("flux1", layout="flux1-dev-aio", shrink=SHRINK, seed=14), "flux1"),
    "sd3": (ModelSpec("sd3", shrink=SHRINK, seed=15), "sd3"),
    "sd35-medium": (ModelSpec("sd35-medium", shrink=SHRINK, seed=16), "sd35-medium"),
    "sd35-large": (ModelSpec("sd35-large", shrink=SHRINK, seed=17), "sd35-large"),
}
M = "model.diffusion_model."

# Per reference layout: single-file keys and the diffusers tensors they become.
# Flux.1: a double block's 24 keys give 32 (img and txt q/k/v weights and biases,
# 4 keys, become 12), a single block's 8 give 14 (linear1's weight and bias become
# q, k, v and proj_mlp each); 20 keys outside blocks (16 for schnell, without
# guidance_in). SD3: a joint block's q/k/v (x and context, weight and bias: 4
# keys) become 12, a dual-attention block's attn2.qkv 2 → 6; 17 keys outside blocks.
TRANSFORMER_COUNTS = {
    "flux1-dev": (19 * 24 + 38 * 8 + 20, 19 * 32 + 38 * 14 + 20),
    "flux1-schnell": (19 * 24 + 38 * 8 + 16, 19 * 32 + 38 * 14 + 16),
    "flux1-dev-aio": (780, 1160),
    # 23 blocks of 20 keys, the last of 14 (x block 10, context q/k/v and adaLN 4).
    "sd3-medium": (23 * 20 + 14 + 17, 23 * 28 + (14 + 8) + 17),
    # 13 dual-attention blocks of 30, 10 of 24, the last of 18: FAMILIES.md's 665 → 909.
    "sd35-medium": (665, 909),
    "sd35-large": (37 * 24 + 18 + 17, 37 * 32 + 26 + 17),
}


def qkv(prefix: str, names: tuple[str, ...], parameter: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{name}.{parameter}" for name in names)


# Hand-written: (layout, single-file key) → where diffusers keeps it.
KNOWN = [
    ("flux1-dev", "img_in.weight", Source("transformer", ("x_embedder.weight",))),
    (
        "flux1-dev",
        "guidance_in.out_layer.bias",
        Source("transformer", ("time_text_embed.guidance_embedder.linear_2.bias",)),
    ),
    (
        "flux1-dev",
        "vector_in.in_layer.weight",
        Source("transformer", ("time_text_embed.text_embedder.linear_1.weight",)),
    ),
    ("flux1-dev", "txt_in.bias", Source("transformer", ("context_embedder.bias",))),
    (
        "flux1-dev",
        "double_blocks.3.img_attn.qkv.weight",
        Source(
            "transformer",
            qkv("transformer_blocks.3.attn.", ("to_q", "to_k", "to_v"), "weight"),
            "split",
            (1, 1, 1),
        ),
    ),
    (
        "flux1-dev",
        "double_blocks.18.txt_attn.qkv.bias",
        Source(
            "transformer",
            qkv("transformer_blocks.18.attn.", ("add_q_proj", "add_k_proj", "add_v_proj"), "bias"),
            "split",
            (1, 1, 1),
        ),
    ),
    (
        "flux1-dev",
        "double_blocks.0.txt_attn.norm.key_norm.scale",
        Source("transformer", ("transformer_blocks.0.attn.norm_added_k.weight",)),
    ),
    (
        "flux1-dev",
        "double_blocks.5.txt_attn.proj.weight",
        Source("transformer", ("transformer_blocks.5.attn.to_add_out.weight",)),
    ),
    (
        "flux1-dev",
        "double_blocks.5.img_mlp.2.bias",
        Source("transformer", ("transformer_blocks.5.ff.net.2.bias",)),
    ),
    (
        "flux1-dev",
        "double_blocks.1.txt_mod.lin.weight",
        Source("transformer", ("transformer_blocks.1.norm1_context.linear.weight",)),
    ),
    (
        "flux1-dev",
        "single_blocks.37.linear1.weight",
        Source(
            "transformer",
            qkv(
                "single_transformer_blocks.37.",
                ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                "weight",
            ),
            "split",
            (1, 1, 1, 4),
        ),
    ),
    (
        "flux1-dev",
        "single_blocks.2.linear2.bias",
        Source("transformer", ("single_transformer_blocks.2.proj_out.bias",)),
    ),
    (
        "flux1-dev",
        "single_blocks.2.modulation.lin.weight",
        Source("transformer", ("single_transformer_blocks.2.norm.linear.weight",)),
    ),
    ("flux1-dev", "final_layer.linear.weight", Source("transformer", ("proj_out.weight",))),
    (
        "flux1-dev",
        "final_layer.adaLN_modulation.1.bias",
        Source("transformer", ("norm_out.linear.bias",), "swap"),
    ),
    (
        "flux1-dev-aio",
        M + "single_blocks.0.norm.query_norm.scale",
        Source("transformer", ("single_transformer_blocks.0.attn.norm_q.weight",)),
    ),
    (
        "flux1-dev-aio",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        Source("text_encoder", ("text_model.final_layer_norm.weight",)),
    ),
    (
        "flux1-dev-aio",
        "text_encoders.t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wi_0.weight",
        Source("text_encoder_2", ("encoder.block.3.layer.1.DenseReluDense.wi_0.weight",)),
    ),
    (
        "flux1-dev-aio",
        "vae.decoder.up.1.block.0.nin_shortcut.weight",
        Source("vae", ("decoder.up_blocks.2.resnets.0.conv_shortcut.weight",)),
    ),
    ("flux1-dev-aio", "text_encoders.clip_l.logit_scale", None),
    ("sd3-medium", M + "pos_embed", Source("transformer", ("pos_embed.pos_embed",))),
    ("sd3-medium", M + "x_embedder.proj.bias", Source("transformer", ("pos_embed.proj.bias",))),
    (
        "sd3-medium",
        M + "t_embedder.mlp.2.weight",
        Source("transformer", ("time_text_embed.timestep_embedder.linear_2.weight",)),
    ),
    (
        "sd3-medium",
        M + "y_embedder.mlp.0.bias",
        Source("transformer", ("time_text_embed.text_embedder.linear_1.bias",)),
    ),
    (
        "sd3-medium",
        M + "joint_blocks.4.x_block.attn.qkv.bias",
        Source(
            "transformer",
            qkv("transformer_blocks.4.attn.", ("to_q", "to_k", "to_v"), "bias"),
            "split",
            (1, 1, 1),
        ),
    ),
    (
        "sd3-medium",
        M + "joint_blocks.4.context_block.attn.proj.weight",
        Source("transformer", ("transformer_blocks.4.attn.to_add_out.weight",)),
    ),
    (
        "sd3-medium",
        M + "joint_blocks.4.context_block.mlp.fc1.weight",
        Source("transformer", ("transformer_blocks.4.ff_context.net.0.proj.weight",)),
    ),
    # A block before the last keeps its context modulation as it is; the last
    # block's (pre-only: shift and scale only) is swapped, as the final layer's.
    (
        "sd3-medium",
        M + "joint_blocks.22.context_block.adaLN_modulation.1.weight",
        Source("transformer", ("transformer_blocks.22.norm1_context.linear.weight",)),
    ),
    (
        "sd3-medium",
        M + "joint_blocks.23.context_block.adaLN_modulation.1.weight",
        Source("transformer", ("transformer_blocks.23.norm1_context.linear.weight",), "swap"),
    ),
    (
        "sd3-medium",
        M + "final_layer.adaLN_modulation.1.weight",
        Source("transformer", ("norm_out.linear.weight",), "swap"),
    ),
    (
        "sd3-medium",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        Source("vae", ("encoder.mid_block.attentions.0.to_q.weight",), "conv1x1"),
    ),
    (
        "sd35-large",
        M + "joint_blocks.37.context_block.adaLN_modulation.1.bias",
        Source("transformer", ("transformer_blocks.37.norm1_context.linear.bias",), "swap"),
    ),
    (
        "sd35-large",
        M + "joint_blocks.36.context_block.attn.ln_q.weight",
        Source("transformer", ("transformer_blocks.36.attn.norm_added_q.weight",)),
    ),
    (
        "sd35-medium",
        M + "joint_blocks.12.x_block.attn2.qkv.weight",
        Source(
            "transformer",
            qkv("transformer_blocks.12.attn2.", ("to_q", "to_k", "to_v"), "weight"),
            "split",
            (1, 1, 1),
        ),
    ),
    (
        "sd35-medium",
        M + "joint_blocks.0.x_block.attn2.ln_k.weight",
        Source("transformer", ("transformer_blocks.0.attn2.norm_k.weight",)),
    ),
    (
        "sd35-medium",
        M + "joint_blocks.0.x_block.attn2.proj.bias",
        Source("transformer", ("transformer_blocks.0.attn2.to_out.0.bias",)),
    ),
]


def _naming(layout_name: str) -> tuple[DiffusersNaming, dict[str, tuple[int, ...]]]:
    shapes, _ = layout(layout_name)
    infos = {key: TensorInfo(torch.float16, shape) for key, shape in shapes.items()}
    found = detect(infos, {})
    return DiffusersNaming(found.family, shapes, found.model_prefix), shapes


@pytest.mark.parametrize(("layout_name", "key", "expected"), KNOWN)
def test_known_names(layout_name, key, expected):
    naming, shapes = _naming(layout_name)
    assert key in shapes
    assert naming.source(key) == expected


@pytest.mark.parametrize("layout_name", list(TRANSFORMER_COUNTS))
def test_every_transformer_key_has_distinct_diffusers_names(layout_name):
    naming, shapes = _naming(layout_name)
    keys, names = TRANSFORMER_COUNTS[layout_name]
    stored: dict[tuple[str, str], str] = {}
    transformer = 0
    for key in shapes:
        source = naming.source(key)
        if source is None:
            assert key.endswith("logit_scale"), key
            continue
        for name in source.keys:
            assert (source.component, name) not in stored, (
                key,
                stored.get((source.component, name)),
            )
            stored[(source.component, name)] = key
        transformer += source.component == "transformer"
    assert transformer == keys
    assert sum(component == "transformer" for component, _ in stored) == names


def test_a_last_block_rule_needs_the_files_keys():
    key = M + "joint_blocks.23.context_block.adaLN_modulation.1.weight"
    with pytest.raises(UnknownLastBlock):
        diffusers_source("sd3", key)
    shapes, _ = layout("sd3-medium")
    assert diffusers_source("sd3", key, shapes).kind == "swap"
    # Keys that no last-block rule matches need nothing more.
    assert diffusers_source("sd3", M + "pos_embed") == Source(
        "transformer", ("pos_embed.pos_embed",)
    )


@pytest.fixture(scope="module")
def dit_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dit")
    return {
        name: write_model(folder / f"{name}.safetensors", spec)
        for name, (spec, _) in MODELS.items()
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_single_file_to_diffusers_and_back_is_bit_identical(tmp_path, dit_models, name):
    original = dit_models[name]
    folder = convert(original, tmp_path / "model")
    back = convert(folder, tmp_path / "back.safetensors", "safetensors")
    source, result = load_file(original), load_file(back)
    # ComfyUI's text encoders carry a logit scale that diffusers' do not keep.
    kept = {key for key in source if not key.endswith("logit_scale")}
    assert set(result) == kept
    for key in kept:
        assert result[key].dtype == source[key].dtype, key
        assert result[key].shape == source[key].shape, key
        assert torch.equal(result[key].view(torch.uint8), source[key].view(torch.uint8)), key
    reader = open_model(folder)
    assert reader.family == MODELS[name][1]
    found, expected = detect(reader.infos(), {}), detect(open_model(original).infos(), {})
    assert (found.family, found.variant, found.kind, found.model_prefix) == (
        expected.family,
        expected.variant,
        expected.kind,
        expected.model_prefix,
    )


def test_stored_tensors_are_diffusers_layouts(tmp_path, dit_models):
    """Fused projections are split by rows, modulations' halves exchanged."""
    flux = load_file(dit_models["flux1-dev"])
    folder = convert(dit_models["flux1-dev"], tmp_path / "flux")
    stored = load_file(folder / "transformer/diffusion_pytorch_model.safetensors")
    assert len(stored) == TRANSFORMER_COUNTS["flux1-dev"][1]
    hidden = flux["img_in.weight"].shape[0]
    linear1 = flux["single_blocks.7.linear1.bias"]
    prefix = "single_transformer_blocks.7."
    assert torch.equal(stored[prefix + "attn.to_k.bias"], linear1[hidden : 2 * hidden])
    assert torch.equal(stored[prefix + "proj_mlp.bias"], linear1[3 * hidden :])
    assert stored[prefix + "proj_mlp.weight"].shape == (4 * hidden, hidden)
    qkv_weight = flux["double_blocks.2.txt_attn.qkv.weight"]
    assert torch.equal(
        stored["transformer_blocks.2.attn.add_v_proj.weight"], qkv_weight[2 * hidden :]
    )
    shift, scale = flux["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(stored["norm_out.linear.weight"], torch.cat([scale, shift]))

    sd3 = load_file(dit_models["sd3"])
    folder = convert(dit_models["sd3"], tmp_path / "sd3")
    stored = load_file(folder / "transformer/diffusion_pytorch_model.safetensors")
    last, before = (M + f"joint_blocks.{n}.context_block.adaLN_modulation.1.bias" for n in (23, 22))
    shift, scale = sd3[last].chunk(2)
    assert torch.equal(
        stored["transformer_blocks.23.norm1_context.linear.bias"], torch.cat([scale, shift])
    )
    assert torch.equal(stored["transformer_blocks.22.norm1_context.linear.bias"], sd3[before])
    assert "transformer_blocks.23.attn.to_add_out.weight" not in stored


def test_configs_follow_the_shapes_and_the_family(tmp_path, dit_models):
    width = 3072 // SHRINK
    folder = convert(dit_models["flux1-dev-aio"], tmp_path / "aio")
    config = json.loads((folder / "transformer/config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    head = 128 // SHRINK
    assert (config["num_layers"], config["num_single_layers"]) == (19, 38)
    assert (config["attention_head_dim"], config["num_attention_heads"]) == (head, width // head)
    assert (config["in_channels"], config["out_channels"], config["guidance_embeds"]) == (
        64,
        64,
        True,
    )
    assert config["joint_attention_dim"] == 4096 // SHRINK
    assert config["pooled_projection_dim"] == 768 // SHRINK
    assert sum(config["axes_dims_rope"]) == head
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    vae = json.loads((folder / "vae/config.json").read_text())
    assert (vae["latent_channels"], vae["use_quant_conv"], vae["use_post_quant_conv"]) == (
        16,
        False,
        False,
    )
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (3.0, True)
    t5 = json.loads((folder / "text_encoder_2/config.json").read_text())
    assert (t5["d_model"], t5["num_layers"], t5["vocab_size"]) == (
        4096 // SHRINK,
        24,
        32128 // SHRINK,
    )
    assert t5["num_heads"] * t5["d_kv"] == 4096 // SHRINK
    clip = json.loads((folder / "text_encoder/config.json").read_text())
    assert (clip["hidden_size"], clip["num_hidden_layers"]) == (768 // SHRINK, 12)

    schnell = convert(dit_models["flux1-schnell"], tmp_path / "schnell")
    config = json.loads((schnell / "transformer/config.json").read_text())
    assert config["guidance_embeds"] is False
    scheduler = json.loads((schnell / "scheduler/scheduler_config.json").read_text())
    assert scheduler["shift"] == 1.0
    assert sorted(path.name for path in schnell.iterdir()) == [
        "model_index.json",
        "scheduler",
        "transformer",
    ]

    fill = convert(dit_models["flux1-fill"], tmp_path / "fill")
    assert json.loads((fill / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    config = json.loads((fill / "transformer/config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (384, 64)

    expected = {
        "sd3": (24, 192, [], None),
        "sd35-medium": (24, 384, list(range(13)), "rms_norm"),
        "sd35-large": (38, 192, [], "rms_norm"),
    }
    for name, (layers, positions, dual, qk_norm) in expected.items():
        folder = convert(dit_models[name], tmp_path / name)
        config = json.loads((folder / "transformer/config.json").read_text())
        hidden = 64 * layers // SHRINK  # SAI: hidden 64 x depth, as many heads as blocks
        assert config["_class_name"] == "SD3Transformer2DModel"
        assert (config["num_layers"], config["num_attention_heads"]) == (layers, layers), name
        assert config["attention_head_dim"] * layers == hidden == config["caption_projection_dim"]
        assert (config["pos_embed_max_size"], config["dual_attention_layers"]) == (positions, dual)
        assert (config["qk_norm"], config["patch_size"], config["in_channels"]) == (qk_norm, 2, 16)
        assert (config["joint_attention_dim"], config["pooled_projection_dim"]) == (
            4096 // SHRINK,
            2048 // SHRINK,
        )
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusion3Pipeline"
        assert index["text_encoder_3"] == [None, None]
        vae = json.loads((folder / "vae/config.json").read_text())
        assert (vae["scaling_factor"], vae["shift_factor"]) == (1.5305, 0.0609)
        scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
        assert scheduler["shift"] == 3.0


def test_sd3_with_text_encoders_and_t5_alias(tmp_path, dit_models):
    """An SD3 file with ComfyUI's three text encoders (clip_l, clip_g, t5xxl):
    each gets its folder and config, and a T5 folder that also stores the
    `encoder.embed_tokens` alias (as diffusers folders do) reads the same."""
    tensors = load_file(dit_models["sd3"])
    aio = load_file(dit_models["flux1-dev-aio"])
    for key, value in aio.items():
        if key.startswith("text_encoders."):
            tensors[key] = value
            if key.startswith("text_encoders.clip_l.transformer."):
                tensors[key.replace(".clip_l.", ".clip_g.")] = value.clone()
    save_file(tensors, tmp_path / "sd3-te.safetensors")
    folder = convert(tmp_path / "sd3-te.safetensors", tmp_path / "sd3-te")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    clip_g = json.loads((folder / "text_encoder_2/config.json").read_text())
    assert (clip_g["hidden_act"], clip_g["num_attention_heads"]) == ("gelu", 20)
    assert json.loads((folder / "text_encoder_3/config.json").read_text())["model_type"] == "t5"
    before = {key: value for key, value in open_model(folder).infos().items()}
    t5 = folder / "text_encoder_3/model.safetensors"
    stored = load_file(t5)
    stored["encoder.embed_tokens.weight"] = stored["shared.weight"].clone()
    save_file(stored, t5, metadata={"format": "pt"})
    reader = open_model(folder)
    assert reader.infos() == before
    assert reader.family == "sd3"
    kept = {key for key in tensors if not key.endswith("logit_scale")}
    assert set(before) == kept


def test_cli_builds_flux_and_sd35_diffusers_outputs(tmp_path, dit_models):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {dit_models["flux1-dev-aio"]}
          B: {dit_models["sd35-medium"]}
        nodes:
          flux: A
          sd35: B
        outputs:
          flux:
            path: flux-diffusers
            format: diffusers
          sd35:
            path: sd35-diffusers
            format: diffusers
            max_shard_size: 4000000
        """,
    )
    first = run_in_process("build", str(recipe))
    assert first.returncode == 0, first.stderr
    flux, sd35 = tmp_path / "flux-diffusers", tmp_path / "sd35-diffusers"
    assert (flux / "transformer/diffusion_pytorch_model.safetensors").is_file()
    # Past max_shard_size, the transformer is shards behind diffusers' index.
    index = json.loads(
        (sd35 / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    assert len(set(index["weight_map"].values())) > 1
    assert len(index["weight_map"]) == TRANSFORMER_COUNTS["sd35-medium"][1]
    for folder, family in ((flux, "flux1"), (sd35, "sd35-medium")):
        reported = json.loads(run_in_process("inspect", str(folder), "--json").stdout)
        assert (reported["format"], reported["family"]) == ("diffusers", family)
    again = run_in_process("build", str(recipe), "--json")
    assert [o["result"] for o in json.loads(again.stdout)["outputs"]] == ["up to date"] * 2
    # The folders carry sdrecipe's provenance, so a rebuild may replace them.
    rebuilt = run_in_process("build", str(recipe), "--force", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert [o["result"] for o in json.loads(rebuilt.stdout)["outputs"]] == ["built"] * 2
    verified = run_in_process("verify", str(recipe))
    assert verified.returncode == 0, verified.stderr


def test_families_without_a_diffusers_layout_are_refused(tmp_path):
    t5 = write_model(tmp_path / "t5.safetensors", ModelSpec("t5xxl", shrink=SHRINK))
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {t5}
        nodes:
          same: A
        outputs:
          same:
            path: out
            format: diffusers
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "no diffusers folder layout" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_split_and_swapped_tensors_written_in_uneven_pieces(tmp_path, dit_models):
    """The executor writes tensors in pieces of any size and order: a piece may
    straddle two parts of a split, or the middle of a swapped tensor."""
    source = open_model(dit_models["flux1-dev"])
    infos = source.infos()
    architecture = detect(infos, source.metadata)
    writer = DiffusersWriter(tmp_path / "pieces", infos, {}, architecture, {})
    for key in infos:
        data = bytes(source.raw(key))
        # Odd cuts: across the thirds of a q/k/v, the middle of a swapped tensor.
        cuts = sorted({0, len(data) // 3 + 1, len(data) // 2 - 1, len(data)})
        for start, end in reversed(list(itertools.pairwise(cuts))):
            writer.write(key, data[start:end], start)
    writer.finish()
    writer.publish()
    whole = convert(dit_models["flux1-dev"], tmp_path / "whole")
    config = "transformer/config.json"
    assert (tmp_path / "pieces" / config).read_bytes() == (whole / config).read_bytes()
    stored = load_file(tmp_path / "pieces/transformer/diffusion_pytorch_model.safetensors")
    expected = load_file(whole / "transformer/diffusion_pytorch_model.safetensors")
    assert stored.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(stored[name].view(torch.uint8), value.view(torch.uint8)), name
