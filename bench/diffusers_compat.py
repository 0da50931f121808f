"""Do diffusers and transformers load the folders sdrecipe writes?

`make check-diffusers` runs this twice. `prepare FOLDER` (sdrecipe's venv)
writes a synthetic model of each family (widths / 8; Flux.1's / 16) and converts it to a
diffusers folder with sdrecipe. `check FOLDER` (a venv with diffusers) loads
each folder with `DiffusionPipeline.from_pretrained`, compares the UNet and
VAE weights with diffusers' own conversion of the single file and the text
encoders with the single file, and runs the UNet and the VAE decoder once.
For SD1 and SDXL it also loads a LoRA that sdrecipe extracted from a
fine-tune (`format: lora`) with `load_lora_weights`, fuses it, and compares
the weights with sdrecipe's own bake of that LoRA.

Flux.1 (ComfyUI's all-in-one dev, BFL's schnell, Fill) and SD3 / SD3.5
(Medium, 3.5 Medium, 3.5 Large) go the same way: their transformers are
loaded with `FluxTransformer2DModel.from_pretrained` /
`SD3Transformer2DModel.from_pretrained` (the rest with the pipeline) and
every tensor is compared with diffusers' own single-file converters
(`convert_flux_transformer_checkpoint_to_diffusers`,
`convert_sd3_transformer_checkpoint_to_diffusers`, and its VAE, CLIP and T5
conversions); the transformer, the VAE decoder and the text encoders run
once. It exits non-zero on any difference.

Flux.1 LoRAs: one synthetic Flux.1 model (unbaked, converted to a diffusers
folder by sdrecipe) and three LoRAs for it, in PEFT, kohya and XLabs names;
sdrecipe bakes each into the single file. diffusers loads each LoRA with
`FluxPipeline.load_lora_weights` (converting the kohya and XLabs names itself),
fuses it into the transformer, and every transformer tensor must match
sdrecipe's bake converted to diffusers' names: the same layers changed on both
sides, each within a small relative error of its change.

Extracted Flux.1 LoRAs: sdrecipe extracts LoRAs of a fine-tune of that model
(`format: lora, naming: peft`: diffusers' names and its per-component PEFT
config in `lora_adapter_metadata`) at ranks 8 and 200 (above every layer's
narrower side: each capped to it), and bakes each into the single file;
diffusers loads and fuses each as above (PEFT's rank and scale of every layer
must be the file's), compared likewise. A file diffusers refuses is reported
with its error.
"""

from __future__ import annotations

import json
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
# Flux.1 and SD3 / SD3.5: name → (family, layout or None, variant, shrink).
DIT_MODELS = {
    "flux1-dev-aio": ("flux1", "flux1-dev-aio", "normal", 16),
    "flux1-schnell": ("flux1", "flux1-schnell", "normal", 16),
    "flux1-fill": ("flux1", None, "fill", 16),
    "sd3": ("sd3", None, "normal", 8),
    "sd35-medium": ("sd35-medium", None, "normal", 8),
    "sd35-large": ("sd35-large", None, "normal", 8),
}
DIT_CLASSES = {"flux1": "FluxTransformer2DModel"}  # the SD3 families: SD3Transformer2DModel
MODEL_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("vae.", "first_stage_model.")
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
# Flux.1 LoRA baking: one synthetic model (widths / 16), one LoRA per naming.
FLUX_LORA_MODEL = "flux1-lora"
FLUX_LORA_SHRINK = 16
FLUX_LORA_NAMINGS = ("peft", "kohya", "xlabs")
# kohya's alpha (dropped by the PEFT and XLabs files, which have none): scale alpha / rank.
FLUX_LORA_RANK, FLUX_LORA_ALPHA = 4, 2.0
# Extracted Flux.1 LoRAs (PEFT names) of a fine-tune of that model, by rank. Only
# the blocks' layers are extracted, and each has the hidden width (192 at widths
# / 16) on one side: 200 caps every module to 192, which is then the file's r, so
# rank_pattern stays empty (as for the real model, whose layers are all >= 3072).
FLUX_TUNED = "flux1-lora-tuned"
FLUX_EXTRACT_RANKS = (8, 200)
FLUX_EXTRACT_RECIPE = """
inputs: {{A: {tuned}.safetensors, B: {model}.safetensors}}
nodes: {{learned: A - B}}
outputs:
  learned: {{path: {model}-{naming}.safetensors, format: lora, rank: {rank}, naming: peft}}
"""
FLUX_BAKE_RECIPE = """
inputs: {{A: {model}.safetensors, L: {model}-{naming}.safetensors}}
nodes: {{baked: A + L}}
outputs: {{baked: {{path: {model}-{naming}-baked.safetensors, dtype: fp32}}}}
"""


