"""Many recipes as one graph, and `matrix:` sweeps."""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from conftest import as32, invoke, write_recipe
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.recipe.matrix import read_matrix

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


@pytest.fixture
def models(small_models: dict[str, Path]) -> dict[str, Path]:
    """Models of 39 keys: how recipes join into one graph does not depend on their size."""
    return small_models


@pytest.fixture
def arrays(models: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """The small models loaded with the reference safetensors library."""
    return {name: load_file(path) for name, path in models.items()}


def team_folder(folder: Path, models: dict[str, Path], alpha: float = 0.5) -> Path:
    """blend.yaml writes a blend that inpaint.yaml reads; other.yaml stands alone."""
    recipes = folder / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    write_recipe(
        recipes,
        f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}}}
        nodes: {{blend: "weighted_sum(A, B, alpha={alpha})"}}
        outputs: {{blend: ../out/blend.safetensors}}
        """,
        "blend.yaml",
    )
    write_recipe(
        recipes,
        f"""
        inputs: {{A: {models["inpainting"]}, X: ../out/blend.safetensors, C: {models["base"]}}}
        nodes: {{inpaint: A + (X - C)}}
        outputs: {{inpaint: ../out/inpaint.safetensors}}
        """,
        "inpaint.yaml",
    )
    write_recipe(
        recipes,
        f"""
        inputs: {{A: {models["base"]}, B: {models["other"]}}}
        nodes: {{mix: "weighted_sum(A, B, alpha=0.3)"}}
        outputs: {{mix: ../out/other.safetensors}}
        """,
        "other.yaml",
    )
    return recipes


def status_lines(*targets: str) -> dict[str, str]:
    result = invoke("status", *targets, "--json")
    assert result.exit_code == 0, result.stderr
    return {
        Path(o["path"]).name: f"{o['status']}: {o['reason']}"
        for o in json.loads(result.stdout)["outputs"]
    }


def test_a_folder_builds_in_dependency_order_and_changes_flow_downstream(tmp_path, models):
    recipes = team_folder(tmp_path, models)
    before = status_lines(str(recipes))
    assert before["blend.safetensors"].startswith("rebuild")
    assert (
        before["inpaint.safetensors"]
        == "rebuild: input X is rebuilt first by " + str(recipes / "blend.yaml") + " (blend)"
    )
    built = invoke(
        "build",
        str(recipes / "inpaint.yaml"),
        str(recipes / "other.yaml"),
        str(recipes / "blend.yaml"),
    )
    assert built.exit_code == 0, built.stderr
    order = [line for line in built.stdout.splitlines() if line.startswith("== ")]
    assert order == [
        f"== {recipes / name}" for name in ("other.yaml", "blend.yaml", "inpaint.yaml")
    ]
    out = load_file(tmp_path / "out" / "inpaint.safetensors")
    blend = load_file(tmp_path / "out" / "blend.safetensors")
    assert out[KEY].shape == blend[KEY].shape
    assert set(status_lines(str(recipes)).values()) == {"up to date: output matches the lock"}
    # A new alpha upstream: the plan says the transplant rebuilds because of it.
    team_folder(tmp_path, models, alpha=0.25)
    after = status_lines(str(recipes))
    assert after["blend.safetensors"].startswith("rebuild: ")
    assert after["inpaint.safetensors"].startswith("rebuild: input X is rebuilt first by")
    assert after["other.safetensors"] == "up to date: output matches the lock"
    plan = json.loads(invoke("plan", str(recipes), "--json").stdout)["nodes"]
    assert {n["recipe"] for n in plan} == {
        str(recipes / f) for f in ("blend.yaml", "inpaint.yaml", "other.yaml")
    }
    rebuilt = invoke("build", str(recipes), "--json")
    report = json.loads(rebuilt.stdout)
    states = {Path(o["recipe"]).name: o["result"] for o in report["outputs"]}
    assert states == {"other.yaml": "up to date", "blend.yaml": "built", "inpaint.yaml": "built"}
    expected = (
        as32(load_file(models["inpainting"])[KEY])
        + (
            0.75 * as32(load_file(models["base"])[KEY])
            + 0.25 * as32(load_file(models["finetune"])[KEY])
        )
        .astype(np.float16)
        .astype(np.float32)
        - as32(load_file(models["base"])[KEY])
    )
    np.testing.assert_allclose(
        as32(load_file(tmp_path / "out" / "inpaint.safetensors")[KEY]),
        expected,
        rtol=2e-3,
        atol=2e-3,
    )
    assert invoke("verify", str(recipes)).exit_code == 0


def test_a_folder_leaves_the_locks_of_building_one_by_one(tmp_path, models):
    together = team_folder(tmp_path / "together", models)
    assert invoke("build", str(together)).exit_code == 0
    alone = team_folder(tmp_path / "alone", models)
    for name in ("other.yaml", "blend.yaml", "inpaint.yaml"):
        assert invoke("build", str(alone / name)).exit_code == 0
    for name in ("other.lock", "blend.lock", "inpaint.lock"):
        assert (together / name).read_text() == (alone / name).read_text()


def test_a_cycle_across_files_names_the_files_and_outputs(tmp_path, models):
    write_recipe(
        tmp_path,
        "inputs: {A: b.safetensors}\nnodes: {x: A}\noutputs: {x: a.safetensors}\n",
        "first.yaml",
    )
    write_recipe(
        tmp_path,
        "inputs: {B: a.safetensors}\nnodes: {y: B}\noutputs: {y: b.safetensors}\n",
        "second.yaml",
    )
    result = invoke("build", str(tmp_path))
    assert result.exit_code == 2
    assert "in a cycle" in result.stderr
    assert (
        "first.yaml (output 'x') -> " in result.stderr
        and "second.yaml (output 'y')" in result.stderr
    )


def test_keep_going_builds_what_does_not_need_the_failure(tmp_path, models):
    recipes = team_folder(tmp_path, models)
    (recipes / "blend.yaml").write_text(
        (recipes / "blend.yaml")
        .read_text()
        .replace(str(models["finetune"]), str(tmp_path / "gone.safetensors"))
    )
    stopped = invoke("build", str(recipes))
    assert stopped.exit_code == 2 and "gone.safetensors does not exist" in stopped.stderr
    going = invoke("build", "--keep-going", str(recipes))
    assert going.exit_code == 1
    assert (tmp_path / "out" / "other.safetensors").exists()
    assert not (tmp_path / "out" / "inpaint.safetensors").exists()
    assert "2 of 3 recipes failed:" in going.stdout
    assert f"{recipes / 'inpaint.yaml'}: skipped: it needs {recipes / 'blend.yaml'}" in going.stdout


def test_graph_of_a_folder_links_an_output_to_the_input_that_reads_it(tmp_path, models):
    recipes = team_folder(tmp_path, models)
    view = json.loads(invoke("graph", str(recipes), "--format", "json").stdout)
    assert ["blend/output:blend", "inpaint/input:X"] in view["edges"]
    names = {vertex["name"] for vertex in view["vertices"]}
    assert {"other/mix", "inpaint/inpaint", "blend/A"} <= names


# --- matrix


SWEEP = """
matrix:
  alpha: [0.25, 0.5, 0.75]
  strength: [0.5, 1.0]
  exclude: [{{alpha: 0.25, strength: 1.0}}]
  include: [{{alpha: 0.9, strength: 0.5}}]
