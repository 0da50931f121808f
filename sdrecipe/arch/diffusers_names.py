"""Key names between the single-file (LDM/SGM) layout and diffusers folders.

The mapping is mechanical: tables of renamed parts, plus a few rules for the
block numbering (`input_blocks.{3i+j+1}` ↔ `down_blocks.i.resnets.j`) and for
tensors whose layout differs (OpenCLIP's fused q/k/v projection, its
transposed text projection, the VAE's 1x1 attention convolutions). The
transformers of Flux.1 and SD3 are named by tables in their family files
(`sdrecipe.arch.diffusers_tables`). This module only names things; which
tensor operation each name needs is `Source.kind`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sdrecipe.arch.diffusers_tables import Table, has_table, table
from sdrecipe.arch.family import families


def _components() -> dict[str, tuple[tuple[str, str, str], ...]]:
    return {
        data.name: tuple((c.prefix, c.folder, c.naming) for c in data.diffusers.components)
        for data in families()
        if data.diffusers is not None
    }


# Per family with a diffusers layout: (single-file prefix, diffusers component
# folder, naming scheme), from the family files.
COMPONENTS: dict[str, tuple[tuple[str, str, str], ...]] = _components()

# Per family: the (prefix, folder) of the component a file without prefixes is
# (Flux.1 as BFL ships it), and that a folder holding it alone reads back as.
BARE_WHEN_ALONE: dict[str, tuple[str, str]] = {
    data.name: (c.prefix, c.folder)
    for data in families()
    if data.diffusers is not None
    for c in data.diffusers.components
    if c.bare_when_alone
}
# (family, folder) of the CLIP text encoders whose single-file form has no position ids.
WITHOUT_POSITION_IDS: frozenset[tuple[str, str]] = frozenset(
    (data.name, c.folder)
    for data in families()
    if data.diffusers is not None
    for c in data.diffusers.components
    if not c.position_ids
)

UNET_FIXED = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "label_emb.0.2.": "add_embedding.linear_2.",
    "middle_block.0.": "mid_block.resnets.0.",
    "middle_block.1.": "mid_block.attentions.0.",
    "middle_block.2.": "mid_block.resnets.1.",
}
UNET_RESNET_PARTS = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "emb_layers.1.": "time_emb_proj.",
    "skip_connection.": "conv_shortcut.",
}
VAE_PARTS = {"nin_shortcut.": "conv_shortcut.", "norm_out.": "conv_norm_out."}
VAE_ATTENTION_PARTS = {
    "norm.": "group_norm.",
    "q.": "to_q.",
    "k.": "to_k.",
    "v.": "to_v.",
    "proj_out.": "to_out.0.",
}
# The VAE attention names of diffusers before 0.14, still found in older folders.
VAE_LEGACY_ATTENTION_PARTS = {
    "query.": "to_q.",
    "key.": "to_k.",
    "value.": "to_v.",
    "proj_attn.": "to_out.0.",
}
OPEN_CLIP_PARTS = {
    "transformer.resblocks.": "text_model.encoder.layers.",
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
OPEN_CLIP_FIXED = {
    "ln_final.": "text_model.final_layer_norm.",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text_projection": "text_projection.weight",
}
# Single-file keys that diffusers' text encoders do not store.
OPEN_CLIP_DROPPED = ("logit_scale",)
VAE_LEVELS = 4


@dataclass(frozen=True)
class Source:
    """Where a single-file tensor comes from in a diffusers component.

    kind is `same` (the tensor as stored), `conv1x1` (a linear weight seen as
    a 1x1 convolution), `transpose` (OpenCLIP's text projection), `qkv` (three
    tensors concatenated along dim 0, in `keys` order), `split` (tensors
    concatenated along dim 0, in `keys` order, their rows in the proportions
    `parts`: Flux's `linear1` is q, k, v and the MLP's input, 1:1:1:4) or `swap`
    (the stored tensor with the two halves of its rows exchanged).
    """

    component: str
    keys: tuple[str, ...]
    kind: str = "same"
    parts: tuple[int, ...] = ()


def _replace_parts(name: str, parts: dict[str, str], reverse: bool = False) -> str:
    for ldm, diffusers in parts.items():
        old, new = (diffusers, ldm) if reverse else (ldm, diffusers)
        name = name.replace(old, new)
    return name


# --- UNet -------------------------------------------------------------------------------

_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$")
_OUTPUT_BLOCK = re.compile(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$")
_DOWN_BLOCK = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)$")
_UP_BLOCK = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)$")


def unet_to_diffusers(name: str) -> str:
    """A single-file UNet key (without prefix) → its diffusers name."""
    for ldm, diffusers in UNET_FIXED.items():
        if name.startswith(ldm):
            rest = name[len(ldm) :]
            if ldm.startswith("middle_block.") and ldm != "middle_block.1.":
                rest = _replace_parts(rest, UNET_RESNET_PARTS)
            return diffusers + rest
    if match := _INPUT_BLOCK.match(name):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        level, index = divmod(block - 1, 3)
        if index == 2:  # input_blocks.{3(i+1)}.0.op: the downsampler of level i
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        if layer == 0:
            resnet = _replace_parts(rest, UNET_RESNET_PARTS)
            return f"down_blocks.{level}.resnets.{index}.{resnet}"
        return f"down_blocks.{level}.attentions.{index}.{rest}"
    if match := _OUTPUT_BLOCK.match(name):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        level, index = divmod(block, 3)
        if layer == 0:
            return f"up_blocks.{level}.resnets.{index}.{_replace_parts(rest, UNET_RESNET_PARTS)}"
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{index}.{rest}"
    raise KeyError(name)


def unet_from_diffusers(name: str, up_levels_with_attention: frozenset[int]) -> str:
    """A diffusers UNet key → its single-file name. Where an up level's upsampler
    goes depends on whether that level has attention layers."""
    for ldm, diffusers in UNET_FIXED.items():
        if name.startswith(diffusers):
            rest = name[len(diffusers) :]
            if ldm.startswith("middle_block.") and ldm != "middle_block.1.":
                rest = _replace_parts(rest, UNET_RESNET_PARTS, reverse=True)
            return ldm + rest
    if match := _DOWN_BLOCK.match(name):
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            return f"input_blocks.{3 * (level + 1)}.0.op.{rest.removeprefix('conv.')}"
        if kind == "resnets":
            resnet = _replace_parts(rest, UNET_RESNET_PARTS, reverse=True)
            return f"input_blocks.{3 * level + index + 1}.0.{resnet}"
        return f"input_blocks.{3 * level + index + 1}.1.{rest}"
    if match := _UP_BLOCK.match(name):
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            layer = 2 if level in up_levels_with_attention else 1
            return f"output_blocks.{3 * level + 2}.{layer}.{rest}"
        if kind == "resnets":
            resnet = _replace_parts(rest, UNET_RESNET_PARTS, reverse=True)
            return f"output_blocks.{3 * level + index}.0.{resnet}"
        return f"output_blocks.{3 * level + index}.1.{rest}"
    raise KeyError(name)


def up_levels_with_attention(diffusers_unet_keys: object) -> frozenset[int]:
    """The up levels of a diffusers UNet that have attention layers."""
    return frozenset(
        int(match[1])
        for key in diffusers_unet_keys  # type: ignore[attr-defined]
        if (match := _UP_BLOCK.match(key)) and match[2] == "attentions"
    )


# --- VAE --------------------------------------------------------------------------------

_VAE_DOWN = re.compile(r"^encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.*)$")
_VAE_UP = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$")
_VAE_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid\.block_(\d)\.(.*)$")
_VAE_MID_ATTENTION = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(.*)$")
_VAE_DOWN_D = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)$")
_VAE_UP_D = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$")
_VAE_MID_BLOCK_D = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$")
_VAE_MID_ATTENTION_D = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$")


def vae_to_diffusers(name: str) -> str:
    """A single-file VAE key (without prefix) → its diffusers name."""
    if match := _VAE_DOWN.match(name):
        inner = f"resnets.{match[3]}" if match[3] is not None else "downsamplers.0"
        return f"encoder.down_blocks.{match[1]}.{inner}.{_replace_parts(match[4], VAE_PARTS)}"
    if match := _VAE_UP.match(name):
        level = VAE_LEVELS - 1 - int(match[1])
        inner = f"resnets.{match[3]}" if match[3] is not None else "upsamplers.0"
        return f"decoder.up_blocks.{level}.{inner}.{_replace_parts(match[4], VAE_PARTS)}"
    if match := _VAE_MID_BLOCK.match(name):
        rest = _replace_parts(match[3], VAE_PARTS)
        return f"{match[1]}.mid_block.resnets.{int(match[2]) - 1}.{rest}"
    if match := _VAE_MID_ATTENTION.match(name):
        rest = _replace_parts(match[2], VAE_ATTENTION_PARTS)
        return f"{match[1]}.mid_block.attentions.0.{rest}"
    return _replace_parts(name, VAE_PARTS)


def vae_from_diffusers(name: str) -> str:
    """A diffusers VAE key → its single-file name."""
    if match := _VAE_DOWN_D.match(name):
        inner = f"block.{match[3]}" if match[3] is not None else "downsample"
        rest = _replace_parts(match[4], VAE_PARTS, reverse=True)
        return f"encoder.down.{match[1]}.{inner}.{rest}"
    if match := _VAE_UP_D.match(name):
        level = VAE_LEVELS - 1 - int(match[1])
        inner = f"block.{match[3]}" if match[3] is not None else "upsample"
        rest = _replace_parts(match[4], VAE_PARTS, reverse=True)
        return f"decoder.up.{level}.{inner}.{rest}"
    if match := _VAE_MID_BLOCK_D.match(name):
        rest = _replace_parts(match[3], VAE_PARTS, reverse=True)
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{rest}"
    if match := _VAE_MID_ATTENTION_D.match(name):
        rest = _replace_parts(match[2], VAE_LEGACY_ATTENTION_PARTS)
        rest = _replace_parts(rest, VAE_ATTENTION_PARTS, reverse=True)
        return f"{match[1]}.mid.attn_1.{rest}"
    return _replace_parts(name, VAE_PARTS, reverse=True)


def is_vae_attention_weight(ldm_name: str) -> bool:
    """VAE mid-attention projections: 1x1 convolutions here, linear in diffusers."""
    return bool(re.match(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_name))


# --- text encoders ----------------------------------------------------------------------

_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def open_clip_to_diffusers(name: str) -> tuple[str, ...]:
    """A single-file OpenCLIP key → its diffusers name(s); () if diffusers drops it.

    The fused `in_proj` becomes three keys, q, k and v, in that order.
    """
    if name in OPEN_CLIP_DROPPED:
        return ()
    if match := _IN_PROJ.match(name):
        layer, kind = match[1], match[2]
        base = f"text_model.encoder.layers.{layer}.self_attn"
        return tuple(f"{base}.{part}_proj.{kind}" for part in "qkv")
    for ldm, diffusers in OPEN_CLIP_FIXED.items():
        if name.startswith(ldm):
            return (diffusers + name[len(ldm) :],)
    return (_replace_parts(name, OPEN_CLIP_PARTS),)


_QKV_PROJECTION = re.compile(
    r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"
)


def open_clip_from_diffusers(name: str) -> tuple[str, str] | None:
    """A diffusers key of an OpenCLIP text encoder → (single-file name, kind), or
    None for the position ids, which the single-file layout does not store.

    q, k and v all map to their layer's fused `in_proj` name, with kind `qkv`.
    """
    if name.endswith("position_ids"):
        return None
    if match := _QKV_PROJECTION.match(name):
        return f"transformer.resblocks.{match[1]}.attn.in_proj_{match[3]}", "qkv"
    for ldm, diffusers in OPEN_CLIP_FIXED.items():
        if name.startswith(diffusers):
            kind = "transpose" if ldm == "text_projection" else "same"
            return ldm + name[len(diffusers) :], kind
    return _replace_parts(name, OPEN_CLIP_PARTS, reverse=True), "same"


# transformers' T5EncoderModel ties this to `shared.weight`; diffusers folders may store both.
T5_EMBEDDING_ALIAS = "encoder.embed_tokens.weight"
T5_SHARED = "shared.weight"


def t5_from_diffusers(name: str, stored: Iterable[str]) -> str | None:
    """A T5 encoder's stored name → its single-file name (the same: both are
    transformers' names); None for the embedding's alias beside `shared.weight`."""
    if name == T5_EMBEDDING_ALIAS and T5_SHARED in stored:
        return None
    return T5_SHARED if name == T5_EMBEDDING_ALIAS else name


class DiffusersNaming:
    """Where the single-file keys of one file go in a diffusers folder of `family`.

    `keys` are every key of the file: a table rule for a file's last block
    needs them (without them, naming such a key raises `UnknownLastBlock`).
    `model_prefix` is the prefix detection found the model's keys under: when
    it is empty, keys under no component's prefix belong to the family's
    `bare_when_alone` component.
    """

    def __init__(
        self, family: str, keys: Iterable[str] | None = None, model_prefix: str | None = None
    ):
        self.family = family
        self.components = COMPONENTS[family]
        bare = BARE_WHEN_ALONE.get(family)
        self._bare_prefix = bare[0] if bare is not None and model_prefix == "" else None
        self._last: dict[str, dict[int, str]] | None = None
        if keys is not None:
            canonical = [self.canonical(key) for key in keys]
            self._last = {
                prefix: self._table(scheme).last_blocks(
                    key[len(prefix) :] for key in canonical if key.startswith(prefix)
                )
                for prefix, _, scheme in self.components
                if has_table(family, scheme)
            }

    def _table(self, scheme: str) -> Table:
        return table(self.family, scheme)

    def canonical(self, key: str) -> str:
        """`key` under its component's prefix (a bare model key gains it)."""
        if self._bare_prefix is None or any(
            key.startswith(prefix) for prefix, _, _ in self.components
        ):
            return key
        return self._bare_prefix + key

    def source(self, ldm_key: str) -> Source | None:
        """Where a single-file key's tensor lives in the folder (None: nowhere)."""
        ldm_key = self.canonical(ldm_key)
        for prefix, component, scheme in self.components:
            if not ldm_key.startswith(prefix):
                continue
            name = ldm_key[len(prefix) :]
            if scheme == "unet":
                return Source(component, (unet_to_diffusers(name),))
            if scheme == "vae":
                kind = "conv1x1" if is_vae_attention_weight(name) else "same"
                return Source(component, (vae_to_diffusers(name),), kind)
            if scheme in ("hf_clip", "t5"):
                return Source(component, (name,))
            if scheme == "open_clip":
                keys = open_clip_to_diffusers(name)
                if not keys:
                    return None
                kind = (
                    "qkv"
                    if len(keys) == 3
                    else "transpose"
                    if name == "text_projection"
                    else "same"
                )
                return Source(component, keys, kind)
            last = None if self._last is None else self._last.get(prefix, {})
            mapped = self._table(scheme).to_diffusers(name, last)
            return Source(component, mapped.names, mapped.kind, mapped.parts)
        return None


def diffusers_source(family: str, ldm_key: str, keys: Iterable[str] | None = None) -> Source | None:
    """Where a single-file key's tensor lives in a diffusers folder (None: nowhere).

    `keys` (every key of the file) is needed where a family names its last block
    apart (SD3); for many keys, `DiffusersNaming` reads them once."""
    return DiffusersNaming(family, keys).source(ldm_key)