def prepare(folder: Path) -> None:
    """Synthetic single files and their diffusers folders, made by sdrecipe."""
    from sdrecipe.engine.builder import update_outputs
    from sdrecipe.plan.prepare import prepare_recipe
    from sdrecipe.recipe.loader import parse_recipe
    from sdrecipe.synthetic import ModelSpec, write_model

    folder.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        single = write_model(folder / f"{family}.safetensors", ModelSpec(family, shrink=8, seed=1))
        text = (
            f"inputs: {{A: {single.name}}}\nnodes: {{model: A}}\n"
            f"outputs: {{model: {{path: {family}-diffusers, format: diffusers}}}}\n"
        )
        update_outputs(prepare_recipe(parse_recipe(text, folder / f"{family}.yaml")), threads=2)
        if family in LORA_FAMILIES:
            spec = ModelSpec(family, shrink=8, seed=1, delta_seed=2)
            write_model(folder / f"{family}-finetune.safetensors", spec)
            for name, recipe in (("lora", LORA_RECIPE), ("bake", BAKE_RECIPE)):
                text = recipe.format(family=family)
                recipe_path = folder / f"{family}-{name}.yaml"
                update_outputs(prepare_recipe(parse_recipe(text, recipe_path)), threads=2)
    prepare_dit(folder)
    prepare_flux_lora(folder)


def prepare_dit(folder: Path) -> None:
    """The Flux.1 and SD3 / SD3.5 single files and their diffusers folders."""
    from sdrecipe.engine.builder import update_outputs
    from sdrecipe.plan.prepare import prepare_recipe
    from sdrecipe.recipe.loader import parse_recipe
    from sdrecipe.synthetic import ModelSpec, write_model

    folder.mkdir(parents=True, exist_ok=True)
    for name, (family, layout, variant, shrink) in DIT_MODELS.items():
        spec = ModelSpec(family, variant=variant, shrink=shrink, seed=1, layout=layout)
        single = write_model(folder / f"{name}.safetensors", spec)
        text = (
            f"inputs: {{A: {single.name}}}\nnodes: {{model: A}}\n"
            f"outputs: {{model: {{path: {name}-diffusers, format: diffusers}}}}\n"
        )
        update_outputs(prepare_recipe(parse_recipe(text, folder / f"{name}.yaml")), threads=2)


def prepare_flux_lora(folder: Path) -> None:
    """A synthetic Flux.1 model, its diffusers folder, one LoRA per naming, and
    PEFT LoRAs extracted from a fine-tune of it, each with sdrecipe's bake of it
    into the single file."""
    from sdrecipe.engine.builder import update_outputs
    from sdrecipe.plan.prepare import prepare_recipe
    from sdrecipe.recipe.loader import parse_recipe
    from sdrecipe.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model

    folder.mkdir(parents=True, exist_ok=True)
    model = FLUX_LORA_MODEL
    single = write_model(
        folder / f"{model}.safetensors", ModelSpec("flux1", shrink=FLUX_LORA_SHRINK, seed=1)
    )
    text = (
        f"inputs: {{A: {single.name}}}\nnodes: {{model: A}}\n"
        f"outputs: {{model: {{path: {model}-diffusers, format: diffusers}}}}\n"
    )
    update_outputs(prepare_recipe(parse_recipe(text, folder / f"{model}.yaml")), threads=2)
    for naming in FLUX_LORA_NAMINGS:
        spec = AdapterSpec(
            family="flux1",
            shrink=FLUX_LORA_SHRINK,
            algorithm="lora",
            rank=FLUX_LORA_RANK,
            alpha=FLUX_LORA_ALPHA,
            seed=3,
            naming=naming,
        )
        write_adapter(folder / f"{model}-{naming}.safetensors", spec)
        text = FLUX_BAKE_RECIPE.format(model=model, naming=naming)
        recipe_path = folder / f"{model}-{naming}-bake.yaml"
        update_outputs(prepare_recipe(parse_recipe(text, recipe_path)), threads=2)
    spec = ModelSpec("flux1", shrink=FLUX_LORA_SHRINK, seed=1, delta_seed=2)
    write_model(folder / f"{FLUX_TUNED}.safetensors", spec)
    for rank in FLUX_EXTRACT_RANKS:
        naming = f"extracted-r{rank}"
        text = FLUX_EXTRACT_RECIPE.format(tuned=FLUX_TUNED, model=model, naming=naming, rank=rank)
        update_outputs(
            prepare_recipe(parse_recipe(text, folder / f"{model}-{naming}.yaml")), threads=2
        )
        text = FLUX_BAKE_RECIPE.format(model=model, naming=naming)
        recipe_path = folder / f"{model}-{naming}-bake.yaml"
        update_outputs(prepare_recipe(parse_recipe(text, recipe_path)), threads=2)


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


