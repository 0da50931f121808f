"""What a cache holds is untrusted ground: names read from the local index or a
remote never reach outside the cache's own folders, cleanup deletes only what
the cache wrote, a folder that is not a cache is never adopted, and a damaged
remote entry is a corrupt entry (counted, named, replaced), never a reason to
drop the remote tier. The remote here is a `file://` folder: a real fsspec
backend, and the one where a name with `..` in it reaches other files."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import invoke, write_recipe

RECIPE = """
inputs: {{A: {other}, B: {finetune}, C: {base}}}
nodes:
  learned: "ties(C, B, A, density=0.5) - C"
  out: A + {factor} * learned
outputs:
  out: {{path: out.safetensors, dtype: fp16}}
"""


@pytest.fixture
def models(small_models: dict[str, Path]) -> dict[str, Path]:
    """Models of 39 keys: each cached tensor is a file of its own."""
    return small_models


def machine(folder: Path, models: dict[str, Path], factor: float = 1.0) -> Path:
    """A checkout of the recipe on one machine (its own folder and local cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = RECIPE.format(
        other=models["other"],
        finetune=models["finetune"],
        base=models["base"],
        factor=factor,
    )
    return write_recipe(folder, text)


def build(recipe: Path, remote: Path | None = None, *extra: str) -> dict:
    """`build --json` with the machine's own cache (and the remote, if given)."""
    shared = ("--cache-url", remote.as_uri()) if remote else ()
    cache = ("--cache-dir", str(recipe.parent / "cache"))
    result = invoke("build", "--json", *cache, *shared, *extra, str(recipe))
    assert result.exit_code == 0, result.stderr
    assert "going on with the local cache alone" not in result.stderr
    return {**json.loads(result.stdout), "stderr": result.stderr}


def cache_pull(recipe: Path, remote: Path) -> dict:
    result = invoke(
        "cache",
        "pull",
        "--json",
        "--cache-dir",
        str(recipe.parent / "cache"),
        "--cache-url",
        remote.as_uri(),
        str(recipe),
    )
    assert result.exit_code == 0, result.stderr
    return {**json.loads(result.stdout), "stderr": result.stderr}


def victims(*folders: Path) -> list[Path]:
    """A file worth keeping in each folder, where a `..` name would land."""
    planted = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        planted.append(folder / "precious.safetensors")
        planted[-1].write_bytes(b"precious")
    return planted


def write_ref_file(remote: Path, entries: dict) -> Path:
    """A ref file as a push writes it: named by its content's sha256."""
    data = json.dumps(entries, sort_keys=True).encode()
    path = remote / "refs" / f"{hashlib.sha256(data).hexdigest()}.json"
    path.write_bytes(data)
    return path


def flip_a_data_byte(path: Path) -> None:
    """Change one byte of tensor data; the file stays valid safetensors."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


# --- item 1: names from a remote or the index never leave the cache's folders


@pytest.mark.parametrize("tampered", ["outputs record", "ref file"])
def test_a_remote_naming_a_path_outside_the_cache_deletes_nothing(tmp_path, models, tampered):
    remote = tmp_path / "remote"
    first = machine(tmp_path / "one", models)
    build(first, remote)
    # Where `packs/../../victims/precious` and `objects/../victims/precious` land,
    # remotely (tmp_path/victims) and in machine two's cache (two/victims).
    planted = victims(tmp_path / "victims", tmp_path / "two" / "victims")
    if tampered == "outputs record":
        (record,) = (remote / "outputs").iterdir()
        record.write_text(json.dumps({"digest": "../../victims/precious"}))
    else:
        (ref_file,) = (remote / "refs").iterdir()
        entries = json.loads(ref_file.read_bytes())
        ref_file.unlink()
        escape = "../victims/precious"
        write_ref_file(remote, {identity: [escape, "tensor", escape] for identity in entries})
    second = machine(tmp_path / "two", models, factor=0.5 if tampered == "ref file" else 1.0)
    report = build(second, remote)
    assert all(path.read_bytes() == b"precious" for path in planted)
    assert report["cache"]["corrupt_entries"] == 1
    folder = {"outputs record": "outputs", "ref file": "refs"}[tampered]
    assert f"{remote.as_uri()}/{folder}/" in report["stderr"] and "is corrupt" in report["stderr"]
    assert report["outputs"][0]["result"] == "built"
    # The push replaced the forged file: a third machine is served whole.
    third = build(machine(tmp_path / "three", models), remote)
    assert third["cache"]["corrupt_entries"] == 0
    assert third["outputs"][0]["result"] == "restored from cache"
    assert (tmp_path / "three" / "out.safetensors").read_bytes() == (
        tmp_path / "one" / "out.safetensors"
    ).read_bytes()


def test_a_tampered_local_index_deletes_nothing_outside_the_cache(tmp_path, models):
    recipe = machine(tmp_path, models)
    build(recipe)
    planted = victims(tmp_path / "victims")
    # packs/../../victims and objects/../../victims are both tmp_path/victims.
    with sqlite3.connect(tmp_path / "cache" / "index.sqlite") as db:
        db.execute("UPDATE entries SET name='../../victims/precious' WHERE kind='pack'")
        db.execute(
            "UPDATE entries SET name='../victims/precious' WHERE rowid="
            "(SELECT MIN(rowid) FROM entries WHERE kind='object')"
        )
        db.execute("UPDATE refs SET entry='../victims/precious', digest='../victims/precious'")
        db.execute("UPDATE content_digests SET digest='../../victims/precious'")
    db.close()
    recipe.write_text(recipe.read_text().replace("1.0 * learned", "0.5 * learned"))
    changed = build(recipe)
    assert changed["outputs"][0]["result"] == "built"
    cache = ("--cache-dir", str(tmp_path / "cache"))
    assert invoke("cache", "gc", "--max-size", "0", *cache).exit_code == 0
    assert invoke("cache", "clear", *cache).exit_code == 0
    assert all(path.read_bytes() == b"precious" for path in planted)


# --- item 2: cleanup deletes only what the cache wrote; foreign folders are refused


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "command", [("build",), ("cache", "gc"), ("cache", "clear"), ("cache", "limit", "1GB")]
)
def test_a_folder_that_is_not_a_cache_is_refused_and_left_as_it_was(tmp_path, models, command):
    recipe = machine(tmp_path / "project", models)
    folder = tmp_path / "loras"
    (folder / "packs").mkdir(parents=True)
    (folder / "packs" / "my-favourite-lora.safetensors").write_bytes(b"lora")
    (folder / "notes.txt").write_text("mine")
    # An index, as any build of an earlier version made, even a refused one.
    build(machine(tmp_path / "elsewhere", models))
    (folder / "index.sqlite").write_bytes((tmp_path / "elsewhere/cache/index.sqlite").read_bytes())
    before = snapshot(folder)
    target = (str(recipe),) if command == ("build",) else ()
    result = invoke(*command, "--cache-dir", str(folder), *target)
    assert result.exit_code == 2, result.output
    assert f"the cache folder {folder}" in result.stderr and "not sdrecipe's" in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["index.sqlite", "notes.txt", "packs"]


def test_a_cache_dir_inside_a_git_folder_is_refused(tmp_path, models):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "file.txt").write_text("kept")
    subprocess.run([*git, "add", "file.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    before = snapshot(repo / ".git")
    recipe = machine(tmp_path / "project", models)
    for cache_dir in (repo / ".git", repo / ".git" / "sdrecipe-cache"):
        for command in (("cache", "limit", "20GB"), ("build", str(recipe))):
            result = invoke(*command[:-1], "--cache-dir", str(cache_dir), command[-1])
            assert result.exit_code == 2, result.output
            assert ".git folder" in result.stderr
        invoke("cache", "gc", "--cache-dir", str(cache_dir))
    assert snapshot(repo / ".git") == before
    assert not (repo / ".git" / "sdrecipe-cache").exists()
    log = subprocess.run([*git, "log", "--oneline"], capture_output=True, text=True, check=True)
    assert "one" in log.stdout


def test_cleanup_deletes_only_files_of_the_caches_own_naming(tmp_path, models):
    recipe = machine(tmp_path, models)
    build(recipe)
    cache = tmp_path / "cache"
    prefix = next(p for p in (cache / "objects").iterdir() if p.is_dir())
    elsewhere = "ff" if prefix.name != "ff" else "00"
    strangers = [
        cache / "packs" / "my-favourite-lora.safetensors",
        cache / "objects" / "notes.txt",
        prefix / "mine.safetensors",
        # A digest's name in the wrong prefix folder is not one the cache wrote.
        prefix / f"{elsewhere}{'0' * 62}.safetensors",
    ]
    for path in strangers:
        path.write_bytes(b"not the cache's")
    limit = ("--cache-dir", str(cache))
    # The trim after a build, gc, and clear.
    assert invoke("cache", "limit", "1", *limit).exit_code == 0
    recipe.write_text(recipe.read_text().replace("1.0 * learned", "0.5 * learned"))
    build(recipe)
    assert invoke("cache", "gc", "--max-size", "0", *limit).exit_code == 0
    assert invoke("cache", "clear", *limit).exit_code == 0
    assert all(path.read_bytes() == b"not the cache's" for path in strangers)
    own = [p for p in cache.rglob("*.safetensors") if p not in strangers]
    assert own == [], "clear deleted the cache's own entries"


def test_a_cache_of_an_earlier_version_is_adopted_and_marked(tmp_path, models):
    recipe = machine(tmp_path, models)
    build(recipe)
    marker = tmp_path / "cache" / "CACHEDIR.TAG"
    assert marker.read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    marker.unlink()  # as an earlier version left it: no marker
    (tmp_path / "out.safetensors").unlink()
    again = build(recipe)
    assert again["outputs"][0]["result"] == "restored from cache"
    assert "created by sdrecipe" in marker.read_text()


def test_a_cache_folder_kept_in_git_by_a_placeholder_is_adopted_and_keeps_it(tmp_path, models):
    """A repository keeps its empty cache folder with a .gitkeep: that folder is
    a cache, and cleaning it never removes the placeholder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".gitkeep").touch()
    (cache / ".gitignore").write_text("*\n")
    recipe = machine(tmp_path, models)
    assert build(recipe)["outputs"][0]["result"] == "built"
    for command in (("cache", "gc", "--max-size", "0"), ("cache", "clear")):
        result = invoke(*command, "--cache-dir", str(cache))
        assert result.exit_code == 0, result.output
    assert (cache / ".gitkeep").exists()
    assert (cache / ".gitignore").read_text() == "*\n"