inputs: {{A: {base}, B: {finetune}, C: {other}}}
nodes:
  mix: weighted_sum(A, B, alpha=${{alpha}})
  out: mix + ${{strength}} * (C - A)
outputs:
  out: {{path: "out/v-${{alpha}}-${{strength}}.safetensors", dtype: fp32}}
"""


def sweep_recipe(folder: Path, models: dict[str, Path]) -> Path:
    return write_recipe(
        folder,
        SWEEP.format(base=models["base"], finetune=models["finetune"], other=models["other"]),
    )


def test_a_matrix_expands_to_one_output_per_combination(tmp_path, models, arrays):
    recipe = sweep_recipe(tmp_path, models)
    plan = json.loads(invoke("plan", str(recipe), "--json").stdout)["nodes"]
    nodes = [n["node"] for n in plan]
    assert [n for n in nodes if n.startswith("mix")] == [
        "mix__alpha_0_25",
        "mix__alpha_0_5",
        "mix__alpha_0_75",
        "mix__alpha_0_9",
    ], "a node varies only by the variables it uses"
    outputs = sorted(n["output"] for n in plan if n["output"])
    assert len(outputs) == 3 * 2 - 1 + 1
    assert (
        "out__alpha_0_25_strength_1_0" not in outputs and "out__alpha_0_9_strength_0_5" in outputs
    )
    assert invoke("build", str(recipe)).exit_code == 0
    lock = yaml.safe_load((tmp_path / "recipe.lock").read_text())
    assert sorted(lock["outputs"]) == outputs
    base, finetune, other = (as32(arrays[n][KEY]) for n in ("base", "finetune", "other"))
    for alpha, strength in [(0.5, 1.0), (0.9, 0.5), (0.25, 0.5)]:
        out = load_file(tmp_path / "out" / f"v-{alpha}-{strength}.safetensors")[KEY]
        expected = (1 - alpha) * base + alpha * finetune + strength * (other - base)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_a_variant_has_the_bytes_of_a_recipe_written_for_it_alone(tmp_path, models):
    recipe = sweep_recipe(tmp_path, models)
    assert invoke("build", str(recipe)).exit_code == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    single = write_recipe(
        alone,
        f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}, C: {models["other"]}}}
        nodes:
          mix: weighted_sum(A, B, alpha=0.75)
          out: mix + 0.5 * (C - A)
        outputs:
          out: {{path: "out/v-0.75-0.5.safetensors", dtype: fp32}}
        """,
    )
    assert invoke("build", str(single)).exit_code == 0
    name = "out/v-0.75-0.5.safetensors"
    assert (tmp_path / name).read_bytes() == (alone / name).read_bytes()