def _flux_converter(hidden: int) -> object:
    """diffusers' Flux converter. It takes the hidden width as the constant
    3072 (`inner_dim`) to split `linear1`; for a shrunken model, its own source
    runs with that one constant replaced by the model's width."""
    import inspect

    import diffusers.loaders.single_file_utils as conversion

    converter = conversion.convert_flux_transformer_checkpoint_to_diffusers
    if hidden == 3072:
        return converter
    source = inspect.getsource(converter)
    if source.count("inner_dim = 3072") != 1:
        raise RuntimeError("diffusers' Flux converter no longer sets inner_dim = 3072")
    namespace = dict(vars(conversion))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
    return namespace[converter.__name__]


def _run_dit(family: str, transformer: object) -> tuple[int, ...]:
    """One step of the transformer on random inputs; the output's shape."""
    import torch

    config = transformer.config
    with torch.no_grad():
        if family == "flux1":
            tokens, words = 16, 8
            guidance = torch.tensor([3.5]) if config.guidance_embeds else None
            return tuple(
                transformer.float()(
                    hidden_states=torch.randn(1, tokens, config.in_channels),
                    encoder_hidden_states=torch.randn(1, words, config.joint_attention_dim),
                    pooled_projections=torch.randn(1, config.pooled_projection_dim),
                    timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(tokens, 3),
                    txt_ids=torch.zeros(words, 3),
                    guidance=guidance,
                ).sample.shape
            )
        return tuple(
            transformer.float()(
                hidden_states=torch.randn(1, config.in_channels, 16, 16),
                encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim),
                pooled_projections=torch.randn(1, config.pooled_projection_dim),
                timestep=torch.tensor([500.0]),
            ).sample.shape
        )


def _matching(state: dict, expected: dict) -> dict:
    """`expected` cut to the keys the model has (text_model. prefixes ignored):
    e.g. a CLIPTextModel has no text projection, which ComfyUI's CLIP-L keeps."""
    names = {key.replace("text_model.", "") for key in state}
    return {
        key: value for key, value in expected.items() if key.replace("text_model.", "") in names
    }


