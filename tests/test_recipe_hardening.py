"""Recipes as untrusted input (issue 26): key regexes that cannot hang, recipe
files that are not regular text files, folders with broken recipes, file://
paths, sweeps whose checking grows with their size, block-weight messages, and
the per-key precedence and block presets against independent definitions."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import as32, invoke, run_cli, write_recipe
from sdrecipe.arch.block_presets import LBW_PRESETS, PRESETS
from sdrecipe.arch.blocks import block_ids
from sdrecipe.recipe.expr import PerKey
from sdrecipe.recipe.per_key import key_context, per_block, resolve
from sdrecipe.synthetic import ModelSpec, write_model

IN04_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


def weighted(models, alpha: str, extra: str = "") -> str:
    """A recipe: weighted_sum of two SD1 models with `alpha` as written."""
    return (
        f"inputs: {{A: {models['base']}, B: {models['other']}}}\n"
        f"nodes:\n  out:\n    method: weighted_sum\n    models: [A, B]\n{extra}"
        f"    alpha: {alpha}\n"
        "outputs:\n  out: {path: out.safetensors, dtype: fp32}\n"
    )


# --- key regexes (item 6)


def test_a_backtracking_regex_does_not_hang_validate_or_build(tmp_path, small_models):
    """`^([a-z_.0-9]+)+!$` backtracks exponentially in Python's `re` on every
    key; RE2 answers at once. (A subprocess, so that a hang fails, not blocks.)
    The small models' 39 keys: `re` would hang on the first."""
    models = small_models
    recipe = write_recipe(
        tmp_path,
        weighted(
            models,
            '{default: 0.5, "re:^([a-z_.0-9]+)+!$": 1.0}',
            '    include_keys: ["^(m+)+x$|diffusion"]\n',
        ),
    )
    for command in ("validate", "build"):
        try:
            result = run_cli(command, str(recipe), cwd=tmp_path)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command} hung on a backtracking regex")
        assert result.returncode == 0, result.stderr
    out, a = load_file(tmp_path / "out.safetensors"), load_file(models["base"])
    b = load_file(models["other"])
    unet_key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    np.testing.assert_allclose(out[unet_key], 0.5 * as32(a[unet_key]) + 0.5 * as32(b[unet_key]))
    text_key = next(key for key in out if key.startswith("cond_stage_model.") and "weight" in key)
    np.testing.assert_array_equal(out[text_key], as32(a[text_key]))  # outside include_keys


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(a)\\1", "have no backreferences or lookaround"),
        ("(?=input)", "have no backreferences or lookaround"),
        ("(" * 5000 + "a" + ")" * 5000, "has 10,001 characters; a key regex has at most 1,000"),
        ("a" * 1_000_000, "has 1,000,000 characters"),
    ],
    ids=["backreference", "lookahead", "5000 deep", "1 MB"],
)
@pytest.mark.parametrize(("where", "line"), [("per-key", 3), ("include_keys", 6)])
def test_a_regex_re2_cannot_run_is_refused_with_the_line(
    tmp_path, models, pattern, message, where, line
):
    if where == "per-key":
        # An explicit key: PyYAML refuses implicit keys over 1,024 characters.
        text = weighted(models, f"\n      ? {json.dumps('re:' + pattern)}\n      : 1.0")
    else:
        text = weighted(models, "0.5", f"    include_keys: [{json.dumps(pattern)}]\n")
    recipe = write_recipe(tmp_path, text)
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert f"{recipe.name}:{line}: node 'out'" in result.stderr
    assert message in result.stderr
    assert len(result.stderr) < 1000


# --- recipe files that are not regular text files (items 7, 12)


def test_a_fifo_or_a_device_as_the_recipe_is_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    for name, kind in (("pipe.yaml", "named pipe (FIFO)"), ("zero.yaml", "character device")):
        try:
            result = run_cli("validate", str(tmp_path / name))
        except subprocess.TimeoutExpired:
            pytest.fail(f"validate {name} blocked")
        assert result.returncode == 2
        assert f"{name}: the recipe is a {kind}, not a file of YAML text" in result.stderr


