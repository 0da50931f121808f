"""When memory is short, a build asks the kernel to drop its output's finished
tensors from the page cache, so that the inputs stay cached."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.io import page_cache
from sdrecipe.io.page_cache import WrittenBehind, memory_is_short
from sdrecipe.plan.prepare import prepare

MB = 1 << 20


@pytest.fixture
def advice(monkeypatch):
    """Every posix_fadvise call as (offset, length, advice), passed on to the kernel."""
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, kind: int) -> None:
        calls.append((offset, length, kind))
        real(fd, offset, length, kind)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def test_memory_is_short_compares_with_mem_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  4000 kB\nMemFree:  10 kB\nMemAvailable:  1000 kB\n")
    assert memory_is_short(1000 * 1024 + 1, meminfo)
    assert not memory_is_short(1000 * 1024, meminfo)
    assert not memory_is_short(10**15, tmp_path / "absent")  # unknown: keep the page cache


def test_finished_parts_are_dropped_once_lag_more_bytes_are_finished(tmp_path, advice):
    spans = {name: (index * MB, MB) for index, name in enumerate("abcd")}
    with open(tmp_path / "out.bin", "wb") as handle:
        handle.write(os.urandom(4 * MB))
        handle.flush()
        behind = WrittenBehind(handle.fileno(), spans, lag=int(1.5 * MB))
        behind.wrote("b", MB // 2)
        assert advice == []  # b is not finished
        behind.wrote("a", MB)
        behind.wrote("b", MB // 2)
        behind.wrote("d", MB)
        behind.wrote("c", MB)
    assert {kind for _, _, kind in advice} == {os.POSIX_FADV_DONTNEED}
    assert all(length == MB for _, length, _ in advice)
    # Each part is advised when finished (which starts its writeback), and again
    # (dropped) once more than 1.5 MB of later parts are finished.
    named = ["abcd"[offset // MB] for offset, _, _ in advice]
    assert named == ["a", "b", "a", "d", "b", "c", "d"]


def test_a_refused_hint_stops_the_dropping_not_the_writing(advice):
    read, write = os.pipe()  # posix_fadvise on a pipe fails with ESPIPE
    parts = {"a": b"first part", "b": b"then more."}
    try:
        behind = WrittenBehind(write, {"a": (0, 10), "b": (10, 10)}, lag=0)
        for name, data in parts.items():
            os.write(write, data)
            behind.wrote(name, len(data))  # no exception: the hint is given up
        assert os.read(read, 100) == b"".join(parts.values())
    finally:
        os.close(read)
        os.close(write)
    assert advice == [(0, 10, os.POSIX_FADV_DONTNEED)], "one refusal ends the hints"


@pytest.mark.parametrize("short", [True, False])
def test_a_build_drops_its_output_only_when_memory_is_short(
    tmp_path, models, monkeypatch, advice, short
):
    monkeypatch.setattr("sdrecipe.engine.builder.memory_is_short", lambda nbytes: short)
    monkeypatch.setattr(page_cache, "DROP_LAG", 0)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}, C: {models["base"]}}}
        nodes: {{out: A + (B - C)}}
        outputs: {{out: out.safetensors}}
        """,
    )
    update_outputs(prepare(recipe), threads=2, cache=None)
    merged = load_file(tmp_path / "out.safetensors")
    parts = [load_file(models[name]) for name in ("finetune", "other", "base")]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    a, b, c = (part[key].astype(np.float32) for part in parts)
    assert np.allclose(merged[key].astype(np.float32), a + (b - c), atol=1e-2)
    if short:
        # Every tensor is advised twice: when finished, and dropped at once (lag 0).
        assert len(advice) == 2 * len(merged)
    else:
        assert advice == []