def check_dit(folder: Path) -> int:
    """Load each Flux.1 / SD3 folder with diffusers; return the number of problems."""
    import diffusers
    import diffusers.loaders.single_file_utils as conversion
    import torch
    from safetensors.torch import load_file

    failures = 0
    for name, (family, _, _, _) in DIT_MODELS.items():
        single = load_file(folder / f"{name}.safetensors")
        target = folder / f"{name}-diffusers"
        model_class = getattr(diffusers, DIT_CLASSES.get(family, "SD3Transformer2DModel"))
        transformer = model_class.from_pretrained(target, subfolder="transformer")
        index = json.loads((target / "model_index.json").read_text())
        absent = {key: None for key, value in index.items() if value == [None, None]}
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            target, transformer=transformer, **absent
        )
        bare = not any(key.startswith(MODEL_PREFIX) for key in single)
        model = {
            key.removeprefix(MODEL_PREFIX): value
            for key, value in single.items()
            if (bare and not key.startswith(VAE_PREFIXES)) or key.startswith(MODEL_PREFIX)
        }
        if family == "flux1":
            expected = _flux_converter(model["img_in.weight"].shape[0])(dict(model))
        else:
            expected = conversion.convert_sd3_transformer_checkpoint_to_diffusers(dict(model))
        problems = _differences(transformer.state_dict(), expected)
        parts = [f"{len(expected)} transformer tensors", f"out {_run_dit(family, transformer)}"]
        if pipe.vae is not None:
            vae = {key: value for key, value in single.items() if key.startswith(VAE_PREFIXES)}
            converted = conversion.convert_ldm_vae_checkpoint(vae, pipe.vae.config)
            problems += _differences(pipe.vae.state_dict(), converted)
            with torch.no_grad():
                latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8)
                image = pipe.vae.float().decode(latents).sample
            parts.append(f"vae {tuple(image.shape)}")
        if getattr(pipe, "text_encoder", None) is not None:
            clip = conversion.convert_ldm_clip_checkpoint(single, CLIP_L_PREFIX)
            state = pipe.text_encoder.state_dict()
            problems += _differences(state, _matching(state, clip))
            vocabulary = pipe.text_encoder.config.vocab_size
            with torch.no_grad():
                pipe.text_encoder(torch.randint(0, vocabulary, (1, 77)))
            parts.append(f"CLIP-L {len(state)} tensors")
        t5 = getattr(pipe, "text_encoder_2", None) if family == "flux1" else None
        if t5 is not None:
            converted = conversion.convert_sd3_t5_checkpoint_to_diffusers(single)
            converted["encoder.embed_tokens.weight"] = converted["shared.weight"]  # tied
            problems += _differences(t5.state_dict(), converted)
            with torch.no_grad():
                t5(torch.randint(0, t5.config.vocab_size, (1, 16)))
            parts.append(f"T5 {len(converted)} tensors")
        scheduler = pipe.scheduler
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            problems.append(f"scheduler is {type(scheduler).__name__}")
        parts.append(f"shift {scheduler.config.shift}")
        status = "ok" if not problems else f"{len(problems)} problem(s): {problems[:3]}"
        print(f"{name:13} {type(pipe).__name__:34} {', '.join(parts)}  {status}")
        failures += len(problems)
    return failures


def _kohya_flux_converter(hidden: int) -> object:
    """diffusers' kohya Flux LoRA converter. It splits single blocks' `linear1`
    LoRA by the constant rows [3072, 3072, 3072, 12288] (q, k, v, MLP); for a
    shrunken model, its own source runs with those rows scaled to the width."""
    import inspect

    import diffusers.loaders.lora_conversion_utils as conversion

    converter = conversion._convert_kohya_flux_lora_to_diffusers
    if hidden == 3072:
        return converter
    source = inspect.getsource(converter)
    rows = "dims=[3072, 3072, 3072, 12288]"
    if source.count(rows) != 1:
        raise RuntimeError(f"diffusers' kohya Flux LoRA converter no longer has {rows}")
    namespace = dict(vars(conversion))
    scaled = f"dims=[{hidden}, {hidden}, {hidden}, {4 * hidden}]"
    exec(source.replace(rows, scaled), namespace)
    return namespace[converter.__name__]


def check_flux_lora(folder: Path) -> int:
    """Bake each Flux.1 LoRA with diffusers (`load_lora_weights`, `fuse_lora`)
    and compare the transformer with sdrecipe's bake; return the number of problems."""
    from safetensors.torch import load_file

    single = load_file(folder / f"{FLUX_LORA_MODEL}.safetensors")
    hidden = single["img_in.weight"].shape[0]
    convert = _flux_converter(hidden)
    base = convert(dict(single))
    extracted = tuple(f"extracted-r{rank}" for rank in FLUX_EXTRACT_RANKS)
    return sum(
        _check_flux_lora_file(folder, naming, hidden, convert, base)
        for naming in FLUX_LORA_NAMINGS + extracted
    )


