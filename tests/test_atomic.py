"""A failed, interrupted or killed build never leaves a partial output behind."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import run_in_process, start_paused_build, write_recipe
from sdrecipe.engine import executor
from sdrecipe.engine.builder import update_outputs
from sdrecipe.plan.prepare import prepare


@pytest.fixture
def models(small_models):
    """Models of 39 keys: a build stopped at its 20th key is as much mid-way as one
    of 1131 keys stopped at its 100th."""
    return small_models


@pytest.fixture
def recipe(tmp_path, models):
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}, C: {models["base"]}}}
        nodes: {{out: A + (B - C)}}
        outputs: {{out: out.safetensors}}
        """,
    )


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failure_mid_build_leaves_no_file_and_keeps_the_old_one(tmp_path, recipe, monkeypatch):
    output = tmp_path / "out.safetensors"
    update_outputs(prepare(recipe), threads=2)
    previous = output.read_bytes()
    calls = 0
    real = executor.evaluate

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 20:
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(executor, "evaluate", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        update_outputs(prepare(recipe), threads=2, force=True)
    assert calls >= 20
    assert output.read_bytes() == previous
    assert leftovers(tmp_path) == []


def start_build(tmp_path, models, signals):
    """A build paused at its 20th key: its temporary output is part-written."""
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes: {{out: A + (B - C)}}
        outputs: {{out: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    process = start_paused_build("key", 20, signals, "build", "--threads", "1", str(recipe))
    temporary = tmp_path / f".out.safetensors.sdrecipe-{process.pid}.tmp"
    assert temporary.stat().st_size > 0
    return recipe, process, temporary


@pytest.mark.parametrize(
    ("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 130)], ids=["ctrl-c", "sigterm"]
)
def test_interrupted_build_cleans_up(tmp_path, models, sent, code):
    signals = tmp_path / "signals"
    _, process, temporary = start_build(tmp_path, models, signals)
    process.send_signal(sent)
    (signals / "resume").touch()  # the paused key finishes; the build then stops
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out.safetensors").exists()
    assert not temporary.exists()


def test_killed_build_leaves_no_output_and_the_next_build_recovers(tmp_path, models):
    recipe, process, temporary = start_build(tmp_path, models, tmp_path / "signals")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "out.safetensors").exists()
    assert temporary.exists(), "a SIGKILL cannot clean up; the next build must"
    result = run_in_process("build", str(recipe))  # the recovery, not its process, is tested
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.safetensors").exists()
    assert leftovers(tmp_path) == []
