"""Make-style rebuilds: every rule of the rebuild table, plan's reasons, verify, cache commands."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from conftest import run_in_process, write_recipe, write_small_model
from sdrecipe import api
from sdrecipe.synthetic import ModelSpec

# What the rebuild rules decide does not depend on how many keys a model has: the
# small models' 39 keys (38 merged: all but the CLIP position ids) stand for 1131.
MERGED = 38


@pytest.fixture
def project(tmp_path, small_models):
    """A recipe with an intermediate (diff), two outputs, and an input only one output uses."""
    models = small_models
    (tmp_path / "D.safetensors").write_bytes(models["other"].read_bytes())
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {models["inpainting"]}
          B: {models["finetune"]}
          C: {models["base"]}
          D: D.safetensors
        nodes:
          diff: {{expression: B - C, cache: true}}
          inpaint: A + 1.0 * diff
          soft: "weighted_sum(D, B, alpha=0.3)"
        outputs:
          inpaint: out/inpaint.safetensors
          soft: {{path: out/soft.safetensors, dtype: fp32}}
        """,
    )
    return recipe


def options(args):
    """The API's options for command-line flags (`--force`, `--cache-dir DIR`)."""
    flags = list(args)
    cache_dir = flags[flags.index("--cache-dir") + 1] if "--cache-dir" in flags else None
    return api.Options(
        cache_dir=Path(cache_dir or os.environ["SDRECIPE_CACHE_DIR"]), force="--force" in flags
    )


def build(recipe, *args):
    """A build through the API, as its JSON report."""
    return api.build([recipe], options(args)).to_json()


def states(summary):
    return {output["name"]: output["result"] for output in summary["outputs"]}


def plan(recipe, *args):
    return {
        node.node: (node.status, node.reason) for node in api.plan([recipe], options(args)).nodes
    }


def edit(recipe, old, new):
    recipe.write_text(recipe.read_text().replace(old, new))


def test_first_build_writes_lock_and_second_is_a_no_op(project):
    first = build(project)
    assert first["cache"]["tensors_computed"] == 3 * MERGED
    lock = project.with_suffix(".lock")
    assert lock.exists()
    text = lock.read_text()
    for word in ("sha256:", "inputs:", "nodes:", "outputs:", "torch:", "safetensors:", "sdrecipe:"):
        assert word in text
    before = {p: p.stat().st_mtime_ns for p in (project.parent / "out").iterdir()}
    second = run_in_process("build", str(project))
    assert second.returncode == 0
    assert second.stdout.count("up to date") == 2
    assert before == {p: p.stat().st_mtime_ns for p in (project.parent / "out").iterdir()}


def test_up_to_date_build_does_not_import_torch(project):
    build(project)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from sdrecipe.cli import main\n"
        f"main(['build', {str(project)!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "up to date inpaint" in result.stdout


def test_parameter_change_rebuilds_only_that_node_from_cached_intermediates(project):
    build(project)
    soft = project.parent / "out" / "soft.safetensors"
    soft_before = soft.stat().st_mtime_ns
    edit(project, "1.0 * diff", "0.5 * diff")
    assert plan(project) == {
        "diff": ("from cache", "cached"),
        "inpaint": ("rebuild", "factor changed 1 -> 0.5"),
        "soft": ("up to date", "output matches the lock"),
    }
    summary = build(project)
    assert states(summary) == {"inpaint": "built", "soft": "up to date"}
    assert summary["cache"]["tensors_computed"] == MERGED, "only inpaint's tensors"
    assert summary["cache"]["tensors_from_cache"] == MERGED, "diff came from the cache"
    assert soft.stat().st_mtime_ns == soft_before
    out = load_file(project.parent / "out" / "inpaint.safetensors")
    fresh = run_in_process("build", "--no-cache", "--force", str(project))
    assert fresh.returncode == 0
    again = load_file(project.parent / "out" / "inpaint.safetensors")
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])


def test_method_parameter_change_is_named(project):
    build(project)
    edit(project, "alpha=0.3", "alpha=0.4")
    assert plan(project)["soft"] == ("rebuild", "alpha changed 0.3 -> 0.4")


def test_input_content_change_rebuilds_only_its_dependents(project):
    build(project)
    write_small_model(project.parent / "D.safetensors", ModelSpec(shrink=32, seed=99))
    assert plan(project) == {
        "diff": ("up to date", "cached"),
        "inpaint": ("up to date", "output matches the lock"),
        "soft": ("rebuild", "input D content changed"),
    }
    summary = build(project)
    assert states(summary) == {"inpaint": "up to date", "soft": "built"}
    assert summary["cache"]["tensors_computed"] == MERGED


def test_touched_input_is_rehashed_and_nothing_rebuilds(project):
    build(project)
    data = project.parent / "D.safetensors"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    summary = build(project)
    assert states(summary) == {"inpaint": "up to date", "soft": "up to date"}
    assert summary["cache"]["tensors_computed"] == 0
    again = run_in_process("build", str(project))
    assert again.stdout.count("up to date") == 2, "stat remembered again"


