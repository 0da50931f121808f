"""The shared remote cache and inputs named by URL, against a real S3 API:
moto's server on 127.0.0.1, reached through s3fs with the standard
AWS_ENDPOINT_URL variable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import invoke, write_recipe
from sdrecipe.cache.store import Cache
from sdrecipe.plan.assess import assess
from sdrecipe.plan.prepare import prepare

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "team-cache"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint() -> str:
    """A moto S3 server on the loopback address for this module's tests."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def models(small_models: dict[str, Path]) -> dict[str, Path]:
    """Models of 39 keys: every kind of remote file is still exchanged, with
    about a thirtieth of the S3 requests of a full model."""
    return small_models


@pytest.fixture
def remote(endpoint: str, monkeypatch: pytest.MonkeyPatch, request) -> str:
    """A fresh bucket prefix, with credentials and endpoint in the environment only."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return f"s3://{BUCKET}/{request.node.name}"


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


RECIPE = """
inputs: {{A: {other}, B: {finetune}, C: {base}}}
nodes:
  learned: "ties(C, B, A, density=0.5) - C"
  out: A + {factor} * learned
outputs:
  out: {{path: out.safetensors, dtype: fp16}}
"""


def machine(folder: Path, models: dict[str, Path], factor: float = 1.0) -> Path:
    """A checkout of the recipe on one machine (its own folder and local cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        folder,
        RECIPE.format(
            other=models["other"],
            finetune=models["finetune"],
            base=models["base"],
            factor=factor,
        ),
    )


def build(recipe: Path, remote: str, *extra: str) -> dict:
    result = invoke(
        "build",
        "--json",
        "--cache-dir",
        str(recipe.parent / "cache"),
        "--cache-url",
        remote,
        *extra,
        str(recipe),
    )
    assert result.exit_code == 0, result.stderr
    return {**json.loads(result.stdout), "stderr": result.stderr}


def test_a_second_machine_downloads_the_output_with_identical_bytes_and_lock(
    tmp_path, models, remote
):
    first = machine(tmp_path / "one", models)
    report = build(first, remote)
    assert "pushed to" in report["stderr"] and report["outputs"][0]["result"] == "built"
    assert credentials_nowhere(tmp_path / "one")
    second = machine(tmp_path / "two", models)
    again = build(second, remote)
    assert "pulled from" in again["stderr"]
    assert again["outputs"][0]["result"] == "restored from cache"
    assert again["cache"]["tensors_computed"] == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "out.safetensors").read_bytes() == (two / "out.safetensors").read_bytes()
    assert (one / "recipe.lock").read_text() == (two / "recipe.lock").read_text()


