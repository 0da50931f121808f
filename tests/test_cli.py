"""The command line, run as a subprocess the way users run it (in this process where
the process is not the subject)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import run_cli, run_in_process, write_recipe
from sdrecipe import __version__
from sdrecipe.plan.provenance import read_provenance


@pytest.fixture
def recipe(tmp_path, models):
    return write_recipe(
        tmp_path,
        f"""
        # an inpainting transplant
        inputs:
          A: {models["inpainting"]}
          B: {models["finetune"]}
          C: {models["base"]}
        nodes:
          inpaint: A + (B - C)
        outputs:
          inpaint: {{path: out/inpaint.safetensors, dtype: fp16}}
        """,
    )


def test_build_prints_a_summary_and_records_provenance(recipe, models, tmp_path):
    result = run_cli("build", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "built inpaint" in result.stdout
    assert "1131 keys: 1130 merged, 1 passed through (1 never merged (CLIP position ids))" in (
        result.stdout
    )
    assert result.stderr == "", "no progress bar without a terminal"
    output = tmp_path / "out" / "inpaint.safetensors"
    with safe_open(output, "np") as handle:
        metadata = handle.metadata()
    assert metadata["sdrecipe.node"] == "inpaint"
    assert metadata["sdrecipe.version"] == __version__
    assert metadata["sdrecipe.expression"] == "A + (B - C)"
    own = read_provenance(metadata)
    assert set(own.inputs) == {"A", "B", "C"}
    assert own.inputs["B"]["file"] == "finetune.safetensors"
    merge = json.loads(metadata["sd_merge_recipe"])
    models_field = json.loads(metadata["sd_merge_models"])
    assert merge["is_inpainting"] is True
    assert merge["primary_model_hash"] == own.inputs["A"]["sha256"]
    assert merge["secondary_model_hash"] == own.inputs["B"]["sha256"]
    assert set(models_field) == {entry["sha256"] for entry in own.inputs.values()}
    assert all(len(entry["legacy_hash"]) == 8 for entry in models_field.values())


def test_embedded_recipe_rebuilds_the_output_exactly(recipe, models, tmp_path):
    # In this process: the recipe in the output is the subject, not the process.
    assert run_in_process("build", str(recipe)).returncode == 0
    output = tmp_path / "out" / "inpaint.safetensors"
    with safe_open(output, "np") as handle:
        embedded = handle.metadata()["sdrecipe.recipe"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in models.values():
        (elsewhere / path.name).symlink_to(path)
    (elsewhere / "again.yaml").write_text(embedded)
    assert "sha256:" in embedded, "inputs are pinned"
    result = run_in_process("build", "--no-cache", str(elsewhere / "again.yaml"))
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "inpaint.safetensors").read_bytes() == output.read_bytes()


def test_build_json_summary(recipe):
    started = time.perf_counter()
    result = run_cli("build", "--json", str(recipe))
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    (output,) = summary["outputs"]
    assert output["merged"] == 1130
    assert output["passed_through"] == {"never merged (CLIP position ids)": 1}
    assert output["size"] == (recipe.parent / output["path"]).stat().st_size
    assert 0 < summary["seconds"] < elapsed, "the build's own time, inside the command's"


def test_lineage_accumulates_across_merges(recipe, models, tmp_path):
    # In this process: the lineage in the outputs is the subject, not the process.
    assert run_in_process("build", str(recipe)).returncode == 0
    first = tmp_path / "out" / "inpaint.safetensors"
    second = write_recipe(
        tmp_path,
        f"""
        inputs: {{X: {first}, Y: {models["inpainting"]}}}
        nodes: {{blend: "weighted_sum(X, Y, alpha=0.5)"}}
        outputs: {{blend: second.safetensors}}
        """,
        name="second.yaml",
    )
    assert run_in_process("build", str(second)).returncode == 0
    with safe_open(tmp_path / "second.safetensors", "np") as handle:
        lineage = json.loads(handle.metadata()["sd_merge_models"])
    names = {entry["name"] for entry in lineage.values()}
    assert {
        "inpaint.safetensors",
        "inpainting.safetensors",
        "finetune.safetensors",
        "base.safetensors",
    } <= names


def test_validate_checks_without_writing(recipe, tmp_path):
    result = run_cli("validate", "--json", str(recipe))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True
    assert report["outputs"]["inpaint"]["keys"] == 1131
    assert not (tmp_path / "out").exists()


def test_build_only_the_named_output(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["base"]}}}
        nodes: {{one: "weighted_sum(A, B)", two: "weighted_sum(B, A)"}}
        outputs: {{one: one.safetensors, two: two.safetensors}}
        """,
    )
    assert run_cli("build", str(recipe), "two").returncode == 0
    assert (tmp_path / "two.safetensors").exists()
    assert not (tmp_path / "one.safetensors").exists()
    two = load_file(tmp_path / "two.safetensors")
    assert np.any(two["model.diffusion_model.out.2.weight"] != 0)


def test_version_and_help_everywhere():
    version = run_cli("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    for command in ([], ["build"], ["validate"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0
        assert "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build"], "Missing argument 'RECIPE"),
        (["build", "--threads", "0", "x.yaml"], "--threads"),
        (["frobnicate"], "No such command"),
        (["build", "no/such/recipe.yaml"], "recipe file not found"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_output_name_is_a_usage_error(recipe):
    result = run_cli("build", str(recipe), "nope")
    assert result.returncode == 2
    assert "'nope' is not an output" in result.stderr
