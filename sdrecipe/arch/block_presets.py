"""The block-weight presets of supermerger and sd-meh: 26 values, BASE first.

supermerger's `mbwpresets_master.txt` and sd-meh's `presets.py` hold the same
values under two name sets; both are accepted. With `x = i/24` for block i
(IN00 = 0 … M00 = 12 … OUT11 = 24), `s(x) = 3x² - 2x³` and `fold` a triangle
wave, most presets are formulas; the rest are tables. BASE is 0 in every
preset but ALL_B. They are defined for the 26 blocks of SD1/SD2: no SDXL
presets exist in any tool.
"""

from __future__ import annotations

import math
from collections.abc import Callable

BLOCKS = 25  # IN00..IN11, M00, OUT00..OUT11


def _smoothstep(x: float) -> float:
    return 3 * x * x - 2 * x * x * x


def _fold(y: float) -> float:
    """A triangle wave: y mod 2, reflected above 1."""
    y = math.fmod(y, 2.0)
    return 2.0 - y if y > 1.0 else y


def _formula(value: Callable[[float], float], base: float = 0.0) -> tuple[float, ...]:
    return (base, *(value(i / (BLOCKS - 1)) for i in range(BLOCKS)))


def _table(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


_TRUE_CUBIC_HERMITE = _table(
    "0,0,0.199031876929012,0.325761959876543,0.424641927083333,0.498456790123457,"
    "0.549991560570988,0.58203125,0.597360869984568,0.598765432098765,0.589029947916667,"
    "0.570939429012346,0.547278886959876,0.520833333333333,0.49438777970679,0.470727237654321,"
    "0.45263671875,0.442901234567901,0.444305796682099,0.459635416666667,0.491675106095678,"
    "0.543209876543211,0.617024739583333,0.715904706790124,0.842634789737655,1"
)
_FAKE_CUBIC_HERMITE = _table(
    "0,0,0.157576195987654,0.28491512345679,0.384765625,0.459876543209877,0.512996720679012,"
    "0.546875,0.564260223765432,0.567901234567901,0.560546875,0.544945987654321,"
    "0.523847415123457,0.5,0.476152584876543,0.455054012345679,0.439453125,0.432098765432099,"
    "0.435739776234568,0.453125,0.487003279320987,0.540123456790124,0.615234375,"
    "0.71508487654321,0.842423804012347,1"
)


def _reversed_values(values: tuple[float, ...]) -> tuple[float, ...]:
    """1 - value for every block; BASE stays 0."""
    return (0.0, *(1.0 - value for value in values[1:]))


def _build() -> dict[str, tuple[float, ...]]:
    presets: dict[str, tuple[float, ...]] = {
        "GRAD_V": _formula(lambda x: abs(12 - 24 * x) / 12),
        "GRAD_A": _formula(lambda x: 1 - abs(12 - 24 * x) / 12),
        "FLAT_25": _formula(lambda x: 0.25),
        "FLAT_75": _formula(lambda x: 0.75),
        "SMOOTHSTEP": _formula(_smoothstep),
        "REVERSE-SMOOTHSTEP": _formula(lambda x: 1 - _smoothstep(x)),
        "COSINE": _formula(lambda x: (1 + math.cos(math.pi * x)) / 2),
        "REVERSE_COSINE": _formula(lambda x: (1 - math.cos(math.pi * x)) / 2),
        "ALL_A": _formula(lambda x: 0.0),
        "ALL_B": _formula(lambda x: 1.0, base=1.0),
        "TRUE_CUBIC_HERMITE": _TRUE_CUBIC_HERMITE,
        "TRUE_REVERSE_CUBIC_HERMITE": _reversed_values(_TRUE_CUBIC_HERMITE),
        "FAKE_CUBIC_HERMITE": _FAKE_CUBIC_HERMITE,
        "FAKE_REVERSE_CUBIC_HERMITE": _reversed_values(_FAKE_CUBIC_HERMITE),
        "WRAP08": _table("0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1"),
        "WRAP12": _table("0,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1"),
        "WRAP14": _table("0,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1"),
        "WRAP16": _table("0,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1"),
        "MID12_50": _table(
            "0,0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0"
        ),
        "OUT07": _table("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1"),
        "OUT12": _table("0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1"),
        "OUT12_5": _table("0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1"),
        "RING08_SOFT": _table("0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0"),
        "RING08_5": _table("0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0"),
        "RING10_5": _table("0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0"),
        "RING10_3": _table("0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0"),
        "LOW_OFFSET_CUBIC_HERMITE": _table(
            "0,0,0.099515938464506,0.1628809799382715,0.2123209635416665,0.249228395061729,"
            "0.274995780285494,0.291015625,0.298680434992284,0.2993827160493825,"
            "0.294514973958333,0.285469714506173,0.273639443479938,0.261513611593364,"
            "0.24938777970679,0.245727237654321,0.23763671875,0.222901234567901,"
            "0.224305796682099,0.234635416666667,0.247675106095678,0.273209876543211,"
            "0.312024739583333,0.360904706790124,0.422634789737655,0.5"
        ),
    }
    words = {2: "HALF", 3: "ONE_THIRD", 4: "ONE_FOURTH"}
    for n in (2, 3, 4):
        presets[f"SMOOTHSTEP*{n}"] = _formula(lambda x, n=n: _fold(n * _smoothstep(x)))
        presets[f"R_SMOOTHSTEP*{n}"] = _formula(lambda x, n=n: 1 - _fold(n * _smoothstep(x)))
        presets[f"SMOOTHSTEP/{n}"] = _formula(lambda x, n=n: _smoothstep(_fold(n * x)))
        presets[f"R_SMOOTHSTEP/{n}"] = _formula(lambda x, n=n: 1 - _smoothstep(_fold(n * x)))
        # sd-meh's names for the same values
        presets[f"{n}SMOOTHSTEP"] = presets[f"SMOOTHSTEP*{n}"]
        presets[f"{n}R_SMOOTHSTEP"] = presets[f"R_SMOOTHSTEP*{n}"]
        presets[f"{words[n]}_SMOOTHSTEP"] = presets[f"SMOOTHSTEP/{n}"]
        presets[f"{words[n]}_R_SMOOTHSTEP"] = presets[f"R_SMOOTHSTEP/{n}"]
    presets["REVERSE_SMOOTHSTEP"] = presets["REVERSE-SMOOTHSTEP"]
    return presets


PRESETS: dict[str, tuple[float, ...]] = _build()


# LoRA block weight (hako-mikan's sd-webui-lora-block-weight): a value for each
# of the 17 SD1 blocks that hold attention layers (12 for SDXL); the blocks a
# list leaves out get 0, as that extension, supermerger and ComfyUI's Inspire
# pack expand it (kohya's `--lbws` gives them 1 instead).
LBW_BLOCKS = {
    17: (
        "BASE",
        "IN01",
        "IN02",
        "IN04",
        "IN05",
        "IN07",
        "IN08",
        "M00",
        *(f"OUT{n:02}" for n in range(3, 12)),
    ),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{n:02}" for n in range(6))),
}
LBW_FAMILY = {17: "sd1", 12: "sdxl"}
# The presets the extension ships (`lbwpresets.txt`), 17 values each.
LBW_PRESETS = {
    "NONE": (0.0,) * 17,
    "ALL": (1.0,) * 17,
    "INS": _table("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _table("0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _table("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _table("0,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _table("0,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _table("0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _table("0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
}