def test_deleted_output_is_restored_from_cache_without_computation(project):
    build(project)
    output = project.parent / "out" / "soft.safetensors"
    original = output.read_bytes()
    output.unlink()
    assert plan(project)["soft"] == ("from cache", "output missing")
    summary = build(project)
    assert states(summary)["soft"] == "restored from cache"
    assert summary["cache"]["tensors_computed"] == 0
    assert output.read_bytes() == original


def test_force_rebuilds_everything_and_no_cache_stores_no_tensors(project, isolated_cache):
    build(project)
    forced = build(project, "--force")
    assert forced["cache"]["tensors_computed"] == 3 * MERGED
    assert set(states(forced).values()) == {"built"}
    other_cache = project.parent / "unused-cache"
    result = run_in_process("build", "--no-cache", "--cache-dir", str(other_cache), str(project))
    assert result.returncode == 0
    info = json.loads(
        run_in_process("cache", "info", "--json", "--cache-dir", str(other_cache)).stdout
    )
    assert (info["objects"], info["packs"], info["tensors"]) == (0, 0, 0)
    # Only the memo of input hashes was kept: the next --no-cache build reads no
    # tensor from the cache but does not rehash its inputs either.
    with sqlite3.connect(other_cache / "index.sqlite") as index:
        remembered = {row[0] for row in index.execute("SELECT path FROM files")}
    lock = yaml.safe_load(project.with_suffix(".lock").read_text())
    inputs = {str((project.parent / entry["path"]).resolve()) for entry in lock["inputs"].values()}
    assert inputs <= remembered


def test_cache_dir_option_and_environment(project, tmp_path):
    chosen = tmp_path / "chosen"
    build(project, "--cache-dir", str(chosen))
    assert (chosen / "index.sqlite").exists()
    info = run_in_process("cache", "info", "--json", "--cache-dir", str(chosen))
    data = json.loads(info.stdout)
    assert data["objects"] == MERGED and data["packs"] == 2
    assert data["last_build"]["tensors_computed"] == 3 * MERGED


def test_dry_run_changes_nothing(project):
    result = run_in_process("build", "--dry-run", str(project))
    assert result.returncode == 0
    assert "first build (no lock file)" in result.stdout
    assert not (project.parent / "out").exists()
    assert not project.with_suffix(".lock").exists()


def test_verify_reports_reproducible_and_catches_a_wrong_lock(project):
    build(project)
    ok = run_in_process("verify", str(project))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("reproducible")
    lock = project.with_suffix(".lock")
    text = lock.read_text()
    locked = text.split("soft:")[-1].split("digest: ")[1][:64]
    lock.write_text(text.replace(locked, "f" * 64))
    bad = run_in_process("verify", "--json", str(project))
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["reproducible"] is False
    assert [o["name"] for o in report["outputs"] if not o["reproducible"]] == ["soft"]


def test_verify_without_lock_is_an_error(project):
    result = run_in_process("verify", str(project))
    assert result.returncode == 2
    assert "no lock file" in result.stderr


def test_output_bytes_do_not_depend_on_thread_count(project, tmp_path):
    outputs = {}
    for threads in ("1", "2", "3"):
        result = run_in_process("build", "--no-cache", "--force", "-j", threads, str(project))
        assert result.returncode == 0
        outputs[threads] = (project.parent / "out" / "inpaint.safetensors").read_bytes()
    assert outputs["1"] == outputs["2"] == outputs["3"]


def test_cache_gc_and_clear(project, isolated_cache):
    build(project)
    # The cache's own files (diff's 38 tensors) take 22.9 kB: the limit keeps part of them.
    gc = run_in_process("cache", "gc", "--max-size", "10KB", "--json")
    assert gc.returncode == 0, gc.stderr
    result = json.loads(gc.stdout)
    assert result["removed"] > 0 and result["size"] <= 10_000
    # Outputs hard-linked into the cache cost it nothing; its own files fit the limit.
    own = [p for p in isolated_cache.rglob("*.safetensors") if p.stat().st_nlink == 1]
    assert 0 < sum(p.stat().st_size for p in own) <= 10_000
    assert run_in_process("cache", "clear").returncode == 0
    info = json.loads(run_in_process("cache", "info", "--json").stdout)
    assert (info["objects"], info["packs"], info["tensors"]) == (0, 0, 0)
    # With nothing cached, an alpha change must recompute diff as well.
    edit(project, "1.0 * diff", "0.5 * diff")
    summary = build(project)
    assert summary["cache"]["tensors_computed"] == 2 * MERGED


def test_gc_rejects_a_bad_size():
    result = run_in_process("cache", "gc", "--max-size", "lots")
    assert result.returncode == 2
    assert "not a size" in result.stderr