def _check_flux_lora_file(
    folder: Path, naming: str, hidden: int, convert: object, base: dict
) -> int:
    """diffusers' bake of one Flux.1 LoRA against sdrecipe's; print one line,
    return the number of problems (a file diffusers refuses is one, with its error)."""
    import diffusers
    import diffusers.loaders.lora_pipeline as lora_pipeline
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = FLUX_LORA_MODEL
    name = f"{model}-{naming}"
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(
        folder / f"{model}-diffusers", subfolder="transformer", torch_dtype=torch.float32
    )
    before = {key: value.clone() for key, value in transformer.state_dict().items()}
    pipe = diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    # The PEFT config sdrecipe wrote (extracted files): rank, and modules below it.
    with safe_open(folder / f"{name}.safetensors", "pt") as file:
        config = json.loads((file.metadata() or {}).get("lora_adapter_metadata", "{}"))
    peft = ""
    if config:
        pattern = config.get("transformer.rank_pattern") or {}
        peft = (
            f"r {config.get('transformer.r')} alpha {config.get('transformer.lora_alpha')} "
            f"{len(config.get('transformer.target_modules', []))} modules, "
            f"rank_pattern {len(pattern)}, "
        )
    kohya = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = _kohya_flux_converter(hidden)
    try:
        pipe.load_lora_weights(folder, weight_name=f"{name}.safetensors")
    except Exception as error:  # diffusers refusing sdrecipe's file is the finding
        print(f"{name:25} diffusers refused it: {type(error).__name__}: {error}")
        return 1
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = kohya
    # PEFT's layers as diffusers built them: their rank and scale must be the file's.
    problems, layers = [], 0
    for module_name, module in transformer.named_modules():
        ranks = getattr(module, "r", None)
        if not isinstance(ranks, dict) or not ranks:
            continue
        layers += 1
        adapter, rank = next(iter(ranks.items()))
        scale = module.scaling[adapter]
        up = module.lora_B[adapter].weight.shape[1]
        if rank != up:
            problems.append(f"PEFT made {module_name} rank {rank}, the file's is {up}")
        wanted = config.get("transformer.lora_alpha", rank) / rank if config else None
        if wanted is not None and abs(scale - wanted) > 1e-6:
            problems.append(f"PEFT scales {module_name} by {scale:g}, not {wanted:g}")
    modules = len(config.get("transformer.target_modules", [])) if config else layers
    if layers != modules:
        problems.append(f"PEFT made {layers} LoRA layers of the file's {modules} modules")
    pipe.fuse_lora(lora_scale=1.0)
    # Unloading after fusing keeps the fused weights and removes PEFT's wrappers.
    pipe.unload_lora_weights()
    fused = transformer.state_dict()
    expected = convert(load_file(folder / f"{name}-baked.safetensors"))
    problems += [f"only in sdrecipe's: {key}" for key in expected.keys() - fused.keys()]
    problems += [f"only in diffusers': {key}" for key in fused.keys() - expected.keys()]
    ours, theirs, worst = set(), set(), 0.0
    for key in sorted(expected.keys() & fused.keys()):
        want, got, was = expected[key].float(), fused[key].float(), before[key].float()
        if not torch.equal(was, base[key].float()):
            problems.append(f"the diffusers folder differs from the single file: {key}")
            continue
        if not torch.equal(want, was):
            ours.add(key)
        if not torch.equal(got, was):
            theirs.add(key)
        if key in ours | theirs:
            change = (want - was).norm() if key in ours else (got - was).norm()
            error = ((got - want).norm() / change).item()
            worst = max(worst, error)
            if error > 1e-3:
                problems.append(f"{key}: relative error {error:.3g}")
    problems += [f"only sdrecipe changed {key}" for key in sorted(ours - theirs)]
    problems += [f"only diffusers changed {key}" for key in sorted(theirs - ours)]
    if not ours:
        problems.append("the LoRA changed nothing")
    status = "ok" if not problems else f"{len(problems)} problem(s): {problems[:3]}"
    print(
        f"{name:25} {type(pipe).__name__:12} {peft}{len(fused)} transformer tensors, "
        f"{len(ours)} changed (diffusers {len(theirs)}), "
        f"max relative error {worst:.2g}  {status}"
    )
    return len(problems)


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
    return failures + check_dit(folder) + check_flux_lora(folder)


if __name__ == "__main__":
    command, target = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        prepare(target)
    else:
        sys.exit(1 if check(target) else 0)
