"""Builds on a real Dask cluster: LocalCluster worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipe_sets import team_folder

from conftest import invoke

distributed = pytest.importorskip("dask.distributed")


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
    by_recipe = {Path(r["recipe"]).name: r for r in json.loads(result.stdout)["recipes"]}
    assert by_recipe["other.yaml"]["report"]["outputs"][0]["state"] == "built"
    assert "gone does not exist" in by_recipe["blend.yaml"]["error"]
    assert by_recipe["inpaint.yaml"]["error"].startswith("skipped: it needs")
    assert (tmp_path / "out" / "other.safetensors").exists()
    assert not (tmp_path / "out" / "inpaint.safetensors").exists()


def test_a_bad_scheduler_is_a_usage_error(tmp_path, models):
    recipes = team_folder(tmp_path, models)
    result = invoke("build", "--scheduler", "local:zero", str(recipes))
    assert result.exit_code == 2 and "local:N takes a number of workers" in result.stderr