def test_cache_false_keeps_an_intermediate_out_of_the_cache(project, isolated_cache):
    edit(project, "cache: true}", "cache: false}")
    build(project)
    info = json.loads(run_in_process("cache", "info", "--json").stdout)
    assert info["objects"] == 0
    edit(project, "1.0 * diff", "0.5 * diff")
    assert plan(project)["diff"] == ("rebuild", "recomputed")
    assert plan_caching(project)["diff"] == "not cached: cache: false"
    summary = build(project)
    assert summary["cache"]["tensors_computed"] == 2 * MERGED
    reference = load_file(project.parent / "out" / "inpaint.safetensors")
    edit(project, "cache: false}", "cache: true}")
    build(project, "--force")
    again = load_file(project.parent / "out" / "inpaint.safetensors")
    for key in reference:
        np.testing.assert_array_equal(reference[key], again[key])


def test_node_mapping_needs_exactly_one_form(tmp_path, small_models):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {small_models["base"]}}}
        nodes:
          x: {{expression: A, method: weighted_sum, models: [A, A]}}
        outputs: {{x: out.safetensors}}
        """,
    )
    result = run_in_process("validate", str(recipe))
    assert result.returncode == 2
    assert "recipe.yaml:3: nodes.x: give either `expression`" in result.stderr


def test_an_output_made_by_another_output_format_is_not_current(
    project, isolated_cache, monkeypatch
):
    import sdrecipe.recipe.lock
    from sdrecipe.cache.store import Cache
    from sdrecipe.plan.status import proven_current
    from sdrecipe.recipe import load_recipe

    def current():
        return proven_current(load_recipe(project), None, Cache(isolated_cache))

    build(project)
    assert current() is not None
    monkeypatch.setattr(
        sdrecipe.recipe.lock, "OUTPUT_FORMAT", sdrecipe.recipe.lock.OUTPUT_FORMAT + 1
    )
    assert current() is None


def touch(path):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


SCENARIOS = {
    "first build": lambda project: None,
    "nothing changed": lambda project: None,
    "parameter changed": lambda project: edit(project, "1.0 * diff", "0.5 * diff"),
    "input content changed": lambda project: write_small_model(
        project.parent / "D.safetensors", ModelSpec(shrink=32, seed=9)
    ),
    "input touched": lambda project: touch(project.parent / "D.safetensors"),
    "output deleted": lambda project: (project.parent / "out" / "soft.safetensors").unlink(),
    "per-key value changed": lambda project: edit(
        project, "text_encoder: 0.2", "text_encoder: 0.1"
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_plan_predicts_what_build_does(project, scenario, force):
    """The one status rule: what `plan --json` predicts for each output is what
    `build --json` then reports it did."""
    edit(project, "alpha=0.3)", "alpha={default: 0.3, text_encoder: 0.2})")
    if scenario != "first build":
        build(project)
    SCENARIOS[scenario](project)
    flags = ("--force",) if force else ()
    predicted = {
        node["output"]: node["status"]
        for node in json.loads(run_in_process("plan", "--json", *flags, str(project)).stdout)[
            "nodes"
        ]
        if node["output"]
    }
    done = {output["name"]: output["status"] for output in build(project, *flags)["outputs"]}
    assert done == predicted
    expected = {
        "first build": {"inpaint": "rebuild", "soft": "rebuild"},
        "nothing changed": {"inpaint": "up to date", "soft": "up to date"},
        "parameter changed": {"inpaint": "rebuild", "soft": "up to date"},
        "input content changed": {"inpaint": "up to date", "soft": "rebuild"},
        "input touched": {"inpaint": "up to date", "soft": "up to date"},
        "output deleted": {"inpaint": "up to date", "soft": "from cache"},
        "per-key value changed": {"inpaint": "up to date", "soft": "rebuild"},
    }[scenario]
    assert done == ({name: "rebuild" for name in expected} if force else expected)


def plan_caching(recipe) -> dict[str, str]:
    result = run_in_process("plan", "--json", str(recipe))
    return {node["node"]: node["caching"] for node in json.loads(result.stdout)["nodes"]}


def test_by_default_only_costly_intermediates_are_cached(project, isolated_cache):
    edit(project, "diff: {expression: B - C, cache: true}", "diff: B - C")
    assert plan_caching(project)["diff"] == (
        "not cached: element-wise: cheaper to recompute than to read back"
    )
    build(project)
    info = json.loads(run_in_process("cache", "info", "--json").stdout)
    assert info["objects"] == 0
    edit(project, "diff: B - C", 'diff: "ties(C, B, density=0.5) - C"')
    caching = plan_caching(project)
    assert caching["diff"] == "cached: whole-tensor ties(): cheaper to read back than to recompute"
    assert caching["inpaint"] == ""  # an output: cached whole
    first = build(project)
    edit(project, "1.0 * diff", "0.5 * diff")
    second = build(project)
    # Only the output's own arithmetic is redone: every ties() value comes from the cache.
    assert second["cache"]["tensors_from_cache"] == first["cache"]["tensors_computed"] // 2
    assert second["cache"]["tensors_computed"] == first["cache"]["tensors_computed"] // 2
