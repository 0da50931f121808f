"""The module names adapters give a checkpoint key, computed forward from the key.

Reading `_`-flattened names backward is ambiguous (`transformer_blocks`,
`to_q`, `ff_net_0_proj`), so, like ComfyUI and sd-mecha, sdrecipe names every
checkpoint key in each style adapters use and looks the names up:

- kohya/LyCORIS: `lora_unet_` + the diffusers path (SD1/SD2 trainers) or the
  single-file path (SDXL, Flux and SD3 trainers), `lora_te_` (`lora_te1_`,
  `lora_te2_`, `lora_te3_` by encoder) + the transformers path, dots as `_`;
  the same with `lycoris_`; OneTrainer's `lora_transformer_` + the diffusers path;
- diffusers/PEFT: `unet.`, `transformer.`, `text_encoder.`, ... + the dotted
  diffusers path (also bare, or under `diffusion_model.` as ai-toolkit writes);
  ComfyUI's `diffusion_model.` + the single-file path;
- trainers' own names, from the family file (`adapters.names`: XLabs).

A fused tensor (OpenCLIP's `in_proj`, Flux's and SD3's `qkv`, Flux's `linear1`)
is patched whole by a single-file name and by row slices by diffusers names: a
`KeyPart` is rows [start, stop) of `total` equal units of the key. A diffusers
tensor whose row halves are exchanged (`norm_out.linear`) is a `swapped` part.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from sdrecipe.arch.diffusers_names import DiffusersNaming
from sdrecipe.arch.diffusers_tables import BLOCK, UnknownLastBlock, has_table
from sdrecipe.arch.family import Family, known

if TYPE_CHECKING:
    import torch

# The layers kohya's trainers patch: attention and feed-forward layers of the
# UNet's transformers and of the text encoders (OpenCLIP's fused q/k/v, T5's
# too), and every linear layer of Flux's and SD3's blocks ...
LORA_LAYERS = re.compile(
    r"(transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
    r"|\.proj_(in|out)|self_attn\.(q|k|v|out)_proj|mlp\.(fc1|fc2|c_fc|c_proj)"
    r"|attn\.out_proj|SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wi|wo)"
    r"|double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)"
    r"|single_blocks\.\d+\.(linear[12]|modulation\.lin)"
    r"|joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|adaLN_modulation\.1))"
    r"\.weight$|attn\.in_proj_weight$"
)
# ... and, for LoCon, the UNet's resnet, downsampling and upsampling layers.
LOCON_LAYERS = re.compile(
    r"^model\.diffusion_model\..*\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1"
    r"|op|\d\.conv)\.weight$"
)
# diffusers/PEFT prefixes of each component's diffusers paths.
PEFT_PREFIXES = {
    "unet": ("unet.", ""),
    "transformer": ("transformer.", "diffusion_model.", "base_model.model.", ""),
    "text_encoder": ("text_encoder.",),
    "text_encoder_2": ("text_encoder_2.",),
    "text_encoder_3": ("text_encoder_3.",),
}
# The prefixes diffusers itself writes, one per component.
PEFT_FIRST = tuple(prefixes[0] for prefixes in PEFT_PREFIXES.values())
# ComfyUI's own LoRA names: the single-file path under this prefix.
COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIXES = ("lora", "lycoris")


@dataclass(frozen=True)
class KeyPart:
    """Rows [start, stop) of `total` equal units of a key (0, 1, 1: all of it),
    the module names that may patch them, whether `parameter` is the weight or
    the bias, and whether the modules see the rows with their halves exchanged."""

    start: int
    stop: int
    total: int
    names: tuple[str, ...]
    parameter: str
    swapped: bool = False

    @property
    def whole(self) -> bool:
        """True when the part is every row of the key, in order."""
        return self.start == 0 and self.stop == self.total and not self.swapped

    def rows(self, count: int) -> slice:
        """The part's rows of a key with `count` rows."""
        return slice(count * self.start // self.total, count * self.stop // self.total)

    def in_order(self, rows: torch.Tensor) -> torch.Tensor:
        """The part's rows as its modules see them: a swapped part's two halves
        (shift and scale: an even count) exchanged, which undoes itself."""
        return rows.roll(rows.shape[0] // 2, 0) if self.swapped else rows

    def share(self, numel: int) -> int:
        """The part's elements of a key of `numel` elements."""
        return numel * (self.stop - self.start) // self.total


class ModuleNames:
    """The module names of the keys of one model of `family`.

    `keys` (every key of the model) are needed where a family names its last
    block apart (SD3's pre-only context block)."""

    def __init__(self, family: str, keys: Iterable[str] | None = None):
        self.family = family
        self.data = known(family)
        usable = (
            self.data is not None
            and self.data.adapters.patchable
            and self.data.diffusers is not None
        )
        self._naming = DiffusersNaming(family, keys, model_prefix="") if usable else None

    def __call__(self, key: str) -> tuple[KeyPart, ...]:
        """Every name an adapter module patching `key` may have, by part of the
        key; () for keys no adapter patches (VAE, position ids, unknown families)."""
        if key.endswith("in_proj_weight") or key.endswith(".weight"):
            parameter = "weight"
        elif key.endswith("in_proj_bias") or key.endswith(".bias"):
            parameter = "bias"
        else:
            return ()
        if self._naming is None or self.data is None:
            return ()
        try:
            source = self._naming.source(key)
        except KeyError:
            return ()
        if source is None or source.component == "vae":
            return ()
        component = source.component
        canonical = self._naming.canonical(key)
        prefix = next(p for p, folder, _ in self._naming.components if folder == component)
        single_file = canonical[len(prefix) :].rsplit(".", 1)[0]
        paths = [name.rsplit(".", 1)[0] for name in source.keys]
        tabled = any(
            has_table(self.family, scheme)
            for _, folder, scheme in self._naming.components
            if folder == component
        )
        names = _Names(self.data, component)
        if tabled:
            return self._table_parts(
                names, single_file, paths, source.kind, source.parts, parameter
            )
        parts = []
        for index, path in enumerate(paths):
            found = names.kohya(path)
            if component == "unet" and single_file != path:
                found = (
                    names.kohya(single_file) + found
                    if self.data.adapters.kohya_unet_paths == "single_file"
                    else found + names.kohya(single_file)
                )
            found += names.peft(path)
            parts.append(
                KeyPart(index, index + 1, len(paths), tuple(dict.fromkeys(found)), parameter)
            )
        return tuple(parts)

    def _table_parts(
        self,
        names: _Names,
        single_file: str,
        paths: list[str],
        kind: str,
        proportions: tuple[int, ...],
        parameter: str,
    ) -> tuple[KeyPart, ...]:
        """A transformer key (Flux, SD3): the whole tensor by its single-file
        names, each diffusers tensor it is made of by theirs, trainers' own names."""
        whole = (*names.kohya(single_file), COMFY_PREFIX + single_file)
        diffusers = [names.kohya_diffusers(path) + names.peft(path) for path in paths]
        if kind == "same" and len(paths) == 1:
            parts = [KeyPart(0, 1, 1, tuple(dict.fromkeys(whole + diffusers[0])), parameter)]
        else:
            parts = [KeyPart(0, 1, 1, whole, parameter)]
            if kind == "swap":
                parts.append(KeyPart(0, 1, 1, diffusers[0], parameter, swapped=True))
            else:
                sizes = proportions or (1,) * len(paths)
                start = 0
                for size, found in zip(sizes, diffusers, strict=True):
                    parts.append(KeyPart(start, start + size, sum(sizes), found, parameter))
                    start += size
        for rule in names.own:
            if (number := _matched(rule.module, single_file)) is not None:
                start, stop, total = rule.rows or (0, 1, 1)
                named = rule.name.replace(BLOCK, number)
                found = tuple(prefix + named for prefix in rule.prefixes)
                parts.append(KeyPart(start, stop, total, found, parameter))
        return tuple(parts)


class _Names:
    """The names of one component's modules, in each style."""

    def __init__(self, data: Family, component: str):
        self.component = component
        self.own = data.adapters.names if component == "transformer" else ()
        encoders = data.adapters.kohya_text_encoders
        self.kind = (
            "unet" if component in ("unet", "transformer") else encoders.get(component, "te")
        )

    def kohya(self, path: str) -> tuple[str, ...]:
        flat = path.replace(".", "_")
        return tuple(f"{prefix}_{self.kind}_{flat}" for prefix in KOHYA_PREFIXES)

    def kohya_diffusers(self, path: str) -> tuple[str, ...]:
        """OneTrainer's and LyCORIS' names for a diffusers transformer path, and
        SimpleTuner's LyCORIS ones (`lycoris_` + the path, as ComfyUI reads them)."""
        flat = path.replace(".", "_")
        return (*(f"{prefix}_transformer_{flat}" for prefix in KOHYA_PREFIXES), f"lycoris_{flat}")

    def peft(self, path: str) -> tuple[str, ...]:
        return tuple(prefix + path for prefix in PEFT_PREFIXES.get(self.component, ()))


def _matched(pattern: str, path: str) -> str | None:
    """The block number where `pattern` (with `{n}`) names `path`, else None."""
    regex = re.escape(pattern).replace(re.escape(BLOCK), r"(\d+)")
    found = re.fullmatch(regex, path)
    return None if found is None else (found.groups() or ("",))[0]


@cache
def _names_of(family: str) -> ModuleNames:
    return ModuleNames(family)


def module_names(family: str, key: str) -> tuple[KeyPart, ...]:
    """`ModuleNames` of a key of `family`, for callers that do not have the
    model's keys (fine except for SD3's last block, which then has no names)."""
    try:
        return _names_of(family)(key)
    except UnknownLastBlock:
        return ()


def extraction_parts(names: ModuleNames, key: str, style: str = "kohya") -> list[KeyPart]:
    """The parts an extracted LoRA factors `key` into, each to be written under
    its first name: in kohya's style, the whole key where a single-file name
    patches it (SDXL, Flux, SD3), else its diffusers parts (OpenCLIP's q, k, v);
    in PEFT's, each diffusers tensor under its `unet.`/`transformer.`/... name."""
    parts = names(key)
    if style == "peft":
        chosen = []
        for part in parts:
            first = next((n for n in part.names if n.startswith(PEFT_FIRST)), None)
            if first is not None:
                others = tuple(n for n in part.names if n != first)
                chosen.append(
                    KeyPart(
                        part.start,
                        part.stop,
                        part.total,
                        (first, *others),
                        part.parameter,
                        part.swapped,
                    )
                )
        return chosen
    whole = [p for p in parts if p.whole and p.names[0].startswith("lora_")]
    if whole:
        return whole[:1]
    return [p for p in parts if p.names[0].startswith("lora_") and not p.swapped]


def kohya_name(family: str, key: str) -> str | None:
    """The name kohya's trainers give the module patching all of `key`, or None
    (no module name, or a fused key they patch by parts: see `extraction_parts`)."""
    parts = extraction_parts(_names_of(family), key)
    return parts[0].names[0] if len(parts) == 1 and parts[0].whole else None
