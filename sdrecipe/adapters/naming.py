"""The module names adapters give a checkpoint key, computed forward from the key.

Reading `_`-flattened names backward is ambiguous (`transformer_blocks`,
`to_q`, `ff_net_0_proj`), so, like ComfyUI and sd-mecha, sdrecipe names every
checkpoint key in each style adapters use and looks the names up:

- kohya/LyCORIS: `lora_unet_` + the diffusers path (SD1/SD2 trainers) or the
  single-file path (SDXL trainers), `lora_te_` (`lora_te1_`, `lora_te2_` for
  SDXL) + the transformers path, dots as `_`; the same with `lycoris_`;
- diffusers/PEFT: `unet.`, `text_encoder.`, `text_encoder_2.` + the dotted
  diffusers path (and the bare path for the UNet).

OpenCLIP's fused `in_proj` (SD2, SDXL's second encoder) is three modules,
q, k and v, each patching a third of its rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdrecipe.arch.diffusers_names import diffusers_source
from sdrecipe.arch.family import known

# The layers kohya's trainers patch: attention and feed-forward layers of the
# UNet's transformers and of the text encoders (OpenCLIP's fused q/k/v too) ...
LORA_LAYERS = re.compile(
    r"(transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
    r"|\.proj_(in|out)|self_attn\.(q|k|v|out)_proj|mlp\.(fc1|fc2|c_fc|c_proj)"
    r"|attn\.out_proj)\.weight$|attn\.in_proj_weight$"
)
# ... and, for LoCon, the UNet's resnet, downsampling and upsampling layers.
LOCON_LAYERS = re.compile(
    r"^model\.diffusion_model\..*\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1"
    r"|op|\d\.conv)\.weight$"
)
PEFT_PREFIXES = {
    "unet": ("unet.", ""),
    "text_encoder": ("text_encoder.",),
    "text_encoder_2": ("text_encoder_2.",),
}
KOHYA_PREFIXES = ("lora", "lycoris")


@dataclass(frozen=True)
class KeyPart:
    """Part `index` of `parts` equal row blocks of a key (1 part: the whole key),
    and the module names that may patch it; `parameter` is weight or bias."""

    index: int
    parts: int
    names: tuple[str, ...]
    parameter: str


def module_names(family: str, key: str) -> tuple[KeyPart, ...]:
    """Every name an adapter module patching `key` may have, by part of the key;
    () for keys no adapter patches (VAE, embeddings' position ids, unknown families)."""
    if key.endswith("in_proj_weight") or key.endswith(".weight"):
        parameter = "weight"
    elif key.endswith("in_proj_bias") or key.endswith(".bias"):
        parameter = "bias"
    else:
        return ()
    data = known(family)
    if data is None or not data.adapters.patchable:
        return ()
    source = diffusers_source(family, key)
    if source is None or source.component == "vae":
        return ()
    component = source.component
    paths = [name.rsplit(".", 1)[0] for name in source.keys]
    single_file = key.split("model.diffusion_model.", 1)[-1].rsplit(".", 1)[0]
    parts = []
    for index, path in enumerate(paths):
        names = list(_kohya_names(family, component, path))
        if component == "unet" and single_file != path:
            names += _kohya_names(family, component, single_file)
        names += [prefix + path for prefix in PEFT_PREFIXES[component]]
        parts.append(KeyPart(index, len(paths), tuple(dict.fromkeys(names)), parameter))
    return tuple(parts)


def _kohya_names(family: str, component: str, path: str) -> list[str]:
    flat = path.replace(".", "_")
    data = known(family)
    names = data.adapters.kohya_text_encoders if data is not None else {}
    kind = "unet" if component == "unet" else names.get(component, "te")
    return [f"{prefix}_{kind}_{flat}" for prefix in KOHYA_PREFIXES]


def kohya_name(family: str, key: str) -> str | None:
    """The name kohya's trainers give the module patching `key` (the form
    `format: lora` outputs write), or None; for fused keys, see `module_names`."""
    parts = module_names(family, key)
    if len(parts) != 1:
        return None
    names = parts[0].names
    # SDXL trainers use single-file UNet paths; SD1/SD2 trainers diffusers paths.
    data = known(family)
    single_file = data is not None and data.adapters.kohya_unet_paths == "single_file"
    if single_file and key.startswith("model.diffusion_model."):
        return names[2] if len(names) > 2 and names[2].startswith("lora_unet_") else names[0]
    return names[0]