def test_a_lock_file_that_is_a_fifo_or_a_device_is_refused_without_reading(tmp_path, models):
    """The lock beside a recipe is read as untrusted as the recipe is."""
    recipe = write_recipe(tmp_path, weighted(models, "0.5"))
    lock = recipe.with_suffix(".lock")
    for kind, make in (
        ("named pipe (FIFO)", lambda: os.mkfifo(lock)),
        ("character device", lambda: lock.symlink_to("/dev/zero")),
    ):
        make()
        try:
            result = run_cli("build", str(recipe))
        except subprocess.TimeoutExpired:
            pytest.fail(f"build with a {kind} as the lock blocked")
        assert result.returncode == 2, result.stderr
        assert f"{lock}: the lock file is a {kind}" in result.stderr
        assert not (tmp_path / "out.safetensors").exists()
        lock.unlink()


def test_a_recipe_over_the_size_limit_is_refused_before_parsing(tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("# padding\n" * 500_000)  # 5 MB of comments: valid YAML
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "big.yaml: the recipe is larger than 4 MiB" in result.stderr


@pytest.mark.parametrize(
    ("byte", "code"), [(b"\x00", "U+0000"), (b"\x07", "U+0007"), (b"\x1b", "U+001B")]
)
def test_control_characters_in_a_recipe_name_the_line(tmp_path, models, byte, code):
    recipe = tmp_path / "ctl.yaml"
    text = weighted(models, "0.5").encode()
    recipe.write_bytes(text.replace(b"models: [A, B]", b"models: [A, " + byte + b"B]"))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert f"ctl.yaml:5: the recipe holds the control character {code} at column" in result.stderr


def test_a_model_given_as_the_recipe_is_refused_as_not_text(tmp_path, models):
    small = tmp_path / "model.safetensors"
    small.write_bytes(models["base"].read_bytes()[:100_000])
    result = invoke("validate", str(small))
    assert result.exit_code == 2
    assert "model.safetensors" in result.stderr
    assert "is this a model or another binary file?" in result.stderr


# --- build -k FOLDER with broken recipes (item 13)


def test_keep_going_builds_the_recipes_beside_unloadable_ones(tmp_path, models):
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_recipe(folder, weighted(models, "0.5"), "a.yaml")
    (folder / "b.yaml").write_text("inputs: {A: [\n")
    (folder / "c.yaml").symlink_to("c.yaml")
    (folder / "d.yaml").mkdir()
    result = invoke("build", "-k", str(folder))
    assert result.exit_code == 1, result.stderr
    assert (folder / "out.safetensors").is_file()
    assert "3 of 4 recipes failed" in result.stdout
    assert "b.yaml:2: YAML syntax error" in result.stdout
    assert "c.yaml: cannot read the recipe: Too many levels of symbolic links" in result.stdout
    assert "d.yaml: the recipe is a folder" in result.stdout
    listed = json.loads(invoke("build", "-k", "--json", str(folder)).stdout)
    assert sorted(os.path.basename(failure["recipe"]) for failure in listed["failed"]) == [
        "b.yaml",
        "c.yaml",
        "d.yaml",
    ]
    assert invoke("build", str(folder)).exit_code == 2  # without -k: the first error


# --- file:// paths (item 14)


def test_file_urls_are_local_paths(tmp_path, models):
    escaped = str(models["other"]).replace("-", "%2D")
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: "file://{models["base"]}", B: "file://localhost{escaped}"}}
        nodes: {{out: "weighted_sum(A, B, alpha=0.5)"}}
        outputs: {{out: "file://{tmp_path}/url-out.safetensors"}}
        """,
    )
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "url-out.safetensors").is_file()
    recipe.write_text(recipe.read_text().replace("file://localhost", "file://elsewhere"))
    refused = invoke("validate", str(recipe))
    assert refused.exit_code == 2
    assert "recipe.yaml:1: input 'B'" in refused.stderr
    assert "names the host 'elsewhere'" in refused.stderr


# --- sweeps: checking grows with the distinct work (item 10)


def test_checking_a_sweep_grows_with_its_outputs_not_their_square(tmp_path, models, monkeypatch):
    """Each output's path is resolved a bounded number of times, and each node's
    operands worked out once, not once per key or per pair of outputs."""
    import sdrecipe.plan.graph
    import sdrecipe.plan.guard

    calls = {"realpath": 0, "references": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        sdrecipe.plan.guard.os.path, "realpath", counted("realpath", os.path.realpath)
    )
    monkeypatch.setattr(
        sdrecipe.plan.graph, "references", counted("references", sdrecipe.plan.graph.references)
    )
    alphas = [round(0.01 * n, 2) for n in range(1, 121)]
    recipe = write_recipe(
        tmp_path,
        f"""
        matrix: {{alpha: {alphas}}}
        inputs: {{A: {models["base"]}, B: {models["other"]}}}
        nodes: {{mix: "weighted_sum(A, B, alpha=${{alpha}})"}}
        outputs: {{mix: "sweep/mix-${{alpha}}.safetensors"}}
        """,
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 0, result.stderr
    # Each output against each input, the recipe, its lock and the cache: 11 each;
    # against every other output too: 2 * 120 * 120 more.
    assert calls["realpath"] < 20 * len(alphas)
    assert calls["references"] < 10 * len(alphas)  # per key and node: 135,000 and more


@pytest.mark.parametrize(
    ("first", "second", "relation"),
    [
        ("out/x.safetensors", "out/x.safetensors/y.safetensors", "contains"),
        ("out/x.safetensors/y.safetensors", "out/x.safetensors", "lies inside"),
        ("out/a.safetensors", "out/../out/a.safetensors", "is"),
    ],
)
def test_outputs_that_overlap_are_refused(tmp_path, models, first, second, relation):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {models["other"]}}}
        nodes: {{a: "weighted_sum(A, B, alpha=0.5)", b: B}}
        outputs: {{a: {first}, b: {second}}}
        """,
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "would write the same place" in result.stderr
    assert f" {relation} " in result.stderr


