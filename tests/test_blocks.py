"""Block-weighted merges: block tables, pasted lists, presets, and block-by-block rebuilds."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import as32, invoke, write_recipe
from sdrecipe.arch.block_presets import PRESETS
from sdrecipe.arch.blocks import block_ids, block_of

REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sd-keys"

# Keys per block in the real layouts, counted once and pinned here.
SD1_COUNTS = {
    "BASE": 445, "IN00": 6, "IN01": 36, "IN02": 36, "IN03": 2, "IN04": 38, "IN05": 36,
    "IN06": 2, "IN07": 38, "IN08": 36, "IN09": 2, "IN10": 10, "IN11": 10, "M00": 46,
    "OUT00": 12, "OUT01": 12, "OUT02": 14, "OUT03": 38, "OUT04": 38, "OUT05": 40,
    "OUT06": 38, "OUT07": 38, "OUT08": 40, "OUT09": 38, "OUT10": 38, "OUT11": 42,
}  # fmt: skip
SDXL_COUNTS = {
    "BASE": 587, "IN00": 10, "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58, "IN05": 56,
    "IN06": 2, "IN07": 218, "IN08": 216, "M00": 226, "OUT00": 218, "OUT01": 218,
    "OUT02": 220, "OUT03": 58, "OUT04": 58, "OUT05": 60, "OUT06": 12, "OUT07": 12,
    "OUT08": 16, "VAE": 248,
}  # fmt: skip


@pytest.mark.parametrize(
    ("reference", "family", "expected"),
    [
        ("sd15_keys.json", "sd1", SD1_COUNTS),
        ("sd15_inpaint_keys.json", "sd1", SD1_COUNTS),
        ("sd2_keys.json", "sd2", {**SD1_COUNTS, "BASE": 542}),
        ("sdxl_keys.json", "sdxl", SDXL_COUNTS),
    ],
)
def test_every_key_of_the_real_layouts_is_in_exactly_one_block(reference, family, expected):
    path = REFERENCE_KEYS / reference
    if not path.exists():
        # The package's own key tables would only check the code against itself.
        pytest.skip(f"the reference key list {path} is missing: the real layouts are unchecked")
    keys = list(json.loads(path.read_text())["keys"])
    counts = Counter(block_of(family, key) for key in keys)
    assert set(counts) == set(block_ids(family)) and counts == Counter(expected)
    assert len(block_ids(family)) == (21 if family == "sdxl" else 26)


def independent_block(key: str, last: int) -> str:
    """supermerger's rules, written again: time_embed/label_emb IN00, out. last OUT."""
    unet = "model.diffusion_model."
    if not key.startswith(unet):
        return "BASE"
    rest = key[len(unet) :]
    if rest.startswith(("time_embed", "label_emb")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{last:02}"
    for pattern, name in ((r"input_blocks\.(\d+)\.", "IN"), (r"output_blocks\.(\d+)\.", "OUT")):
        match = re.match(pattern, rest)
        if match:
            return f"{name}{int(match[1]):02}"
    return "M00" if rest.startswith("middle_block.") else "BASE"


def recipe(models, alpha: str, output: str = "out: {path: out.safetensors, dtype: fp32}") -> str:
    return (
        f"inputs: {{A: {models['finetune']}, B: {models['other']}}}\n"
        f"nodes:\n  out: {{method: weighted_sum, models: [A, B], alpha: {alpha}}}\n"
        f"outputs:\n  {output}\n"
    )


def assert_block_weighted(tmp_path, arrays, values: dict[str, float]):
    out = load_file(tmp_path / "out.safetensors")
    a, b = arrays["finetune"], arrays["other"]
    for key, value in out.items():
        if not np.issubdtype(value.dtype, np.floating) or key.endswith("position_ids"):
            continue
        alpha = np.float32(values[independent_block(key, 11)])
        expected = (np.float32(1) - alpha) * as32(a[key]) + alpha * as32(b[key])
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=key)


def test_a_block_mapping_weights_each_block(tmp_path, models, arrays):
    alpha = '{default: 0.5, BASE: 0, IN00: 0.1, "IN04-IN08": 0.3, "OUT*": 0.8, OUT11: 0.9}'
    assert invoke("build", str(write_recipe(tmp_path, recipe(models, alpha)))).exit_code == 0
    values = {block: 0.5 for block in block_ids("sd1")}
    values |= {"BASE": 0.0, "IN00": 0.1} | {f"IN{n:02}": 0.3 for n in range(4, 9)}
    values |= {f"OUT{n:02}": 0.8 for n in range(11)} | {"OUT11": 0.9}
    assert_block_weighted(tmp_path, arrays, values)


WRAP08 = "0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1"


@pytest.mark.parametrize(
    "alpha",
    [f'"{WRAP08}"', f"[{WRAP08}]", "WRAP08", f'"{WRAP08[2:]}"'],
    ids=["string", "list", "preset", "25 values without BASE"],
)
def test_pasted_lists_and_presets_weight_the_blocks_in_supermergers_order(
    tmp_path, models, arrays, alpha
):
    result = invoke("build", str(write_recipe(tmp_path, recipe(models, alpha))))
    assert result.exit_code == 0, result.stderr
    numbers = [float(v) for v in WRAP08.split(",")]
    values = dict(zip(block_ids("sd1"), numbers, strict=True))
    if alpha == f'"{WRAP08[2:]}"':
        values["BASE"] = 0.5  # not listed: the method's default
    assert_block_weighted(tmp_path, arrays, values)