def credentials_nowhere(folder: Path) -> bool:
    """Neither the key nor the endpoint is written into any file sdrecipe wrote."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".lock", ".safetensors", ".yaml"):
            data = path.read_bytes()
            if b"testing" in data or b"127.0.0.1" in data:
                return False
    return True


def test_intermediates_come_from_the_remote_when_only_a_downstream_node_changed(
    tmp_path, models, remote
):
    build(machine(tmp_path / "one", models), remote)
    assert s3().find(f"{remote}/refs"), "the TIES node's tensors were pushed"
    changed = machine(tmp_path / "two", models, factor=0.5)
    report = build(changed, remote)
    assert report["outputs"][0]["result"] == "built"
    assert report["cache"]["tensors_from_cache"] > 0, "the TIES tensors were not recomputed"
    assert "pulled from" in report["stderr"] and " tensors (" in report["stderr"]


def test_concurrent_builds_upload_the_same_identities_safely(tmp_path, models, remote):
    recipes = [machine(tmp_path / name, models) for name in ("one", "two")]
    env = {**os.environ, "SDRECIPE_CACHE_URL": remote}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sdrecipe",
                "build",
                "--cache-dir",
                str(r.parent / "cache"),
                str(r),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in recipes
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    assert not s3().find(f"{remote}/tmp"), "no temporary upload is left"
    third = build(machine(tmp_path / "three", models), remote)
    assert third["outputs"][0]["result"] == "restored from cache"
    assert (tmp_path / "three" / "out.safetensors").read_bytes() == (
        tmp_path / "one" / "out.safetensors"
    ).read_bytes()


def test_a_corrupt_remote_output_is_reported_ignored_and_replaced(tmp_path, models, remote):
    build(machine(tmp_path / "one", models), remote)
    (pack,) = s3().find(f"{remote}/packs")
    good = s3().cat_file(pack)
    s3().pipe_file(pack, good[: len(good) // 2])
    report = build(machine(tmp_path / "two", models), remote)
    assert "is corrupt; ignored and removed" in report["stderr"]
    assert report["outputs"][0]["result"] == "built"
    assert (tmp_path / "two" / "out.safetensors").read_bytes() == good
    assert s3().cat_file(pack) == good, "the rebuilt output replaced the corrupt one"


def test_an_unreachable_remote_is_a_note_and_the_build_succeeds(tmp_path, models, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    report = build(machine(tmp_path / "one", models), "s3://nowhere/cache")
    assert report["outputs"][0]["result"] == "built"
    assert "the remote cache s3://nowhere/cache failed" in report["stderr"]
    assert "going on with the local cache alone" in report["stderr"]


def test_cache_push_and_pull_move_a_recipes_entries(tmp_path, models, remote):
    first = machine(tmp_path / "one", models)
    local = invoke("build", "--cache-dir", str(tmp_path / "one" / "cache"), str(first))
    assert local.exit_code == 0 and not s3().exists(f"{remote}/outputs")
    pushed = invoke(
        "cache",
        "push",
        "--cache-dir",
        str(tmp_path / "one" / "cache"),
        "--cache-url",
        remote,
        str(first),
    )
    assert pushed.exit_code == 0, pushed.stderr
    assert pushed.stdout.startswith("pushed 1 outputs")
    second = machine(tmp_path / "two", models)
    pulled = invoke(
        "cache",
        "pull",
        "--cache-dir",
        str(tmp_path / "two" / "cache"),
        "--cache-url",
        remote,
        "--json",
        str(second),
    )
    assert json.loads(pulled.stdout)["outputs"] == 1, pulled.stdout
    offline = invoke("build", "--json", "--cache-dir", str(tmp_path / "two" / "cache"), str(second))
    assert json.loads(offline.stdout)["outputs"][0]["result"] == "restored from cache"
    info = json.loads(
        invoke(
            "cache",
            "info",
            "--json",
            "--cache-dir",
            str(tmp_path / "two" / "cache"),
            "--cache-url",
            remote,
        ).stdout
    )
    assert info["remote"]["outputs"] == 1 and info["packs"] == 1


SLERP_RECIPE = """
inputs: {{A: {other}, B: {finetune}}}
nodes:
  blended: "slerp(A, B, t={t})"
  out: 0.5 * blended + 0.5 * A
outputs:
  out: {{path: out.safetensors, dtype: fp16}}