def test_outputs_hard_linked_to_each_other_are_refused(tmp_path, models):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.safetensors").write_bytes(b"")
    os.link(tmp_path / "out" / "a.safetensors", tmp_path / "out" / "b.safetensors")
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {models["other"]}}}
        nodes: {{a: "weighted_sum(A, B, alpha=0.5)", b: B}}
        outputs: {{a: out/a.safetensors, b: out/b.safetensors}}
        """,
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "outputs 'a' and 'b' would write the same place" in result.stderr


# --- block-weight messages (item 17)


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return {
        name: write_model(folder / f"{name}.safetensors", ModelSpec("sdxl", shrink=64, seed=seed))
        for name, seed in (("base", 1), ("other", 2))
    }


SD1_TAKES = "which takes 26 values (BASE first), 25 (without BASE), 17 (LoRA block weights)"
SDXL_TAKES = "sdxl, which takes 20 values (BASE first) or 12 (LoRA block weights)"


@pytest.mark.parametrize(
    ("family", "alpha", "message"),
    [
        ("sd1", "[" + ", ".join(["0.5"] * 20) + "]", "a list of 20 values, which fits SDXL, "),
        ("sd1", "[" + ", ".join(["0.5"] * 12) + "]", "a list of 12 values, which fits SDXL (LoRA"),
        ("sdxl", "GRAD_V", "is the preset GRAD_V (26 values, for SD1/SD2)"),
        ("sdxl", "INALL", "is the preset INALL (17 values, for SD1/SD2)"),
        ("sdxl", "[" + ", ".join(["0.5"] * 17) + "]", "a list of 17 values, which fits SD1/SD2 (L"),
        ("sdxl", "[" + ", ".join(["0.5"] * 25) + "]", "a list of 25 values, which fits SD1/SD2, "),
        ("sdxl", '"' + ",".join(["0.5"] * 26) + '"', "a list of 26 values, which fits SD1/SD2, "),
    ],
)
def test_block_values_for_another_family_say_what_the_family_takes(
    tmp_path, models, sdxl_models, family, alpha, message
):
    chosen = models if family == "sd1" else sdxl_models
    recipe = write_recipe(tmp_path, weighted(chosen, alpha))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert message in result.stderr
    assert (SD1_TAKES if family == "sd1" else SDXL_TAKES) in result.stderr
    assert " names " not in result.stderr  # not "names VAE" / "names IN09, IN10, ..."


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        ('{default: 0.5, "IN08-IN04": 1}', "the range 'IN08-IN04' is reversed: write IN04-IN08"),
        ('{default: 0.5, "OUT02-IN01": 1}', "the range 'OUT02-IN01' is reversed: write IN01-OUT02"),
        ('"0,1,1,x,' + ",".join(["0"] * 22) + '"', "value 4 of the 26 in the list, 'x', is not"),
        ("[0, 1, 1, x, " + ", ".join(["0"] * 22) + "]", "has 'x' as value 4 of the 26 in its list"),
        ('"nan,' + ",".join(["0"] * 25) + '"', "value 1 of the 26 in the list is nan"),
        ("[.nan, " + ", ".join(["0"] * 25) + "]", "has nan as value 1 of the 26 in its list"),
    ],
)
def test_a_bad_range_or_entry_is_named(tmp_path, models, alpha, message):
    result = invoke("validate", str(write_recipe(tmp_path, weighted(models, alpha))))
    assert result.exit_code == 2
    assert message in result.stderr


# --- per-key precedence (item 20) and pasted lists


def test_per_key_precedence_is_regex_then_block_then_component_then_default():
    value = PerKey(
        (
            ("default", 0.1),
            ("unet", 0.2),
            ("IN00-IN08", 0.3),  # a range before the ID it contains: the ID wins
            ("IN04", 0.4),
            ("re:proj_in", 0.5),
            ("re:input_blocks", 0.6),  # written later than re:proj_in: loses to it
        )
    )

    def value_of(key: str) -> float:
        return resolve(value, key_context(key, "sd1"))

    assert value_of(IN04_KEY) == 0.5
    assert value_of("model.diffusion_model.input_blocks.4.0.skip_connection.weight") == 0.6
    assert value_of("model.diffusion_model.output_blocks.4.0.skip_connection.weight") == 0.2
    assert value_of("model.diffusion_model.middle_block.1.norm.weight") == 0.2
    assert value_of("first_stage_model.decoder.conv_in.weight") == 0.1
    without_regex = PerKey(value.entries[:4])
    assert resolve(without_regex, key_context(IN04_KEY, "sd1")) == 0.4
    out05 = key_context("model.diffusion_model.output_blocks.5.0.skip_connection.weight", "sd1")
    assert resolve(PerKey((("unet", 0.2), ("OUT*", 0.7))), out05) == 0.7
    in_range = PerKey((("default", 0.2), ("IN00-IN08", 0.3)))
    assert resolve(in_range, key_context(IN04_KEY, "sd1")) == 0.3


def test_a_25_value_list_starts_at_IN00_and_leaves_BASE_to_the_default():
    values = tuple(round(0.01 * n, 2) for n in range(1, 26))
    mapping = per_block(values)
    assert "BASE" not in dict(mapping.entries)
    given = PerKey((("default", 0.99), *mapping.entries))
    ids = block_ids("sd1")[1:]
    keys = {
        "IN00": "model.diffusion_model.time_embed.0.weight",
        "IN04": IN04_KEY,
        "M00": "model.diffusion_model.middle_block.0.in_layers.0.weight",
        "OUT11": "model.diffusion_model.out.2.weight",
    }
    for block, key in keys.items():
        assert resolve(given, key_context(key, "sd1")) == values[ids.index(block)]
    text_encoder = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert resolve(given, key_context(text_encoder, "sd1")) == 0.99


# --- every block preset against its definition (item 22), written here again


def _smooth(x):
    return 3 * x**2 - 2 * x**3


def _fold(y):
    y = np.mod(y, 2.0)
    return np.where(y > 1, 2 - y, y)


_X = np.arange(25) / 24
_I = np.arange(25)
# supermerger's mbwpresets_master.txt / sd-meh's presets.py (shared/reference/advanced.md 2.3):
# BASE first, then IN00..IN11, M00, OUT00..OUT11.
_TABLES = """
WRAP08      0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1
WRAP12      0,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1
WRAP14      0,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1
WRAP16      0,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1
MID12_50    0,0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0
OUT07       0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1
OUT12       0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1
OUT12_5     0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1
RING08_SOFT 0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0
RING08_5    0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0
RING10_5    0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0
RING10_3    0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0
TRUE_CUBIC_HERMITE 0,0,0.199031876929012,0.325761959876543,0.424641927083333,0.498456790123457,0.549991560570988,0.58203125,0.597360869984568,0.598765432098765,0.589029947916667,0.570939429012346,0.547278886959876,0.520833333333333,0.49438777970679,0.470727237654321,0.45263671875,0.442901234567901,0.444305796682099,0.459635416666667,0.491675106095678,0.543209876543211,0.617024739583333,0.715904706790124,0.842634789737655,1
FAKE_CUBIC_HERMITE 0,0,0.157576195987654,0.28491512345679,0.384765625,0.459876543209877,0.512996720679012,0.546875,0.564260223765432,0.567901234567901,0.560546875,0.544945987654321,0.523847415123457,0.5,0.476152584876543,0.455054012345679,0.439453125,0.432098765432099,0.435739776234568,0.453125,0.487003279320987,0.540123456790124,0.615234375,0.71508487654321,0.842423804012347,1
LOW_OFFSET_CUBIC_HERMITE 0,0,0.099515938464506,0.1628809799382715,0.2123209635416665,0.249228395061729,0.274995780285494,0.291015625,0.298680434992284,0.2993827160493825,0.294514973958333,0.285469714506173,0.273639443479938,0.261513611593364,0.24938777970679,0.245727237654321,0.23763671875,0.222901234567901,0.224305796682099,0.234635416666667,0.247675106095678,0.273209876543211,0.312024739583333,0.360904706790124,0.422634789737655,0.5
"""  # noqa: E501
_TABLED = {
    name: np.array([float(v) for v in row.split(",")])
    for name, row in (line.split() for line in _TABLES.strip().splitlines())
}


def _expected_presets() -> dict[str, np.ndarray]:
    """Every preset's 26 values, BASE first, from the formulas and tables."""
    blocks = {
        "GRAD_V": np.abs(12 - _I) / 12,
        "GRAD_A": 1 - np.abs(12 - _I) / 12,
        "FLAT_25": np.full(25, 0.25),
        "FLAT_75": np.full(25, 0.75),
        "SMOOTHSTEP": _smooth(_X),
        "REVERSE-SMOOTHSTEP": 1 - _smooth(_X),
        "REVERSE_SMOOTHSTEP": 1 - _smooth(_X),
        "COSINE": (1 + np.cos(np.pi * _X)) / 2,
        "REVERSE_COSINE": (1 - np.cos(np.pi * _X)) / 2,
        "ALL_A": np.zeros(25),
    }
    words = {2: "HALF", 3: "ONE_THIRD", 4: "ONE_FOURTH"}
    for n in (2, 3, 4):
        for names, values in (
            ((f"SMOOTHSTEP*{n}", f"{n}SMOOTHSTEP"), _fold(n * _smooth(_X))),
            ((f"R_SMOOTHSTEP*{n}", f"{n}R_SMOOTHSTEP"), 1 - _fold(n * _smooth(_X))),
            ((f"SMOOTHSTEP/{n}", f"{words[n]}_SMOOTHSTEP"), _smooth(_fold(n * _X))),
            ((f"R_SMOOTHSTEP/{n}", f"{words[n]}_R_SMOOTHSTEP"), 1 - _smooth(_fold(n * _X))),
        ):
            blocks |= dict.fromkeys(names, values)
    expected = {name: np.concatenate([[0.0], values]) for name, values in blocks.items()}
    expected["ALL_B"] = np.ones(26)
    expected |= _TABLED
    for name in ("TRUE", "FAKE"):
        table = _TABLED[f"{name}_CUBIC_HERMITE"]
        expected[f"{name}_REVERSE_CUBIC_HERMITE"] = np.concatenate([[0.0], 1 - table[1:]])
    return expected