def test_a_cache_dir_holding_an_input_is_refused(tmp_path, models):
    recipe = machine(tmp_path, models)
    build(recipe)
    (pack,) = (tmp_path / "cache" / "packs").iterdir()
    reuse = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {pack}, B: {models["base"]}}}
        nodes: {{mix: "weighted_sum(A, B, alpha=0.5)"}}
        outputs: {{mix: mix.safetensors}}
        """,
        "reuse.yaml",
    )
    for command in ("validate", "build"):
        result = invoke(command, "--cache-dir", str(tmp_path / "cache"), str(reuse))
        assert result.exit_code == 2, result.output
        assert f"the cache folder {tmp_path / 'cache'} contains input 'A'" in result.stderr
        assert "reuse.yaml:1" in result.stderr
    assert not (tmp_path / "mix.safetensors").exists()


def test_a_refused_build_creates_no_cache(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        """
        inputs: {A: missing.safetensors}
        nodes: {x: A}
        outputs: {x: x.safetensors}
        """,
    )
    result = invoke("build", "--cache-dir", str(tmp_path / "new-cache"), str(recipe))
    assert result.exit_code == 2
    assert not (tmp_path / "new-cache").exists()


# --- item 4: a damaged remote entry is a corrupt entry, counted, named and replaced


@pytest.mark.parametrize("damage", ["outputs record", "ref file", "objects"])
def test_a_damaged_remote_entry_is_counted_named_and_replaced(tmp_path, models, damage):
    remote = tmp_path / "remote"
    build(machine(tmp_path / "one", models), remote)
    damaged = {
        "outputs record": list((remote / "outputs").iterdir()),
        "ref file": list((remote / "refs").iterdir()),
        "objects": list((remote / "objects").rglob("*.safetensors")),
    }[damage]
    assert damaged
    for path in damaged:
        if damage == "objects":
            flip_a_data_byte(path)
        else:
            path.write_bytes(b"{not json")
    # The record is read by a machine that wants the output; the objects are
    # stored again only by one that computes them.
    factor = 1.0 if damage == "outputs record" else 0.5
    second = build(machine(tmp_path / "two", models, factor), remote)
    assert second["cache"]["corrupt_entries"] == len(damaged)
    for path in damaged:
        assert f"{path.relative_to(remote)} is corrupt" in second["stderr"]
    # The push replaced what was damaged: the next machine is served whole, the
    # output (its record) or, for a new factor, the TIES tensors (refs and objects).
    if damage == "outputs record":
        third = build(machine(tmp_path / "three", models), remote)
        assert third["outputs"][0]["result"] == "restored from cache"
    else:
        third = build(machine(tmp_path / "three", models, factor=0.25), remote)
        assert third["cache"]["tensors_from_cache"] > 0
    assert third["cache"]["corrupt_entries"] == 0 and "corrupt" not in third["stderr"]


# --- item 19 and a second guard of the output check: what a pull verifies


def test_a_pull_refuses_a_remote_object_whose_tensor_differs_from_its_digest(tmp_path, models):
    remote = tmp_path / "remote"
    build(machine(tmp_path / "one", models), remote)
    objects = sorted((remote / "objects").rglob("*.safetensors"))
    victim = objects[len(objects) // 2]
    good = victim.read_bytes()
    flip_a_data_byte(victim)
    second = machine(tmp_path / "two", models)
    pulled = cache_pull(second, remote)
    name = str(victim.relative_to(remote))
    assert pulled["corrupt"] == [name]
    assert pulled["objects"] == len(objects) - 1
    assert not (tmp_path / "two" / "cache" / name).exists()
    assert not victim.exists(), "the corrupt remote object was removed"
    changed = machine(tmp_path / "two", models, factor=0.5)
    report = build(changed, remote)
    assert report["cache"]["corrupt_entries"] == 0
    assert victim.read_bytes() == good, "the push replaced it"


def test_a_pull_refuses_a_remote_output_that_is_another_valid_model(tmp_path, models):
    remote = tmp_path / "remote"
    first = machine(tmp_path / "one", models)
    build(first, remote)
    (pack,) = (remote / "packs").iterdir()
    pack.write_bytes(models["base"].read_bytes())  # whole, valid, and not this output
    second = machine(tmp_path / "two", models)
    pulled = cache_pull(second, remote)
    assert pulled["outputs"] == 0
    assert pulled["corrupt"] == [f"packs/{pack.name}"]
    info = invoke("cache", "info", "--json", "--cache-dir", str(tmp_path / "two" / "cache"))
    assert json.loads(info.stdout)["packs"] == 0
    offline = build(second)
    assert offline["outputs"][0]["result"] == "built"
    assert (tmp_path / "two" / "out.safetensors").read_bytes() == (
        tmp_path / "one" / "out.safetensors"
    ).read_bytes()


def test_cleaning_where_there_is_no_cache_says_so_and_creates_nothing(tmp_path):
    nowhere = tmp_path / "no-cache"
    cleared = invoke("cache", "clear", "--cache-dir", str(nowhere))
    assert cleared.exit_code == 0
    assert f"there is no cache at {nowhere}: nothing to clear" in cleared.stdout
    assert "cleared" not in cleared.stdout
    collected = invoke("cache", "gc", "--cache-dir", str(nowhere))
    assert "nothing to remove" in collected.stdout and "removed" not in collected.stdout
    as_json = json.loads(invoke("cache", "gc", "--json", "--cache-dir", str(nowhere)).stdout)
    assert as_json["cache"] is False and as_json["removed"] == 0
    assert not nowhere.exists()


# --- audit: the remote deletes only its own names, never hangs, leaves no temporaries


def test_files_in_a_remote_that_are_not_sdrecipes_are_ignored_never_removed(tmp_path, models):
    remote = tmp_path / "remote"
    foreign = {
        "refs/face.png": b"img",
        "outputs/notes.txt": b"notes",
        "packs/readme.md": b"readme",
        "objects/ab/holiday.jpg": b"photo",
        "tmp/keep.txt": b"keep",
    }
    for name, data in foreign.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(data)
    recipe = machine(tmp_path / "one", models)
    report = build(recipe, remote)
    assert report["cache"]["corrupt_entries"] == 0 and "is corrupt" not in report["stderr"]
    assert "not sdrecipe's; ignored and left as they are" in report["stderr"]
    pushed = invoke("cache", "push", "--cache-dir", str(recipe.parent / "cache"),
                    "--cache-url", remote.as_uri(), str(recipe))  # fmt: skip
    assert pushed.exit_code == 0, pushed.stderr
    assert {name: (remote / name).read_bytes() for name in foreign} == foreign
    third = build(machine(tmp_path / "two", models), remote)
    assert third["outputs"][0]["result"] == "restored from cache"


def test_a_symlinked_remote_folder_is_refused_and_a_symlinked_entry_kept(tmp_path, models):
    remote = tmp_path / "remote"
    (planted,) = victims(tmp_path / "victims")
    remote.mkdir()
    (remote / "refs").symlink_to(tmp_path / "victims")
    recipe = machine(tmp_path / "one", models)
    refused = invoke("build", "--cache-dir", str(tmp_path / "one" / "cache"),
                     "--cache-url", remote.as_uri(), str(recipe))  # fmt: skip
    assert refused.exit_code == 2
    assert f"{remote / 'refs'} is a symbolic link" in refused.stderr
    assert planted.read_bytes() == b"precious"
    # A symlinked entry of the tier's own name is corrupt, never deleted or followed.
    (remote / "refs").unlink()
    (remote / "refs").mkdir()
    link = remote / "refs" / f"{'0' * 64}.json"
    link.symlink_to(planted)
    report = build(recipe, remote)
    assert report["cache"]["corrupt_entries"] == 1
    assert "refs/" in report["stderr"] and "not a regular file; left" in report["stderr"]
    assert link.is_symlink() and planted.read_bytes() == b"precious"


@pytest.mark.parametrize("entry", ["outputs record", "ref file"])
def test_a_fifo_in_the_remote_is_a_corrupt_entry_not_a_hang(tmp_path, models, entry):
    import os

    from conftest import run_cli

    remote = tmp_path / "remote"
    build(machine(tmp_path / "one", models), remote)
    if entry == "outputs record":
        (fifo,) = (remote / "outputs").iterdir()
        fifo.unlink()
    else:
        fifo = remote / "refs" / f"{'f' * 64}.json"
    os.mkfifo(fifo)
    second = machine(tmp_path / "two", models)
    done = run_cli("build", "--json", "--cache-dir", str(tmp_path / "two" / "cache"),
                   "--cache-url", remote.as_uri(), str(second))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cache"]["corrupt_entries"] == 1
    assert f"{fifo.relative_to(remote)} is corrupt" in done.stderr


def test_an_oversized_remote_record_is_corrupt_and_not_read_whole(tmp_path, models):
    from sdrecipe.cache.remote import MAX_RECORD_SIZE

    remote = tmp_path / "remote"
    build(machine(tmp_path / "one", models), remote)
    (record,) = (remote / "outputs").iterdir()
    digest = json.loads(record.read_bytes())["digest"]
    record.write_text(json.dumps({"digest": digest, "pad": "x" * MAX_RECORD_SIZE}))
    second = build(machine(tmp_path / "two", models), remote)
    assert second["cache"]["corrupt_entries"] == 1
    assert json.loads(record.read_bytes()) == {"digest": digest}, "the push replaced it"


def test_an_interrupted_push_or_pull_leaves_no_temporaries(tmp_path, models, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from sdrecipe.cache.remote import RemoteCache

    remote = tmp_path / "remote"
    recipe = machine(tmp_path / "one", models)
    build(recipe)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    args = ("--cache-url", remote.as_uri(), str(recipe))
    with monkeypatch.context() as patch:
        patch.setattr(LocalFileSystem, "mv", stopped)
        pushed = invoke("cache", "push", "--cache-dir", str(tmp_path / "one" / "cache"), *args)
    assert pushed.exit_code == 130
    assert not list((remote / "tmp").iterdir())
    assert invoke("cache", "push", "--cache-dir", str(tmp_path / "one" / "cache"), *args)
    second = tmp_path / "two" / "cache"
    with monkeypatch.context() as patch:
        patch.setattr(RemoteCache, "_take_object", stopped)
        pulled = invoke("cache", "pull", "--cache-dir", str(second), *args)
    assert pulled.exit_code == 130
    with monkeypatch.context() as patch:
        patch.setattr(LocalFileSystem, "get", stopped)
        pulled = invoke("cache", "pull", "--cache-dir", str(second), *args)
    assert pulled.exit_code == 130
    assert not [p for p in second.rglob("*") if p.name.endswith(".tmp")]


def test_stale_temporaries_of_dead_processes_are_removed_when_the_cache_opens(tmp_path, models):
    import os
    import sys
    import time

    remote = tmp_path / "remote"
    recipe = machine(tmp_path / "one", models)
    build(recipe, remote)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    cache = tmp_path / "one" / "cache"
    prefix = next(p for p in (cache / "objects").iterdir() if p.is_dir())
    stale = [
        cache / "objects" / f".object-{'a' * 32}.sdrecipe-{dead}.tmp",
        prefix / f".{prefix.name}{'b' * 62}.safetensors-{'c' * 32}.sdrecipe-{dead}.tmp",
        cache / "packs" / f".{'d' * 64}.safetensors-{'e' * 32}.sdrecipe-{dead}.tmp",
    ]
    live = cache / "objects" / f".object-{'f' * 32}.sdrecipe-{os.getpid()}.tmp"
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    build(machine(tmp_path / "one", models, factor=0.5))
    assert not any(path.exists() for path in stale) and live.exists()
    stale[0].write_bytes(b"partial")
    cache_pull(recipe, remote)
    assert not stale[0].exists()
    # The remote's upload temporaries: an old one goes on push, a young one or
    # another name stays (another machine may be pushing now).
    old, young, other = (
        remote / "tmp" / ("1" * 32),
        remote / "tmp" / ("2" * 32),
        remote / "tmp" / "x",
    )
    for path in (old, young, other):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    build(machine(tmp_path / "one", models, factor=0.25), remote)
    assert not old.exists() and young.exists() and other.exists()


@pytest.mark.parametrize("where", ["itself", "inside", "holding"])
def test_a_cache_url_that_is_the_local_cache_folder_is_refused(tmp_path, models, where):
    recipe = machine(tmp_path / "one", models)
    cache = tmp_path / "one" / "cache"
    url = {"itself": cache, "inside": cache / "remote", "holding": tmp_path}[where].as_uri()
    for command in (["build"], ["cache", "push"], ["cache", "pull"]):
        result = invoke(*command, "--cache-dir", str(cache), "--cache-url", url, str(recipe))
        assert result.exit_code == 2, (command, result.stderr)
        assert f"--cache-url {url} is the local cache folder {cache}" in result.stderr
    assert not any((cache / name).exists() for name in ("outputs", "refs", "tmp"))