def test_all_variants_read_each_input_tensor_once(tmp_path, models, monkeypatch):
    reads: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    original = SafetensorsReader.tensor

    def counted(self, key):
        with lock:
            reads[(self.path.name, key)] += 1
        return original(self, key)

    monkeypatch.setattr(SafetensorsReader, "tensor", counted)
    assert invoke("build", "--no-cache", str(sweep_recipe(tmp_path, models))).exit_code == 0
    assert reads[("finetune.safetensors", KEY)] == 1
    assert reads[("other.safetensors", KEY)] == 1
    assert max(reads.values()) == 1, "one pass over the inputs for all six variants"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('"out/v-${alpha}-${strength}', '"out/v-${alpha}'), "write the same file"),
        (("alpha=${alpha}", "alpha=${beta}"), "uses ${beta}, which the matrix does not define"),
        ((", C: ", ', D: "x-${alpha}", C: '), "inputs cannot use matrix variables"),
        (
            ("strength: [0.5, 1.0]", "strength: []"),
            "matrix: matrix.strength must be a non-empty list",
        ),
        (("alpha=${alpha}", "alpha=x${alpha}"), "(with alpha=0.25, strength=0.5)"),
    ],
)
def test_matrix_mistakes_are_refused_with_the_line(tmp_path, models, change, message):
    text = SWEEP.format(
        base=models["base"], finetune=models["finetune"], other=models["other"]
    ).replace(*change)
    result = invoke("validate", str(write_recipe(tmp_path, text)))
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert ".yaml:" in result.stderr


@given(
    lengths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    excluded=st.lists(st.integers(0, 20), max_size=3),
)
def test_matrix_combinations_are_the_product_less_exclusions(lengths, excluded):
    variables = {f"v{i}": [f"x{j}" for j in range(n)] for i, n in enumerate(lengths)}
    product = [
        dict(zip(variables, combo, strict=True)) for combo in itertools.product(*variables.values())
    ]
    exclude = [product[i % len(product)] for i in excluded]
    if all(any(c == e for e in exclude) for c in product):
        with pytest.raises(ValueError, match="removes every combination"):
            read_matrix({**variables, "exclude": exclude})
        return
    matrix = read_matrix({**variables, "exclude": exclude})
    assert list(matrix.combinations) == [c for c in product if c not in exclude]
    assert matrix.variables == tuple(variables)


def test_an_output_name_of_the_recipe_selects_all_its_variants(tmp_path, models):
    recipe = sweep_recipe(tmp_path, models)
    plan = json.loads(invoke("plan", str(recipe), "out", "--json").stdout)["nodes"]
    assert len([n for n in plan if n["output"]]) == 6


def test_a_sweep_too_large_is_refused_before_it_expands(tmp_path, models):
    values = list(range(11))
    text = SWEEP.format(base=models["base"], finetune=models["finetune"], other=models["other"])
    text = text.replace(
        "alpha: [0.25, 0.5, 0.75]", f"alpha: {values}\n  beta: {values}\n  gamma: {values}"
    )
    result = invoke("validate", str(write_recipe(tmp_path, text)))
    assert result.exit_code == 2 and "make 2,662 combinations; at most 1,000" in result.stderr


def test_an_output_variable_its_node_does_not_use_is_refused(tmp_path, models):
    text = SWEEP.format(base=models["base"], finetune=models["finetune"], other=models["other"])
    text = text.replace("  strength: [0.5, 1.0]\n", "  strength: [0.5, 1.0]\n  tag: [a, b]\n")
    text = text.replace("strength: 0.5}]", "strength: 0.5, tag: a}]")
    text = text.replace('"out/v-${alpha}-${strength}', '"out/v-${alpha}-${strength}-${tag}')
    result = invoke("build", str(write_recipe(tmp_path, text)))
    assert result.exit_code == 2, result.stderr
    assert "output 'out' uses ${tag}, which its node 'out' does not" in result.stderr
    assert not (tmp_path / "out").exists()
