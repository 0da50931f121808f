"""Every invalid recipe is an error with file and line, exit code 2, and no output."""

from __future__ import annotations

import hashlib

import pytest

from conftest import run_cli, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.errors import RecipeError
from sdrecipe.plan.prepare import prepare


def recipe_for(models, nodes: str, outputs: str = "out: out.safetensors", extra: str = "") -> str:
    return (
        "inputs:\n"
        f"  A: {models['finetune']}\n"
        f"  B: {models['other']}\n"
        f"  C: {models['base']}\n"
        f"{extra}"
        "nodes:\n"
        f"{nodes}\n"
        "outputs:\n"
        f"  {outputs}\n"
    )


CASES = [
    ("unknown name", "  out: A + (B - D)", None, 6, "unknown name 'D'"),
    ("cycle", "  out: A + loop\n  loop: out - B", None, 6, "cycle: out -> loop -> out"),
    ("self reference", "  out: out + A", None, 6, "cycle: out -> out"),
    ("duplicate key", "  out: A\n  out: B", None, 7, "duplicate key 'out'"),
    ("unknown method", "  out: blend(A, B)", None, 6, "unknown method 'blend'"),
    ("unknown parameter", "  out: weighted_sum(A, B, beta=1)", None, 6, "unknown parameter 'beta'"),
    ("wrong model count", "  out: add_difference(A, B)", None, 6, "takes 3 models"),
    ("out of range", "  out: sigmoid(A, B, alpha=1.5)", None, 6, "less than or equal to 1"),
    (
        "wrong type",
        "  out: {method: weighted_sum, models: [A, B], alpha: high}",
        None,
        6,
        "parameter 'alpha': 'high' is not a number, a list of block values or a preset",
    ),
    ("product", "  out: A * B", None, 6, "product of two models"),
    ("unknown output", "  out: A", "nope: out.safetensors", 8, "output 'nope' names no node"),
    ("bad dtype", "  out: A", "out: {path: o.safetensors, dtype: int8}", 8, "dtype"),
    (
        "unknown field",
        "  out: A",
        "out: {path: o.safetensors, compress: true}",
        8,
        "unknown field 'outputs.out.compress'",
    ),
]


@pytest.mark.parametrize(
    ("label", "nodes", "outputs", "line", "message"), CASES, ids=[c[0] for c in CASES]
)
def test_invalid_recipes_name_file_and_line(tmp_path, models, label, nodes, outputs, line, message):
    path = write_recipe(tmp_path, recipe_for(models, nodes, outputs or "out: out.safetensors"))
    with pytest.raises(RecipeError) as info:
        prepare(path)
    assert message in info.value.message
    assert (info.value.file, info.value.line) == (path, line)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_name_shared_by_input_and_node(tmp_path, models):
    path = write_recipe(tmp_path, recipe_for(models, "  A: B - C", "A: out.safetensors"))
    with pytest.raises(RecipeError, match="both an input and a node") as info:
        prepare(path)
    assert info.value.line == 6


def test_yaml_syntax_error(tmp_path):
    path = write_recipe(tmp_path, "inputs:\n  A: [a.safetensors\nnodes: {}\n")
    with pytest.raises(RecipeError, match="YAML syntax error") as info:
        prepare(path)
    assert info.value.line == 3


def test_missing_input_file(tmp_path, models):
    path = write_recipe(
        tmp_path,
        recipe_for(models, "  out: weighted_sum(A, D)", extra="  D: nowhere.safetensors\n"),
    )
    with pytest.raises(RecipeError, match=r"nowhere\.safetensors does not exist") as info:
        prepare(path)
    assert info.value.line == 5


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (10, "its header alone needs"),
        (300_000, "past the end of the file: the file is truncated"),
        (0, "too short to be safetensors"),
    ],
)
def test_truncated_input_file_is_named(tmp_path, models, keep, message):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(models["base"].read_bytes()[:keep])
    path = write_recipe(
        tmp_path, recipe_for(models, "  out: weighted_sum(A, D)", extra=f"  D: {broken}\n")
    )
    with pytest.raises(RecipeError, match=message) as info:
        prepare(path)
    assert info.value.line == 5
    assert "broken.safetensors" in str(info.value)


def test_non_safetensors_input_is_named(tmp_path, models):
    broken = tmp_path / "notes.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    path = write_recipe(
        tmp_path, recipe_for(models, "  out: weighted_sum(A, D)", extra=f"  D: {broken}\n")
    )
    with pytest.raises(RecipeError, match="header is not JSON"):
        prepare(path)


def test_pinned_sha256_mismatch_fails_before_writing(tmp_path, models):
    wrong = "0" * 64
    path = write_recipe(
        tmp_path,
        f"inputs:\n  A: {{path: {models['base']}, sha256: {wrong}}}\n"
        "nodes:\n  out: A\noutputs:\n  out: out.safetensors\n",
    )
    with pytest.raises(RecipeError, match="but the recipe pins 0000") as info:
        update_outputs(prepare(path), threads=1)
    assert info.value.line == 2
    assert not (tmp_path / "out.safetensors").exists()


def test_pinned_sha256_match_builds(tmp_path, models):
    digest = hashlib.sha256(models["base"].read_bytes()).hexdigest()
    path = write_recipe(
        tmp_path,
        f"inputs:\n  A: {{path: {models['base']}, sha256: {digest.upper()}}}\n"
        "nodes:\n  out: A\noutputs:\n  out: out.safetensors\n",
    )
    (summary,) = update_outputs(prepare(path), threads=1).outputs
    assert summary.path.exists()
    assert summary.merged == 1130


def test_paths_expand_home_and_environment(tmp_path, models, monkeypatch):
    monkeypatch.setenv("SDRECIPE_TEST_MODELS", str(models["base"].parent))
    path = write_recipe(
        tmp_path,
        "inputs:\n  A: ${SDRECIPE_TEST_MODELS}/base.safetensors\n"
        "nodes:\n  out: A\noutputs:\n  out: out.safetensors\n",
    )
    assert prepare(path).recipe.inputs["A"].path == models["base"]


def test_cli_reports_invalid_recipe_in_one_paragraph_with_exit_2(tmp_path, models):
    path = write_recipe(tmp_path, recipe_for(models, "  out: A + (B - D)"))
    for command in ("build", "validate"):
        result = run_cli(command, str(path))
        assert result.returncode == 2
        assert result.stderr.startswith(f"error: {path}:6: node 'out' uses unknown name 'D'")
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()
