"""Builds on a real Dask cluster: LocalCluster worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_recipe_sets import team_folder

from conftest import invoke

distributed = pytest.importorskip("dask.distributed")


@pytest.fixture
def models(small_models: dict[str, Path]) -> dict[str, Path]:
    """Models of 39 keys: where a recipe is built is the subject, not how big it is."""
    return small_models


def outputs_and_locks(folder: Path) -> dict[str, bytes]:
    files = [*(folder / "out").glob("*.safetensors"), *(folder / "recipes").glob("*.lock")]
    return {path.name: path.read_bytes() for path in files}


def test_a_folder_built_on_a_local_cluster_equals_a_local_build(tmp_path, models):
    local = team_folder(tmp_path / "local", models)
    assert (
        invoke("build", "--cache-dir", str(tmp_path / "local" / "cache"), str(local)).exit_code == 0
    )
    remote = team_folder(tmp_path / "cluster", models)
    result = invoke(
        "build",
        "--scheduler",
        "local:2",
        "--cache-dir",
        str(tmp_path / "cluster" / "cache"),
        str(remote),
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("built ") == 3 and " on " in result.stdout
    mine, theirs = outputs_and_locks(tmp_path / "local"), outputs_and_locks(tmp_path / "cluster")
    assert sorted(mine) == [
        "blend.lock",
        "blend.safetensors",
        "inpaint.lock",
        "inpaint.safetensors",
        "other.lock",
        "other.safetensors",
    ]
    assert mine == theirs, "the same bytes and locks, wherever it ran"
    assert list((tmp_path / "cluster" / "cache" / "workers").iterdir()), "a cache per worker"


def test_a_scheduler_address_and_keep_going(tmp_path, models):
    recipes = team_folder(tmp_path, models)
    broken = recipes / "blend.yaml"
    broken.write_text(broken.read_text().replace(str(models["finetune"]), str(tmp_path / "gone")))
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        result = invoke(
            "build",
            "--json",
            "--keep-going",
            "--scheduler",
            cluster.scheduler_address,
            "--cache-dir",
            str(tmp_path / "cache"),
            str(recipes),
        )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    built = {Path(o["recipe"]).name: o for o in report["outputs"]}
    assert built["other.yaml"]["result"] == "built" and built["other.yaml"]["worker"]
    assert report["cache"]["tensors_computed"] > 0  # the workers' counts, summed
    failed = {Path(f["recipe"]).name: f["error"] for f in report["failed"]}
    assert "gone does not exist" in failed["blend.yaml"]
    assert failed["inpaint.yaml"].startswith("skipped: it needs")
    assert not report["ok"]
    assert (tmp_path / "out" / "other.safetensors").exists()
    assert not (tmp_path / "out" / "inpaint.safetensors").exists()


def test_a_bad_scheduler_is_a_usage_error(tmp_path, models):
    recipes = team_folder(tmp_path, models)
    result = invoke("build", "--scheduler", "local:zero", str(recipes))
    assert result.exit_code == 2 and "local:N takes a number of workers" in result.stderr


def pause_third_key(folder: Path) -> int:
    """On a worker: make one build, on whichever worker gets there first, stop
    before its third key (FOLDER/paused then holds that worker's pid)."""
    import os
    import time

    from sdrecipe.engine.executor import Executor

    original = Executor.run_key
    calls = 0

    def paused(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            try:
                claim = os.open(folder / "paused", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return original(self, *args, **kwargs)
            os.write(claim, str(os.getpid()).encode())
            os.close(claim)
            while True:  # until the test kills this worker
                time.sleep(0.05)
        return original(self, *args, **kwargs)

    Executor.run_key = paused
    return os.getpid()


def test_a_worker_that_dies_mid_build_leaves_no_partial_output_and_is_retried(tmp_path, models):
    import cloudpickle
    import test_cluster

    cloudpickle.register_pickle_by_value(test_cluster)
    recipes = team_folder(tmp_path / "team", models)
    for name in ("blend.yaml", "inpaint.yaml"):
        (recipes / name).unlink()
    control = tmp_path / "control"
    control.mkdir()
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(pause_third_key, control)
        build = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sdrecipe",
                "build",
                "-j",
                "1",
                "--scheduler",
                cluster.scheduler_address,
                "--cache-dir",
                str(tmp_path / "cache"),
                str(recipes),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not (control / "paused").exists() or not (control / "paused").read_text():
            assert build.poll() is None and time.monotonic() < deadline, build.communicate()
            time.sleep(0.05)
        out = tmp_path / "team" / "out"
        assert not (out / "other.safetensors").exists(), "nothing is published mid-build"
        os.kill(int((control / "paused").read_text()), signal.SIGKILL)
        stdout, stderr = build.communicate(timeout=120)
    assert build.returncode == 0, stderr
    assert "built mix -> " in stdout
    local = team_folder(tmp_path / "local", models)
    assert (
        invoke(
            "build", "--cache-dir", str(tmp_path / "cache2"), str(local / "other.yaml")
        ).exit_code
        == 0
    )
    assert (out / "other.safetensors").read_bytes() == (
        tmp_path / "local" / "out" / "other.safetensors"
    ).read_bytes()
    assert not list(out.glob(".*.tmp")), "the killed worker's temporary was cleaned up"