"""


def test_a_push_uploads_what_a_gpu_build_cached_where_the_lock_records_it(tmp_path, models, remote):
    """A GPU build files the tensors and outputs of methods whose bytes follow the
    device (slerp) under identities of its class, and its lock records the class:
    `cache push` uploads those without being told the device. No GPU here, so the
    GPU build's entries are made from CPU builds' (another `t` for its output)."""
    folder, elsewhere, cache_dir = tmp_path / "one", tmp_path / "two", tmp_path / "cache"
    for where, t in ((folder, 0.3), (elsewhere, 0.4)):
        where.mkdir()
        text = SLERP_RECIPE.format(other=models["other"], finetune=models["finetune"], t=t)
        built = invoke("build", "--cache-dir", str(cache_dir), str(write_recipe(where, text)))
        assert built.exit_code == 0, built.stderr
    recipe = folder / "recipe.yaml"
    store = Cache(cache_dir)
    prepared = prepare(recipe)
    on_cpu, on_cuda = (assess(prepared, store, 1, device_class=c) for c in ("cpu", "cuda"))
    held = store.lookup(on_cpu.identities.every())
    gpu_refs = {
        on_cuda.identities.values[node][key]: held[identity]
        for node, keys in on_cpu.identities.values.items()
        for key, identity in keys.items()
        if identity in held and on_cuda.identities.values[node][key] != identity
    }
    assert len(gpu_refs) > 10
    store.add_refs(gpu_refs.items())
    gpu_output = elsewhere / "out.safetensors"
    digest = hashlib.sha256(gpu_output.read_bytes()).hexdigest()
    cuda_id, cpu_id = on_cuda.output_ids["out"], on_cpu.output_ids["out"]
    store.add_pack(gpu_output, digest, cuda_id)

    def push() -> dict:
        result = invoke(
            "cache", "push", "--json", "--cache-dir", str(cache_dir), "--cache-url", remote,
            str(recipe),
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    assert push()["outputs"] == 1  # the lock says cpu: the CPU build's output alone
    assert s3().exists(f"{remote}/outputs/{cpu_id}")
    assert not s3().exists(f"{remote}/outputs/{cuda_id}")
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert lock["outputs"]["out"]["device"] == "cpu"
    lock["outputs"]["out"]["device"] = "cuda"
    recipe.with_suffix(".lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    moved = push()
    assert moved["outputs"] == 1 and moved["refs"] == len(gpu_refs)
    assert s3().exists(f"{remote}/outputs/{cuda_id}")
    # A pull names the class it wants, and needs no GPU to fetch a GPU build's
    # tensors. (The stand-in output, made with another t, is refused: a pull
    # checks that an output is the one its identity names.)
    pulled = invoke(
        "cache", "pull", "--json", "--device", "cuda", "--cache-dir", str(tmp_path / "other"),
        "--cache-url", remote, str(recipe),
    )  # fmt: skip
    assert pulled.exit_code == 0, pulled.stderr
    assert json.loads(pulled.stdout)["refs"] == len(gpu_refs)
    assert set(Cache(tmp_path / "other").lookup(gpu_refs)) == set(gpu_refs)


def test_a_url_no_backend_knows_is_a_usage_error(tmp_path, models):
    result = invoke("build", "--cache-url", "nosuch://x/y", str(machine(tmp_path, models)))
    assert result.exit_code == 2 and "--cache-url nosuch://x/y" in result.stderr
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


# --- inputs named by URL


def upload_model(path: Path, url: str) -> str:
    s3().put_file(str(path), url)
    return url


def remote_inputs_recipe(folder: Path, a: str, b: Path, pin: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pinned = f"{{path: {a}, sha256: {pin}}}" if pin else a
    return write_recipe(
        folder,
        f"""
        inputs: {{A: {pinned}, B: {b}}}
        nodes: {{mix: "weighted_sum(A, B, alpha=0.25)"}}
        outputs: {{mix: {{path: mix.safetensors, dtype: fp32}}}}
        """,
    )


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_remote_input_is_fetched_once_and_built_like_a_local_one(tmp_path, models, remote):
    url = upload_model(models["base"], f"{remote}/models/base.safetensors")
    recipe = remote_inputs_recipe(tmp_path / "r", url, models["finetune"])
    first = invoke("build", "--cache-dir", str(tmp_path / "cache"), str(recipe))
    assert first.exit_code == 0, first.stderr
    local = remote_inputs_recipe(tmp_path / "l", str(models["base"]), models["finetune"])
    assert invoke("build", "--cache-dir", str(tmp_path / "cache2"), str(local)).exit_code == 0
    stored = tmp_path / "cache" / "inputs" / f"{sha256_file(models['base'])}.safetensors"
    assert stored.read_bytes() == models["base"].read_bytes()
    mine = load_file(tmp_path / "r" / "mix.safetensors")
    theirs = load_file(tmp_path / "l" / "mix.safetensors")
    assert mine.keys() == theirs.keys()
    assert all((mine[key] == theirs[key]).all() for key in mine)
    with safe_open(tmp_path / "r" / "mix.safetensors", "np") as handle:
        assert f"path: {url}" in handle.metadata()["sdrecipe.recipe"], "a self-contained recipe"
    lock = (tmp_path / "r" / "recipe.lock").read_text()
    assert f"path: {url}" in lock
    inode = stored.stat().st_ino
    (tmp_path / "r" / "mix.safetensors").unlink()
    again = invoke("build", "--cache-dir", str(tmp_path / "cache"), str(recipe))
    assert again.exit_code == 0 and stored.stat().st_ino == inode, "not downloaded twice"
    upload_model(models["other"], url)  # a new version at the same URL
    changed = invoke("build", "--json", "--cache-dir", str(tmp_path / "cache"), str(recipe))
    assert json.loads(changed.stdout)["outputs"][0]["result"] == "built"
    assert (tmp_path / "cache" / "inputs" / f"{sha256_file(models['other'])}.safetensors").exists()


def test_a_remote_input_is_checked_against_its_pin(tmp_path, models, remote):
    url = upload_model(models["base"], f"{remote}/models/base.safetensors")
    good = remote_inputs_recipe(
        tmp_path / "good", url, models["finetune"], sha256_file(models["base"])
    )
    assert invoke("build", "--cache-dir", str(tmp_path / "cache"), str(good)).exit_code == 0
    wrong = remote_inputs_recipe(tmp_path / "bad", url, models["finetune"], "0" * 64)
    result = invoke("build", "--cache-dir", str(tmp_path / "other-cache"), str(wrong))
    assert result.exit_code == 2
    assert (
        f"has sha256 {sha256_file(models['base'])}, and the recipe pins {'0' * 64}" in result.stderr
    )
    assert not list((tmp_path / "other-cache" / "inputs").glob("*.safetensors"))
    missing = remote_inputs_recipe(
        tmp_path / "gone", f"{remote}/models/none.safetensors", models["finetune"]
    )
    gone = invoke("build", str(missing))
    assert gone.exit_code == 2 and "cannot read" in gone.stderr


def test_a_prefix_or_an_empty_object_is_refused_naming_the_url(tmp_path, models, remote):
    upload_model(models["base"], f"{remote}/models/base.safetensors")
    s3().pipe(f"{remote}/models/empty.safetensors", b"")
    for url, says in (
        (f"{remote}/models/", "is a folder (a prefix), not a model file"),
        (f"{remote}/models", "is a folder (a prefix), not a model file"),
        (f"{remote}/models/empty.safetensors", "is empty, not a model file"),
    ):
        recipe = remote_inputs_recipe(tmp_path / "r", url, models["finetune"])
        result = invoke("build", "--cache-dir", str(tmp_path / "cache"), str(recipe))
        assert result.exit_code == 2, result.output
        assert f"input 'A': {url} {says}" in result.stderr
        assert "recipe.yaml:" in result.stderr
        assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache" / "inputs").glob("*.safetensors"))


def test_a_tampered_sources_file_names_nothing_outside_the_store(tmp_path, models, remote):
    """The store's sources.json is the cache's: an entry naming a path outside the
    store, or a damaged file, is forgotten and the input downloaded again."""
    url = upload_model(models["base"], f"{remote}/models/base.safetensors")
    recipe = remote_inputs_recipe(tmp_path / "r", url, models["finetune"])
    cache = tmp_path / "cache"
    assert invoke("build", "--cache-dir", str(cache), str(recipe)).exit_code == 0
    expected = (tmp_path / "r" / "mix.safetensors").read_bytes()
    sources_file = cache / "inputs" / "sources.json"
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(models["other"].read_bytes())
    stored = cache / "inputs" / f"{sha256_file(models['base'])}.safetensors"
    escape = str(victim.with_suffix("")).replace(str(stored.parent), "..")
    for tampered in (
        {source: f"../../{victim.stem}" for source in json.loads(sources_file.read_text())},
        {source: escape for source in json.loads(sources_file.read_text())},
        "{not json",
    ):
        sources_file.write_text(tampered if isinstance(tampered, str) else json.dumps(tampered))
        (tmp_path / "r" / "mix.safetensors").unlink()
        result = invoke("build", "--no-cache", "--cache-dir", str(cache), str(recipe))
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "r" / "mix.safetensors").read_bytes() == expected
        assert victim.read_bytes() == models["other"].read_bytes()
        assert set(json.loads(sources_file.read_text()).values()) == {stored.stem}
