"""A failed, interrupted or killed build never leaves a partial output behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, write_recipe
from sdrecipe import executor
from sdrecipe.build import build, prepare
from sdrecipe.synthetic import DEMO_MODELS, write_model_set


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
    output.write_bytes(b"previous build")
    calls = 0
    real = executor.evaluate

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 200:
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(executor, "evaluate", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        build(prepare(recipe), threads=2)
    assert calls >= 200
    assert output.read_bytes() == b"previous build"
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def larger_models(tmp_path_factory):
    """The demo's models (widths / 4) so that a build lasts long enough to interrupt."""
    folder = tmp_path_factory.mktemp("larger")
    return write_model_set(folder, DEMO_MODELS, shrink=4)


def start_build(tmp_path, larger_models):
    inpainting, finetune, base = (str(p) for p in larger_models[::-1])
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {inpainting}, B: {finetune}, C: {base}}}
        nodes: {{out: A + (B - C)}}
        outputs: {{out: {{path: out.safetensors, dtype: fp32}}}}
        """,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "sdrecipe", "build", "--threads", "1", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    temporary = tmp_path / f".out.safetensors.sdrecipe-{process.pid}.tmp"
    deadline = time.monotonic() + 60
    while not temporary.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert temporary.exists(), "the build finished before it could be interrupted"
    time.sleep(0.05)
    return recipe, process, temporary


@pytest.mark.parametrize(
    ("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 130)], ids=["ctrl-c", "sigterm"]
)
def test_interrupted_build_cleans_up(tmp_path, larger_models, sent, code):
    _, process, temporary = start_build(tmp_path, larger_models)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out.safetensors").exists()
    assert not temporary.exists()


def test_killed_build_leaves_no_output_and_the_next_build_recovers(tmp_path, larger_models):
    recipe, process, temporary = start_build(tmp_path, larger_models)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "out.safetensors").exists()
    assert temporary.exists(), "a SIGKILL cannot clean up; the next build must"
    result = run_cli("build", str(recipe))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.safetensors").exists()
    assert leftovers(tmp_path) == []
