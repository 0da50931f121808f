"""UNet block tables for block-weighted merging (MBW), as data and one rule.

The IDs and their order are supermerger's, which users paste lists in:
- SD1 and SD2: `BASE`, `IN00`..`IN11`, `M00`, `OUT00`..`OUT11` (26 IDs);
- SDXL: `BASE`, `IN00`..`IN08`, `M00`, `OUT00`..`OUT08` (20 IDs), and `VAE`.

Where a key goes follows the majority convention (supermerger, sd-meh and the
original MBW extension): `time_embed` and `label_emb` are IN00, the final
`out.` layers are the last OUT block, `input_blocks.N` is INnn,
`middle_block` is M00, `output_blocks.N` is OUTnn; the text encoders, EMA and
every other key are BASE. The VAE is BASE for SD1/SD2 and `VAE` for SDXL
(supermerger's XL slot). No tool defines blocks for the SDXL refiner, so it
has none. Imports no torch.
"""

from __future__ import annotations

import fnmatch
import re

from sdrecipe.arch import UNET_PREFIX, VAE_PREFIX

BASE = "BASE"
_LEVELS = {"sd1": 12, "sd2": 12, "sdxl": 9}


def block_ids(family: str) -> tuple[str, ...]:
    """The family's block IDs in supermerger's order; empty when it has none."""
    count = _LEVELS.get(family)
    if count is None:
        return ()
    ids = (
        BASE,
        *(f"IN{n:02}" for n in range(count)),
        "M00",
        *(f"OUT{n:02}" for n in range(count)),
    )
    return (*ids, "VAE") if family == "sdxl" else ids


def listed_block_ids(family: str) -> tuple[str, ...]:
    """The IDs a pasted list of values covers, in order (SDXL's VAE is not listed)."""
    return tuple(block for block in block_ids(family) if block != "VAE")


def block_values_taken(family: str) -> str:
    """What a list of block values for `family` may be, in words."""
    if family in ("sd1", "sd2"):
        return "26 values (BASE first), 25 (without BASE), 17 (LoRA block weights) or a preset"
    if family == "sdxl":
        return "20 values (BASE first) or 12 (LoRA block weights); no tool defines SDXL presets"
    return "no list: it has no block table"


_NUMBERED = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_of(family: str, key: str) -> str | None:
    """The block of `key` in `family`, or None for a family without a table."""
    count = _LEVELS.get(family)
    if count is None:
        return None
    if key.startswith(VAE_PREFIX):
        return "VAE" if family == "sdxl" else BASE
    if not key.startswith(UNET_PREFIX):
        return BASE
    rest = key[len(UNET_PREFIX) :]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{count - 1:02}"
    match = _NUMBERED.match(rest)
    if match is None:
        return BASE
    kind, index = match[1], int(match[2])
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{index:02}"


def is_block_label(label: str) -> bool:
    """True for a label that names blocks of some family: an ID, a range
    (`IN04-IN08`) or a glob (`OUT*`)."""
    return any(
        block_matches(label, block, family) for family in _LEVELS for block in block_ids(family)
    )


def is_reversed_range(label: str) -> bool:
    """True for a range whose ends are in the wrong order (`IN08-IN04`)."""
    first, dash, last = label.partition("-")
    return bool(dash) and any(
        first in ids and last in ids and ids.index(first) > ids.index(last)
        for ids in map(block_ids, _LEVELS)
    )


def block_matches(label: str, block: str, family: str) -> bool:
    """True when `label` (an ID, a range `IN04-IN08` in table order, or a glob)
    covers `block` of `family`."""
    if label == block:
        return True
    ids = block_ids(family)
    if "-" in label:
        first, _, last = label.partition("-")
        if first in ids and last in ids and block in ids:
            return ids.index(first) <= ids.index(block) <= ids.index(last)
        return False
    return any(mark in label for mark in "*?[") and fnmatch.fnmatchcase(block, label)