def test_every_block_preset_equals_its_table_or_formula():
    expected = _expected_presets()
    assert set(PRESETS) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(PRESETS[name], values, rtol=0, atol=1e-12, err_msg=name)
    # The LBW extension's lbwpresets.txt, 17 values: BASE IN01 IN02 IN04 IN05 IN07 IN08
    # M00 OUT03..OUT11.
    lbw = {
        "NONE": [0] * 17,
        "ALL": [1] * 17,
        "INS": [1, 1, 1, 1] + [0] * 13,
        "IND": [0, 0, 0, 0, 1, 1, 1] + [0] * 10,
        "INALL": [1] * 7 + [0] * 10,
        "MIDD": [0, 0, 0, 0] + [1] * 8 + [0] * 5,
        "OUTD": [0] * 8 + [1] * 4 + [0] * 5,
        "OUTS": [0] * 12 + [1] * 5,
        "OUTALL": [0] * 8 + [1] * 9,
    }
    assert {name: list(values) for name, values in LBW_PRESETS.items()} == lbw


def test_GRAD_V_weights_each_block_by_its_distance_from_the_middle(tmp_path, models, arrays):
    """A build with GRAD_V: block i of 25 (IN00..OUT11) gets |12 - i| / 12."""
    result = invoke("build", str(write_recipe(tmp_path, weighted(models, "GRAD_V"))))
    assert result.exit_code == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    a, b = arrays["base"], arrays["other"]
    for key, block_index in (
        ("model.diffusion_model.time_embed.0.weight", 0),
        ("model.diffusion_model.input_blocks.4.1.proj_in.weight", 4),
        ("model.diffusion_model.input_blocks.11.0.in_layers.2.weight", 11),
        ("model.diffusion_model.middle_block.1.proj_in.weight", 12),
        ("model.diffusion_model.output_blocks.3.1.proj_in.weight", 16),
        ("model.diffusion_model.out.2.weight", 24),
    ):
        alpha = np.float32(abs(12 - block_index) / 12)
        expected = (np.float32(1) - alpha) * as32(a[key]) + alpha * as32(b[key])
        np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)