def test_a_preset_works_inside_an_expression(tmp_path, models):
    long_form = write_recipe(tmp_path, recipe(models, "GRAD_V"), "long.yaml")
    expression = recipe(models, "0").replace(
        "{method: weighted_sum, models: [A, B], alpha: 0}", '"weighted_sum(A, B, alpha=GRAD_V)"'
    )
    short = write_recipe(tmp_path, expression, "short.yaml")
    assert invoke("build", str(long_form)).exit_code == 0
    first = load_file(tmp_path / "out.safetensors")
    assert invoke("build", "--no-cache", str(short)).exit_code == 0
    second = load_file(tmp_path / "out.safetensors")
    assert all(np.array_equal(value, first[key]) for key, value in second.items())


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        ("[0.1, 0.2, 0.3]", "has 26 numbers for SD1/SD2 (BASE first), 25 without BASE, or 20"),
        ('"' + ",".join(["0.5"] * 20) + '"', "a list of 20 values, which fits SDXL"),
        ("{default: 0.5, VAE: 0.1}", "which sd1 has no block for"),
        ("{default: 0.5, IN12: 0.1}", "'IN12' is not default, a component"),
        ("NOT_A_PRESET", "is not a number, a list of block values or a preset"),
    ],
)
def test_block_values_that_do_not_fit_are_refused_with_the_expected_count(
    tmp_path, models, alpha, message
):
    result = invoke("build", str(write_recipe(tmp_path, recipe(models, alpha))))
    assert result.exit_code == 2
    assert message in result.stderr
    if "sd1 has no block" in message:
        assert "its 26 blocks are BASE, IN00" in result.stderr


def test_presets_equal_their_reference_values():
    x = np.arange(25) / 24
    smooth = 3 * x**2 - 2 * x**3

    def fold(y):
        y = np.mod(y, 2)
        return np.where(y > 1, 2 - y, y)

    formulas = {
        "GRAD_V": np.abs(12 - np.arange(25)) / 12,
        "GRAD_A": 1 - np.abs(12 - np.arange(25)) / 12,
        "SMOOTHSTEP": smooth,
        "REVERSE-SMOOTHSTEP": 1 - smooth,
        "SMOOTHSTEP*3": fold(3 * smooth),
        "R_SMOOTHSTEP*2": 1 - fold(2 * smooth),
        "SMOOTHSTEP/2": 3 * fold(2 * x) ** 2 - 2 * fold(2 * x) ** 3,
        "COSINE": (1 + np.cos(np.pi * x)) / 2,
        "FLAT_25": np.full(25, 0.25),
    }
    for name, blocks in formulas.items():
        np.testing.assert_allclose(PRESETS[name], [0.0, *blocks], atol=1e-12, err_msg=name)
    # Tabulated rows, as the reference notes print them (BASE first).
    ring10_3 = (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
    assert PRESETS["RING10_3"] == tuple(float(v) for v in ring10_3)
    assert math.isclose(PRESETS["TRUE_CUBIC_HERMITE"][2], 0.199031876929012)
    assert PRESETS["ALL_B"] == (1.0,) * 26 and PRESETS["ALL_A"] == (0.0,) * 26
    # sd-meh's names give the same values as supermerger's.
    for meh, supermerger in (
        ("2SMOOTHSTEP", "SMOOTHSTEP*2"),
        ("ONE_THIRD_R_SMOOTHSTEP", "R_SMOOTHSTEP/3"),
        ("REVERSE_SMOOTHSTEP", "REVERSE-SMOOTHSTEP"),
    ):
        assert PRESETS[meh] == PRESETS[supermerger]
    assert len({name for name in PRESETS if not name[0].isdigit()}) >= 39


def test_changing_one_blocks_value_rebuilds_only_that_block(tmp_path, models):
    path = write_recipe(
        tmp_path, recipe(models, "{default: 0.5, IN04: 0.2}", "out: out/x.safetensors")
    )
    assert invoke("build", str(path)).exit_code == 0
    path.write_text(path.read_text().replace("IN04: 0.2", "IN04: 0.3"))
    planned = json.loads(invoke("plan", "--json", str(path)).stdout)["nodes"][0]
    assert planned["reason"].startswith("alpha changed for IN04 0.2 -> 0.3 (38 keys)")
    summary = json.loads(invoke("build", "--json", str(path)).stdout)
    assert summary["cache"]["tensors_computed"] == SD1_COUNTS["IN04"]
    assert summary["cache"]["tensors_from_cache"] == 1130 - SD1_COUNTS["IN04"]


def test_blocks_lists_a_family_and_a_model(models):
    listed = json.loads(invoke("blocks", "--json", "sdxl").stdout)
    assert {name: entry["keys"] for name, entry in listed["blocks"].items()} == SDXL_COUNTS
    model = json.loads(invoke("blocks", "--json", "--keys", str(models["finetune"])).stdout)
    assert model["family"] == "sd1"
    assert model["blocks"]["IN04"]["keys"] == 38
    assert all(".input_blocks.4." in key for key in model["blocks"]["IN04"]["key_names"])
    refused = invoke("blocks", "sdxl-refiner")
    assert refused.exit_code == 2 and "no block table" in refused.stderr
