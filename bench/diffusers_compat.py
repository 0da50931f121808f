"""Do diffusers and transformers load the folders sdrecipe writes?

`make check-diffusers` runs this twice. `prepare FOLDER` (sdrecipe's venv)
writes a synthetic model of each family (widths / 8) and converts it to a
diffusers folder with sdrecipe. `check FOLDER` (a venv with diffusers) loads
each folder with `DiffusionPipeline.from_pretrained`, compares the UNet and
VAE weights with diffusers' own conversion of the single file and the text
encoders with the single file, and runs the UNet and the VAE decoder once.
For SD1 and SDXL it also loads a LoRA that sdrecipe extracted from a
fine-tune (`format: lora`) with `load_lora_weights`, fuses it, and compares
the weights with sdrecipe's own bake of that LoRA. It exits non-zero on any
difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
# Where each family's OpenCLIP text encoder lives in the single file.
OPEN_CLIP = {
    "sd2": ("text_encoder", "cond_stage_model.model."),
    "sdxl": ("text_encoder_2", "conditioner.embedders.1.model."),
    "sdxl-refiner": ("text_encoder_2", "conditioner.embedders.0.model."),
}
HF_CLIP = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}
LORA_FAMILIES = ("sd1", "sdxl")
LORA_RECIPE = """
inputs: {{A: {family}.safetensors, B: {family}-finetune.safetensors}}
nodes: {{learned: B - A}}
outputs: {{learned: {{path: {family}-lora.safetensors, format: lora, rank: 8, conv_rank: 4}}}}
"""
BAKE_RECIPE = """
inputs: {{A: {family}.safetensors, L: {family}-lora.safetensors}}
nodes: {{baked: A + L}}
outputs: {{baked: {{path: {family}-baked.safetensors, dtype: fp32}}}}
"""


def prepare(folder: Path) -> None:
    """Synthetic single files and their diffusers folders, made by sdrecipe."""
    from sdrecipe.build import build
    from sdrecipe.prepare import prepare_recipe
    from sdrecipe.recipe.loader import parse_recipe
    from sdrecipe.synthetic import ModelSpec, write_model

    folder.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        single = write_model(folder / f"{family}.safetensors", ModelSpec(family, shrink=8, seed=1))
        text = (
            f"inputs: {{A: {single.name}}}\nnodes: {{model: A}}\n"
            f"outputs: {{model: {{path: {family}-diffusers, format: diffusers}}}}\n"
        )
        build(prepare_recipe(parse_recipe(text, folder / f"{family}.yaml")), threads=2)
        if family in LORA_FAMILIES:
            spec = ModelSpec(family, shrink=8, seed=1, delta_seed=2)
            write_model(folder / f"{family}-finetune.safetensors", spec)
            for name, recipe in (("lora", LORA_RECIPE), ("bake", BAKE_RECIPE)):
                text = recipe.format(family=family)
                recipe_path = folder / f"{family}-{name}.yaml"
                build(prepare_recipe(parse_recipe(text, recipe_path)), threads=2)


def check_lora(folder: Path, family: str, pipe: object, single: dict) -> list[str]:
    """Load sdrecipe's extracted LoRA with diffusers, fuse it, and compare what it
    changed in the UNet and text encoder with what sdrecipe's bake of the same
    LoRA changed: the relative error of each changed layer's delta must be small."""
    import diffusers.loaders.single_file_utils as conversion
    from safetensors.torch import load_file

    pipe.load_lora_weights(folder, weight_name=f"{family}-lora.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    # Unloading after fusing keeps the fused weights and removes PEFT's wrappers.
    pipe.unload_lora_weights()
    baked = load_file(folder / f"{family}-baked.safetensors")
    prefix = HF_CLIP[family]
    components = {
        "unet": (
            pipe.unet.state_dict(),
            conversion.convert_ldm_unet_checkpoint(baked, pipe.unet.config),
            conversion.convert_ldm_unet_checkpoint(single, pipe.unet.config),
        ),
        "text_encoder": (
            pipe.text_encoder.state_dict(),
            _text_encoder(baked, prefix),
            _text_encoder(single, prefix),
        ),
    }
    if family in OPEN_CLIP:
        component, open_clip = OPEN_CLIP[family]
        components[component] = (
            getattr(pipe, component).state_dict(),
            _open_clip_layers(baked, open_clip),
            _open_clip_layers(single, open_clip),
        )
    problems = []
    for component, (fused, expected, base) in components.items():
        fused = {key.replace("text_model.", ""): value for key, value in fused.items()}
        changed = 0
        for key, want in expected.items():
            delta = want.float() - base[key].float()
            if not delta.any():
                continue
            changed += 1
            error = (fused[key].float() - want.float()).norm() / delta.norm()
            if error > 1e-2:
                problems.append(f"LoRA differs: {component} {key} (relative error {error:.3g})")
        print(f"  {family} LoRA via diffusers: {component} {changed} layers changed")
        if not changed:
            problems.append(f"the LoRA changed nothing in the {component}")
    return problems


def _text_encoder(single: dict, prefix: str) -> dict:
    """The single file's CLIP text encoder, by transformers' names (without `text_model.`)."""
    return {
        key[len(prefix) :].replace("text_model.", ""): value
        for key, value in single.items()
        if key.startswith(prefix) and not key.endswith("position_ids")
    }


# OpenCLIP's per-layer names and their transformers names (in_proj is q, k, v stacked).
OPEN_CLIP_LAYERS = {
    "attn.in_proj_weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "attn.out_proj.weight": ("self_attn.out_proj.weight",),
    "mlp.c_fc.weight": ("mlp.fc1.weight",),
    "mlp.c_proj.weight": ("mlp.fc2.weight",),
}


def _open_clip_layers(single: dict, prefix: str) -> dict:
    """The OpenCLIP encoder's attention and MLP weights, by transformers' names."""
    layers = {}
    for key, value in single.items():
        block, _, rest = key.removeprefix(prefix + "transformer.resblocks.").partition(".")
        if not key.startswith(prefix) or rest not in OPEN_CLIP_LAYERS:
            continue
        names = OPEN_CLIP_LAYERS[rest]
        for name, part in zip(names, value.chunk(len(names)), strict=True):
            layers[f"encoder.layers.{block}.{name}"] = part
    return layers


def _differences(ours: dict, theirs: dict) -> list[str]:
    """Keys only one side has, or whose values differ (text_model. prefixes ignored,
    as transformers 5 drops them)."""
    ours = {key.replace("text_model.", ""): value for key, value in ours.items()}
    theirs = {key.replace("text_model.", ""): value for key, value in theirs.items()}
    problems = [f"only in ours: {key}" for key in ours.keys() - theirs.keys()]
    problems += [f"only in theirs: {key}" for key in theirs.keys() - ours.keys()]
    for key in ours.keys() & theirs.keys():
        if ours[key].shape != theirs[key].shape or not (ours[key] == theirs[key]).all():
            problems.append(f"differs: {key}")
    return problems


def check(folder: Path) -> int:
    """Load every folder with diffusers; return the number of problems found."""
    import diffusers
    import diffusers.loaders.single_file_utils as conversion
    import torch
    import transformers
    from safetensors.torch import load_file

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    failures = 0
    for family in FAMILIES:
        single = load_file(folder / f"{family}.safetensors")
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            folder / f"{family}-diffusers", tokenizer=None, tokenizer_2=None
        )
        problems = _differences(
            pipe.unet.state_dict(), conversion.convert_ldm_unet_checkpoint(single, pipe.unet.config)
        )
        problems += _differences(
            pipe.vae.state_dict(), conversion.convert_ldm_vae_checkpoint(single, pipe.vae.config)
        )
        if family in HF_CLIP:
            prefix = HF_CLIP[family]
            expected = {
                k[len(prefix) :]: v
                for k, v in single.items()
                if k.startswith(prefix) and not k.endswith("position_ids")
            }
            problems += _differences(pipe.text_encoder.state_dict(), expected)
        if family in OPEN_CLIP:
            component, prefix = OPEN_CLIP[family]
            encoder = getattr(pipe, component)
            state = {k.replace("text_model.", ""): v for k, v in encoder.state_dict().items()}
            fused = single[prefix + "transformer.resblocks.0.attn.in_proj_weight"]
            width = encoder.config.hidden_size
            if not torch.equal(
                state["encoder.layers.0.self_attn.k_proj.weight"], fused[width : 2 * width]
            ):
                problems.append("OpenCLIP k projection is not the middle third of in_proj")
            if "text_projection.weight" in state and not torch.equal(
                state["text_projection.weight"], single[prefix + "text_projection"].t()
            ):
                problems.append("text_projection is not the transposed OpenCLIP projection")
        config = pipe.unet.config
        extra = {}
        if family in TIME_IDS:
            pooled = (
                config.projection_class_embeddings_input_dim
                - TIME_IDS[family] * config.addition_time_embed_dim
            )
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(1, pooled),
                "time_ids": torch.randn(1, TIME_IDS[family]),
            }
        with torch.no_grad():
            latents = torch.randn(1, config.in_channels, 8, 8)
            context = torch.randn(1, 77, config.cross_attention_dim)
            noise = pipe.unet.float()(latents, 10, encoder_hidden_states=context, **extra).sample
            image = (
                pipe.vae.float()
                .decode(torch.randn(1, pipe.vae.config.latent_channels, 8, 8))
                .sample
            )
        if family in LORA_FAMILIES:
            problems += check_lora(folder, family, pipe, single)
        status = "ok" if not problems else f"{len(problems)} problem(s): {problems[:3]}"
        shapes = f"unet {tuple(noise.shape)} vae {tuple(image.shape)}"
        print(f"{family:13} {type(pipe).__name__:34} {shapes}  {status}")
        failures += len(problems)
    return failures


if __name__ == "__main__":
    command, target = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(target)
    else:
        sys.exit(1 if check(target) else 0)
