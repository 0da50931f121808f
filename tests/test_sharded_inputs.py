"""Sharded safetensors inputs: numbered shards behind an index JSON, for any family."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_in_process, write_recipe
from sdrecipe.io.diffusers_reader import DiffusersReader
from sdrecipe.io.fingerprint import FileStat
from sdrecipe.io.readers import open_model
from sdrecipe.io.sharded_reader import ShardedSafetensorsReader
from sdrecipe.recipe.lock import lock_path

DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# Every file this process opens while `_watching` holds a list (an audit hook
# cannot be removed, so it stays installed and idle).
_watching: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watching and isinstance(args[0], str | bytes | os.PathLike):
        _watching[-1].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, count: int = 3) -> Path:
    """`tensors` as `count` diffusers-style shards and their index, written here."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for number in range(count):
        file = f"diffusion_pytorch_model-{number + 1:05d}-of-{count:05d}.safetensors"
        part = names[number::count]
        save_file({key: tensors[key] for key in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = folder / DIFFUSERS_INDEX
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def write_hub_shards(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """`tensors` sharded by huggingface_hub itself (the independent oracle)."""
    hub = pytest.importorskip("huggingface_hub")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    folder.mkdir(parents=True, exist_ok=True)
    hub.save_torch_state_dict(tensors, folder, max_shard_size=total // 3 + 1)
    index = folder / "model.safetensors.index.json"
    assert index.is_file() and len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
    return index


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, models) -> dict[str, Path]:
    """The `finetune` model sharded two ways: by this test's writer and by the hub's."""
    tensors = load_file(models["finetune"])
    root = tmp_path_factory.mktemp("sharded")
    return {
        "own": write_shards(tensors, root / "own"),
        "hub": write_hub_shards(tensors, root / "hub"),
    }


def merge_recipe(folder: Path, b: Path, name: str) -> Path:
    return write_recipe(
        folder,
        f"""
        inputs:
          A: {folder.parent / "base.safetensors"}
          B: {b}
        nodes:
          soft: {{method: weighted_sum, models: [A, B], alpha: 0.3}}
        outputs:
          soft: {folder / name}.safetensors
        """,
        name=f"{name}.yaml",
    )


def split_file(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header without its metadata, and its data bytes."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__")
    return header, data[8 + size :]


def build(recipe: Path) -> None:
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("writer", ["own", "hub"])
def test_a_sharded_input_merges_to_the_same_tensors(tmp_path, models, sharded, writer):
    (tmp_path / "base.safetensors").symlink_to(models["base"])
    work = tmp_path / "work"
    work.mkdir()
    build(merge_recipe(work, models["finetune"], "whole"))
    build(merge_recipe(work, sharded[writer], "sharded"))
    # Identical tensor entries and data bytes; only the provenance (the inputs'
    # names and hashes) in the header's metadata differs.
    whole_header, whole_data = split_file(work / "whole.safetensors")
    sharded_header, sharded_data = split_file(work / "sharded.safetensors")
    assert sharded_header == whole_header
    assert sharded_data == whole_data
    reader = ShardedSafetensorsReader(sharded[writer])
    assert reader.keys() != [] and set(reader.keys()) == set(load_file(models["finetune"]))


def test_inspect_shows_the_family_and_a_hash_of_every_file(sharded, models):
    result = run_in_process("inspect", "--json", str(sharded["hub"]))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    whole = json.loads(run_in_process("inspect", "--json", str(models["finetune"])).stdout)
    assert report["format"] == "sharded-safetensors"
    assert (whole["family"], whole["variant"]) == ("sd1", "normal")
    assert (report["family"], report["variant"]) == (whole["family"], whole["variant"])
    assert (report["keys"], report["parameters"]) == (whole["keys"], whole["parameters"])
    assert report["legacy_hash"] is None
    index = sharded["hub"]
    files = sorted([index, *index.parent.glob("model-*.safetensors")], key=lambda p: p.name)
    listing = "".join(
        f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.name}\n" for file in files
    )
    assert report["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert report["sha256"] == ShardedSafetensorsReader(index).fingerprint().sha256
    assert FileStat.of(index).size == sum(file.stat().st_size for file in files)


def test_lock_and_status_follow_every_shard(tmp_path, models):
    (tmp_path / "base.safetensors").symlink_to(models["base"])
    tensors = load_file(models["finetune"])
    index = write_shards(tensors, tmp_path / "shards")
    work = tmp_path / "work"
    work.mkdir()
    recipe = merge_recipe(work, index, "out")
    build(recipe)
    lock = lock_path(recipe).read_text()
    first = ShardedSafetensorsReader(index).fingerprint()
    status = run_in_process("status", str(recipe))
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    # Rewrite one shard (not the index) with one tensor changed.
    shard = index.parent / "diffusion_pytorch_model-00002-of-00003.safetensors"
    stored = load_file(shard)
    changed = next(key for key in stored if stored[key].dtype.is_floating_point)
    stored[changed] = stored[changed] + 1
    save_file(stored, shard, metadata={"format": "pt"})
    second = ShardedSafetensorsReader(index).fingerprint()
    assert second.sha256 != first.sha256
    assert {k for k in first.tensors if first.tensors[k] != second.tensors[k]} == {changed}
    status = run_in_process("status", str(recipe))
    assert "up to date" not in status.stdout, status.stdout
    build(recipe)
    assert run_in_process("status", str(recipe)).stdout.count("up to date") == 1
    merged = load_file(work / "out.safetensors")
    base = load_file(models["base"])
    expected = (0.7 * base[changed].float() + 0.3 * stored[changed].float()).to(
        merged[changed].dtype
    )
    assert torch.allclose(merged[changed].float(), expected.float(), atol=1e-2)
    assert lock_path(recipe).read_text() != lock
    assert second.sha256 in lock_path(recipe).read_text()


def test_a_sharded_unet_in_a_diffusers_folder_reads(tmp_path, models):
    folder = tmp_path / "pipeline"
    result = run_in_process(
        "build",
        str(
            write_recipe(
                tmp_path,
                f"""
                inputs:
                  A: {models["base"]}
                nodes:
                  copy: {{expression: A}}
                outputs:
                  copy: {{path: {folder}, format: diffusers}}
                """,
            )
        ),
    )
    assert result.returncode == 0, result.stderr
    reader = DiffusersReader(folder)
    expected = {key: reader.tensor(key).clone() for key in reader.infos()}
    expected_digests = reader.fingerprint().tensors
    unet = folder / "unet"
    weights = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    write_shards(weights, unet)
    found = DiffusersReader(folder)
    assert set(found.keys()) == set(expected)
    for key, value in expected.items():
        assert torch.equal(found.tensor(key), value), key
    assert found.fingerprint().tensors == expected_digests
    (unet / DIFFUSERS_INDEX).write_text(
        json.dumps({"weight_map": dict.fromkeys(weights, "../vae/x.safetensors")})
    )
    bad = run_in_process("inspect", str(folder))
    assert bad.returncode == 2 and DIFFUSERS_INDEX in bad.stderr, bad.stderr


# --- careless users ---------------------------------------------------------------


@pytest.fixture
def small_index(tmp_path) -> Path:
    """A tiny two-shard model to break in each test."""
    tensors = {f"model.diffusion_model.w{i}": torch.full((2,), float(i)) for i in range(4)}
    return write_shards(tensors, tmp_path / "model", count=2)


def _rewrite(index: Path, change) -> None:
    document = json.loads(index.read_text())
    change(document["weight_map"])
    index.write_text(json.dumps(document))


SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
SHARD2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


def _missing_shard(index: Path) -> str:
    (index.parent / SHARD2).unlink()
    return SHARD2


def _separator(index: Path) -> str:
    (index.parent / "sub").mkdir()
    (index.parent / SHARD2).rename(index.parent / "sub" / SHARD2)
    _rewrite(index, lambda m: m.update({k: f"sub/{SHARD2}" for k, v in m.items() if v == SHARD2}))
    return "path separator"


def _outside(index: Path) -> str:
    (index.parent / SHARD2).rename(index.parent.parent / SHARD2)
    _rewrite(index, lambda m: m.update({k: f"../{SHARD2}" for k, v in m.items() if v == SHARD2}))
    return "`..`"


def _absolute(index: Path) -> str:
    target = str(index.parent / SHARD2)
    _rewrite(index, lambda m: m.update({k: target for k, v in m.items() if v == SHARD2}))
    return "path separator"


def _lacking(index: Path) -> str:
    _rewrite(index, lambda m: m.update({"model.diffusion_model.w0": SHARD2}))
    return "lacks it"


def _in_two_shards(index: Path) -> str:
    shard = index.parent / SHARD2
    tensors = load_file(shard)
    tensors["model.diffusion_model.w0"] = torch.zeros(2)
    save_file(tensors, shard)
    return "two shards"


def _unlisted(index: Path) -> str:
    _rewrite(index, lambda m: m.pop("model.diffusion_model.w1"))
    return "does not list"


def _not_json(index: Path) -> str:
    index.write_text('{"weight_map": {')
    return "not valid JSON"


def _too_deep(index: Path) -> str:
    index.write_text('{"metadata": ' + "[" * 5000 + "]" * 5000 + ', "weight_map": {}}')
    return "nested more than"


def _no_weight_map(index: Path) -> str:
    index.write_text('{"metadata": {}}')
    return "weight_map"


def _fifo(index: Path) -> str:
    index.unlink()
    os.mkfifo(index)
    return "not a regular file"


def _fifo_shard(index: Path) -> str:
    (index.parent / SHARD2).unlink()
    os.mkfifo(index.parent / SHARD2)
    return "not a regular file"


def _bin_shards(index: Path) -> str:
    _rewrite(index, lambda m: m.update({k: "pytorch_model-00002-of-00002.bin" for k in m}))
    return "not a .safetensors file"


BROKEN = [
    _missing_shard,
    _separator,
    _outside,
    _absolute,
    _lacking,
    _in_two_shards,
    _unlisted,
    _not_json,
    _too_deep,
    _no_weight_map,
    _fifo,
    _fifo_shard,
    _bin_shards,
]


@pytest.mark.parametrize("breaking", BROKEN, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_index_is_refused_naming_the_file(tmp_path, small_index, breaking):
    said = breaking(small_index)
    result = run_in_process("inspect", str(small_index))
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr
    names = (small_index.name, SHARD2)
    assert any(name in result.stderr for name in names), result.stderr
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {small_index}
        nodes:
          copy: {{expression: A}}
        outputs:
          copy: {tmp_path / "out.safetensors"}
        """,
    )
    built = run_in_process("build", str(recipe))
    assert built.returncode == 2 and "input 'A'" in built.stderr and said in built.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("breaking", [_outside, _separator, _absolute])
def test_nothing_outside_the_index_folder_is_opened(small_index, breaking):
    breaking(small_index)
    opened: list[str] = []
    _watching.append(opened)
    try:
        with pytest.raises(Exception, match=r"path separator|`\.\.`"):
            open_model(small_index)
    finally:
        _watching.pop()
    shard_opens = [path for path in opened if path.endswith(".safetensors")]
    assert shard_opens == [], opened


def test_naming_one_shard_is_refused_with_the_index_as_hint(small_index):
    result = run_in_process("inspect", str(small_index.parent / SHARD1))
    assert result.returncode == 2
    assert "shard 1 of 2" in result.stderr and str(small_index) in result.stderr
    lone = small_index.parent.parent / "lone-00001-of-00003.safetensors"
    save_file({"model.diffusion_model.w0": torch.zeros(2)}, lone)
    result = run_in_process("inspect", str(lone))
    assert result.returncode == 2 and "`*.safetensors.index.json`" in result.stderr
    whole = small_index.parent / "x-00001-of-00001.safetensors"
    save_file({"model.diffusion_model.w0": torch.zeros(2)}, whole)
    assert open_model(whole).keys() == ["model.diffusion_model.w0"]


def test_an_output_may_not_overwrite_a_shard(tmp_path, small_index):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {small_index}
        nodes:
          copy: {{expression: A}}
        outputs:
          copy: {small_index.parent / SHARD2}
        """,
    )
    before = (small_index.parent / SHARD2).read_bytes()
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2 and "a shard of input 'A'" in result.stderr, result.stderr
    assert (small_index.parent / SHARD2).read_bytes() == before


def test_a_sharded_standalone_vae_reads_as_its_single_file(tmp_path, standalone_vae):
    """Under `first_stage_model.`, without the training loss's tensor."""
    index = write_shards(load_file(standalone_vae), tmp_path / "vae", count=2)
    whole, sharded = open_model(standalone_vae), open_model(index)
    assert sorted(sharded.keys()) == sorted(whole.keys())
    assert all(key.startswith("first_stage_model.") for key in sharded.infos())


def test_a_hugging_face_cache_snapshot_of_symlinks_reads(tmp_path, small_index):
    """In the hub's cache, the index and shards are links to `../../blobs/<hash>`."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in small_index.parent.iterdir():
        file.rename(blobs / file.name)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / file.name)
    index = snapshot / small_index.name
    reader = open_model(index)
    assert torch.equal(reader.tensor("model.diffusion_model.w3"), torch.full((2,), 3.0))
    result = run_in_process("inspect", str(index))
    assert result.returncode == 0 and "sharded-safetensors" in result.stdout, result.stderr
