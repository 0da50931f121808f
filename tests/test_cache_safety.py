"""Corrupt cache entries, killed builds and concurrent builds never produce a wrong output."""

from __future__ import annotations

import contextlib
import fcntl
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import run_in_process, start_paused_build, write_recipe
from sdrecipe.cache.store import Cache

# What the cache does with an entry does not depend on how many there are: the
# small models' 39 keys (38 merged: all but the CLIP position ids) stand for 1131.
MERGED = 38


@pytest.fixture
def project(tmp_path, small_models):
    models = small_models
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes:
          diff: {{expression: B - C, cache: true}}
          inpaint: A + 1.0 * diff
        outputs:
          inpaint: out/inpaint.safetensors
        """,
    )


def build(recipe, *args):
    return run_in_process("build", "--json", *args, str(recipe))


def reference_bytes(recipe, tmp_path):
    """The output of a build that uses no cache at all."""
    result = run_in_process("build", "--no-cache", "--force", str(recipe))
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
    assert summary["cache"]["tensors_from_cache"] == MERGED - 1
    built = (tmp_path / "out" / "inpaint.safetensors").read_bytes()
    assert built == reference_bytes(project, tmp_path)
    # The recomputed tensor was stored again, intact: the next change finds every
    # `diff` tensor in the cache.
    assert victim.exists()
    project.write_text(project.read_text().replace("0.5 * diff", "0.25 * diff"))
    again = json.loads(build(project).stdout)
    assert again["cache"]["corrupt_entries"] == 0
    assert again["cache"]["tensors_from_cache"] == MERGED


def test_output_edited_in_place_is_rebuilt_not_restored_from_its_damaged_link(
    project, tmp_path, isolated_cache
):
    assert build(project).returncode == 0
    output = tmp_path / "out" / "inpaint.safetensors"
    original = output.read_bytes()
    flip_last_byte(output)  # also damages the cache's hard link to it
    plan = json.loads(run_in_process("plan", "--json", str(project)).stdout)
    assert plan["nodes"][1]["status"] == "from cache"
    result = build(project)
    assert result.returncode == 0, result.stderr
    # One warning for the pack, none for each tensor that was in it.
    assert result.stderr.count("corrupt") == 1
    assert "is corrupt; discarded and rebuilt" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["outputs"][0]["result"] == "built"
    assert summary["cache"]["corrupt_entries"] == 1
    assert output.read_bytes() == original


def recorded_objects(cache_folder):
    """How many objects the cache's index records."""
    with contextlib.closing(sqlite3.connect(cache_folder / "index.sqlite", timeout=60)) as index:
        return index.execute("SELECT COUNT(*) FROM entries WHERE kind='object'").fetchone()[0]


def test_killed_build_leaves_cache_usable_and_next_build_reuses_finished_work(
    project, tmp_path, isolated_cache
):
    # Paused before publishing its 20th cache object (of 38): 19 are in place, one
    # is a complete temporary file, and the output is part-written.
    process = start_paused_build(
        "object", 20, tmp_path / "signals", "build", "-j", "1", str(project)
    )
    objects = isolated_cache / "objects"
    assert len(list(objects.glob("*/*.safetensors"))) == 19
    # The build's main thread records finished objects in the index: wait for that too.
    while recorded_objects(isolated_cache) < 19:
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (tmp_path / "out" / "inpaint.safetensors").exists()
    assert list(objects.glob(".*.tmp")), "a SIGKILL leaves its temporary object behind"
    result = build(project)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["cache"]["tensors_from_cache"] == 19, "finished intermediates were reused"
    assert summary["cache"]["corrupt_entries"] == 0
    built = (tmp_path / "out" / "inpaint.safetensors").read_bytes()
    assert built == reference_bytes(project, tmp_path)
    gc = run_in_process("cache", "gc", "--json")
    assert gc.returncode == 0
    assert list(objects.glob(".*.tmp")) == [], "gc removes a killed build's temporaries"


def test_concurrent_builds_of_recipes_sharing_intermediates_take_turns(
    tmp_path, small_models, isolated_cache
):
    models = small_models
    recipes = {
        factor: write_recipe(
            tmp_path,
            f"""
            inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
            nodes:
              diff: {{expression: B - C, cache: true}}
              out: A + {factor} * diff
            outputs:
              out: out{factor}/x.safetensors
            """,
            name=f"r{factor}.yaml",
        )
        for factor in ("1.0", "0.5")
    }
    Cache(isolated_cache)
    with open(isolated_cache / ".lock", "a+") as held:
        # Both builds start while the lock is held, so they race for it when it is freed.
        fcntl.flock(held, fcntl.LOCK_EX)
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "sdrecipe", "build", "--json", str(recipe)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for recipe in recipes.values()
        ]
        for process in processes:
            assert "waiting for the cache lock" in process.stderr.readline()
        fcntl.flock(held, fcntl.LOCK_UN)
    summaries = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        summaries.append(json.loads(stdout)["cache"])
    # They took turns: one computed `diff`, the other found all of it in the cache.
    assert sorted(s["tensors_from_cache"] for s in summaries) == [0, MERGED]
    assert sorted(s["tensors_computed"] for s in summaries) == [MERGED, 2 * MERGED]
    for factor, recipe in recipes.items():
        output = tmp_path / f"out{factor}" / "x.safetensors"
        built = output.read_bytes()
        assert run_in_process("build", "--no-cache", "--force", str(recipe)).returncode == 0
        assert built == output.read_bytes(), f"factor {factor}"
