"""Corrupt cache entries, killed builds and concurrent builds never produce a wrong output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, write_recipe
from sdrecipe.synthetic import DEMO_MODELS, write_model_set


@pytest.fixture
def project(tmp_path, models):
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes:
          diff: B - C
          inpaint: A + 1.0 * diff
        outputs:
          inpaint: out/inpaint.safetensors
        """,
    )


def build(recipe, *args):
    return run_cli("build", "--json", *args, str(recipe))


def reference_bytes(recipe, tmp_path):
    """The output of a build that uses no cache at all."""
    result = run_cli("build", "--no-cache", "--force", str(recipe))
    assert result.returncode == 0, result.stderr
    return (tmp_path / "out" / "inpaint.safetensors").read_bytes()


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_object_is_reported_discarded_and_recomputed(
    project, tmp_path, isolated_cache, damage
):
    assert build(project).returncode == 0
    objects = sorted((isolated_cache / "objects").glob("*/*.safetensors"))
    victim = max(objects, key=lambda p: p.stat().st_size)
    if damage == "flip":
        flip_last_byte(victim)
    else:
        victim.write_bytes(victim.read_bytes()[:-100])
    project.write_text(project.read_text().replace("1.0 * diff", "0.5 * diff"))
    result = build(project)
    assert result.returncode == 0, result.stderr
    assert "corrupt" in result.stderr and "recomputed" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["cache"]["corrupt_entries"] == 1
    assert summary["cache"]["tensors_from_cache"] == 1129
    built = (tmp_path / "out" / "inpaint.safetensors").read_bytes()
    assert built == reference_bytes(project, tmp_path)
    # The recomputed tensor was stored again, intact: the next change finds every
    # `diff` tensor in the cache.
    assert victim.exists()
    project.write_text(project.read_text().replace("0.5 * diff", "0.25 * diff"))
    again = json.loads(build(project).stdout)
    assert again["cache"]["corrupt_entries"] == 0
    assert again["cache"]["tensors_from_cache"] == 1130


def test_output_edited_in_place_is_rebuilt_not_restored_from_its_damaged_link(
    project, tmp_path, isolated_cache
):
    assert build(project).returncode == 0
    output = tmp_path / "out" / "inpaint.safetensors"
    original = output.read_bytes()
    flip_last_byte(output)  # also damages the cache's hard link to it
    plan = json.loads(run_cli("plan", "--json", str(project)).stdout)
    assert plan["nodes"][1]["state"] == "from cache"
    result = build(project)
    assert result.returncode == 0, result.stderr
    assert "corrupt" in result.stderr
    assert json.loads(result.stdout)["outputs"][0]["state"] == "built"
    assert output.read_bytes() == original


@pytest.fixture(scope="module")
def larger_models(tmp_path_factory):
    """The demo's models (widths / 4): builds last long enough to interrupt."""
    return write_model_set(tmp_path_factory.mktemp("larger"), DEMO_MODELS, shrink=4)


def larger_project(tmp_path, larger_models):
    base, finetune, inpainting = larger_models
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {inpainting}, B: {finetune}, C: {base}}}
        nodes:
          diff: B - C
          inpaint: A + 1.0 * diff
        outputs:
          inpaint: {{path: out/inpaint.safetensors, dtype: fp32}}
        """,
    )


def test_killed_build_leaves_cache_usable_and_next_build_reuses_finished_work(
    tmp_path, larger_models, isolated_cache
):
    recipe = larger_project(tmp_path, larger_models)
    process = subprocess.Popen(
        [sys.executable, "-m", "sdrecipe", "build", "-j", "1", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    objects = isolated_cache / "objects"
    while process.poll() is None and time.monotonic() < deadline:
        if len(list(objects.glob("*/*.safetensors"))) > 200:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the build finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (tmp_path / "out" / "inpaint.safetensors").exists()
    result = build(recipe)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["cache"]["tensors_from_cache"] > 0, "finished intermediates were reused"
    assert summary["cache"]["corrupt_entries"] == 0
    built = (tmp_path / "out" / "inpaint.safetensors").read_bytes()
    assert built == reference_bytes(recipe, tmp_path)
    gc = run_cli("cache", "gc", "--json")
    assert gc.returncode == 0
    assert list(objects.glob(".*.tmp")) == [], "gc removes a killed build's temporaries"


def test_concurrent_builds_do_not_corrupt_each_other(tmp_path, larger_models, isolated_cache):
    recipe = larger_project(tmp_path, larger_models)
    command = [sys.executable, "-m", "sdrecipe", "build", str(recipe)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for process in (first, second):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    built = (tmp_path / "out" / "inpaint.safetensors").read_bytes()
    verify = run_cli("verify", str(recipe))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert built == (tmp_path / "out" / "inpaint.safetensors").read_bytes()
    again = build(recipe)
    assert json.loads(again.stdout)["outputs"][0]["state"] == "up to date"