# --- NUL bytes and malformed file: URLs in paths (CLI audit, items 2 and 4)


def _one_input_recipe(models, a_path: str, out_path: str = "out.safetensors") -> str:
    """A recipe whose input A and output are the given YAML scalars."""
    return (
        f"inputs: {{A: {a_path}, B: {models['other']}}}\n"
        "nodes:\n  out:\n    method: weighted_sum\n    models: [A, B]\n    alpha: 0.5\n"
        f"outputs:\n  out: {{path: {out_path}, dtype: fp32}}\n"
    )


@pytest.mark.parametrize(
    ("a_path", "out_path", "line", "expected"),
    [
        ('"a\\0b.safetensors"', "out.safetensors", 1, "NUL character"),
        ('"file:///tmp/a%00b.safetensors"', "out.safetensors", 1, "NUL character"),
        ("{base}", '"out\\0.safetensors"', 8, "NUL character"),
        ('"file://"', "out.safetensors", 1, "names no file"),
        ('"FILE://"', "out.safetensors", 1, "names no file"),
        ('"File://elsewhere/a.safetensors"', "out.safetensors", 1, "names the host"),
    ],
)
def test_a_bad_path_is_a_usage_error_naming_the_file_and_line(
    tmp_path, models, a_path, out_path, line, expected
):
    """A NUL byte (written or %-escaped), an empty file:// URL, or one with
    another host, in any case of the scheme: exit 2 at the YAML line, no traceback."""
    text = _one_input_recipe(models, a_path.format(base=models["base"]), out_path)
    recipe = write_recipe(tmp_path, text)
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert f"{recipe}:{line}" in result.stderr or f"line {line}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    result = invoke("validate", "--json", str(recipe))
    assert result.exit_code == 2
    assert expected in json.loads(result.stdout)["error"]


def test_file_colon_one_slash_and_upper_case_scheme_name_the_absolute_path(tmp_path, models):
    """`file:/abs` is the absolute path /abs (as urllib reads it), and the scheme
    is matched in any case: the build reads the model there."""
    (tmp_path / "sub").mkdir()
    text = _one_input_recipe(
        models, f'"file:{models["base"]}"', f'"FILE://{tmp_path}/url-out.safetensors"'
    )
    recipe = write_recipe(tmp_path / "sub", text)
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    out, a = load_file(tmp_path / "url-out.safetensors"), load_file(models["base"])
    b = load_file(models["other"])
    np.testing.assert_allclose(out[IN04_KEY], 0.5 * as32(a[IN04_KEY]) + 0.5 * as32(b[IN04_KEY]))
