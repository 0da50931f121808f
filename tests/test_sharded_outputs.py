"""Sharded safetensors outputs: `max_shard_size` writes numbered shards behind an
index, as Hugging Face's `save_torch_state_dict` does, for any family."""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_in_process, start_paused_build, write_recipe
from sdrecipe.io.diffusers_reader import DiffusersReader
from sdrecipe.io.readers import open_model
from sdrecipe.io.safetensors_reader import output_digest
from sdrecipe.io.shard_layout import parse_shard_size
from sdrecipe.io.sharded_reader import ShardedSafetensorsReader
from sdrecipe.io.sharded_writer import ShardedSafetensorsWriter
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.recipe.lock import read_lock
from sdrecipe.synthetic import ModelSpec, write_model

SHARD = 5_000_000  # "5MB": the sd1 model at shrink 8 (33.5 MB of tensors) takes 7 shards
INDEX = "merged.safetensors.index.json"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two sd1 models (widths / 8) and two SDXL ones (widths / 32)."""
    folder = tmp_path_factory.mktemp("inputs")
    specs = {
        "a": ModelSpec(family="sd1", shrink=8, seed=1),
        "b": ModelSpec(family="sd1", shrink=8, seed=2),
        "xl_a": ModelSpec(family="sdxl", shrink=32, seed=3),
        "xl_b": ModelSpec(family="sdxl", shrink=32, seed=4),
    }
    return {name: write_model(folder / f"{name}.safetensors", spec) for name, spec in specs.items()}


def merge_recipe(
    folder: Path,
    a: Path,
    b: Path,
    output: str = "out/merged.safetensors",
    options: str = f"max_shard_size: {SHARD}",
    name: str = "recipe.yaml",
    alpha: float = 0.3,
) -> Path:
    """A weighted sum of `a` and `b` written to `output` with `options` (YAML
    flow-mapping entries: the output is all on line 7)."""
    entries = ", ".join(entry for entry in (f"path: {output}", options) if entry)
    return write_recipe(
        folder,
        f"""
        inputs:
          A: {a}
          B: {b}
        nodes:
          merged: {{method: weighted_sum, models: [A, B], alpha: {alpha}}}
        outputs:
          merged: {{{entries}}}
        """,
        name=name,
    )


def build(recipe: Path, *args: str) -> str:
    result = run_in_process("build", *args, str(recipe))
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_header(path: Path) -> dict:
    """A safetensors file's header, metadata included."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size))


def storage_order(path: Path) -> list[tuple[str, int]]:
    """Each tensor of a safetensors file and its size in bytes, in storage order."""
    header = read_header(path)
    header.pop("__metadata__", None)
    spans = sorted((entry["data_offsets"], key) for key, entry in header.items())
    return [(key, end - start) for (start, end), key in spans]


def greedy_split(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """The split as huggingface_hub documents it, written out independently: in
    order, a shard closes when the next tensor would take it past `limit`; a
    tensor larger than `limit` is a shard of its own, listed as it is met."""
    shards, current, filled = [], [], 0
    for key, size in sizes:
        if size > limit:
            shards.append([key])
        elif current and filled + size > limit:
            shards.append(current)
            current, filled = [key], size
        else:
            current.append(key)
            filled += size
    return [*shards, current] if current else shards


def shards_of(index: Path) -> dict[str, list[str]]:
    """Each shard file an index names, and its keys."""
    found: dict[str, list[str]] = {}
    for key, name in json.loads(index.read_text())["weight_map"].items():
        found.setdefault(name, []).append(key)
    return found


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> dict[str, Path]:
    """The same merge written whole (`plain`) and in 5 MB shards (`sharded`)."""
    root = tmp_path_factory.mktemp("built")
    plain = merge_recipe(root, inputs["a"], inputs["b"], "plain/merged.safetensors", "", "p.yaml")
    sharded = merge_recipe(root, inputs["a"], inputs["b"], "sharded/merged.safetensors")
    build(plain)
    build(sharded)
    return {
        "plain": root / "plain" / "merged.safetensors",
        "index": root / "sharded" / INDEX,
        "recipe": sharded,
    }


# --- max_shard_size values --------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "size"),
    [
        (1234, 1234),
        ("5GB", 5 * 10**9),
        ("10GB", 10 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("100KiB", 100 * 1024),
        ("1.5GB", 1_500_000_000),
        ("5 MB", 5_000_000),
        ("1TB", 10**12),
        ("64B", 64),
        ("4096", 4096),
    ],
)
def test_sizes_count_as_hugging_face_counts_them(given, size):
    assert parse_shard_size(given) == size


# --- the split -----------------------------------------------------------------------


def test_shards_are_filled_greedily_in_storage_order(built):
    index = built["index"]
    document = json.loads(index.read_text())
    sizes = storage_order(built["plain"])
    expected = greedy_split(sizes, SHARD)
    assert len(expected) == 7
    count = len(expected)
    names = [f"merged-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]
    assert {name: sorted(keys) for name, keys in shards_of(index).items()} == {
        name: sorted(keys) for name, keys in zip(names, expected, strict=True)
    }
    assert files_in(index.parent) == sorted([*names, INDEX])
    assert document["metadata"] == {"total_size": sum(size for _, size in sizes)}
    size_of = dict(sizes)
    for name, keys in zip(names, expected, strict=True):
        # Each shard holds its keys in the same order, and stays under the limit
        # unless it is one tensor larger than the limit.
        assert [key for key, _ in storage_order(index.parent / name)] == keys
        assert sum(size_of[key] for key in keys) <= SHARD or len(keys) == 1


def test_the_split_is_huggingface_hubs(built):
    hub = pytest.importorskip("huggingface_hub")
    plain = load_file(built["plain"])
    ordered = {key: plain[key] for key, _ in storage_order(built["plain"])}
    split = hub.split_torch_state_dict_into_shards(
        ordered, filename_pattern="merged{suffix}.safetensors", max_shard_size="5MB"
    )
    assert split.is_sharded
    assert split.tensor_to_filename == json.loads(built["index"].read_text())["weight_map"]
    assert (
        split.metadata["total_size"]
        == json.loads(built["index"].read_text())["metadata"]["total_size"]
    )


def test_a_tensor_larger_than_the_limit_is_a_shard_of_its_own(tmp_path):
    tensors = {
        "small.a": TensorInfo(torch.float16, (10,)),
        "big": TensorInfo(torch.float16, (100,)),
        "small.b": TensorInfo(torch.float16, (10,)),
        "small.c": TensorInfo(torch.float16, (30,)),
    }
    writer = ShardedSafetensorsWriter(tmp_path / "m.safetensors", tensors, {}, 64)
    try:
        assert [list(shard.slots) for shard in writer.shards] == [
            ["big"],
            ["small.a", "small.b"],
            ["small.c"],
        ]
    finally:
        writer.abort()
    assert files_in(tmp_path) == []


# --- the bytes ------------------------------------------------------------------------


def test_the_shards_hold_the_unsharded_outputs_bytes(built):
    index = built["index"]
    plain = read_header(built["plain"])
    metadata = plain.pop("__metadata__")
    data = built["plain"].read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    seen = set()
    for name, keys in shards_of(index).items():
        shard = index.parent / name
        header = read_header(shard)
        shard_metadata = header.pop("__metadata__")
        # The output's metadata in every shard; only the recipe text differs
        # from the unsharded output's (its max_shard_size line).
        assert shard_metadata.keys() == metadata.keys()
        different = {k for k in metadata if metadata[k] != shard_metadata[k]}
        assert different <= {"sdrecipe.recipe"}
        shard_data = shard.read_bytes()
        shard_start = 8 + struct.unpack("<Q", shard_data[:8])[0]
        for key in keys:
            entry, expected = header[key], plain[key]
            assert (entry["dtype"], entry["shape"]) == (expected["dtype"], expected["shape"])
            begin, end = (shard_start + offset for offset in entry["data_offsets"])
            plain_begin, plain_end = (start + offset for offset in expected["data_offsets"])
            assert shard_data[begin:end] == data[plain_begin:plain_end], key
            seen.add(key)
    assert seen == set(plain)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_sharded_output_reads_back_through_sdrecipe_and_safetensors(
    tmp_path, inputs, built, family
):
    if family == "sd1":  # the module's merge of the sd1 models, whole and in 5 MB shards
        plain, index = built["plain"], built["index"]
    else:
        a, b = inputs["xl_a"], inputs["xl_b"]
        build(merge_recipe(tmp_path, a, b, "plain/merged.safetensors", "", "plain.yaml"))
        build(merge_recipe(tmp_path, a, b, options="max_shard_size: 1000000"))
        plain, index = tmp_path / "plain" / "merged.safetensors", tmp_path / "out" / INDEX
    expected = load_file(plain)
    assert len(shards_of(index)) > 2
    # sdrecipe's own reader, as any input is opened.
    reader = open_model(index)
    assert isinstance(reader, ShardedSafetensorsReader)
    assert set(reader.keys()) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(reader.tensor(key), tensor), key
    # safetensors' reference reader, shard by shard.
    for name, keys in shards_of(index).items():
        with safe_open(index.parent / name, "pt") as shard:
            assert sorted(shard.keys()) == sorted(keys)
            assert shard.metadata()["sdrecipe.node"] == "merged"
            for key in keys:
                assert torch.equal(shard.get_tensor(key), expected[key]), key
    # And a recipe whose input is the sharded output writes the same tensors back.
    again = write_recipe(
        tmp_path,
        f"""
        inputs: {{M: {index}}}
        nodes: {{copy: {{expression: M}}}}
        outputs: {{copy: copy.safetensors}}
        """,
        name="again.yaml",
    )
    build(again)
    copied = load_file(tmp_path / "copy.safetensors")
    assert copied.keys() == expected.keys()
    assert all(torch.equal(copied[key], expected[key]) for key in expected)


def test_a_recipe_that_reads_a_sharded_output_is_built_after_it(tmp_path, inputs):
    first = merge_recipe(tmp_path, inputs["a"], inputs["b"], name="first.yaml")
    second = write_recipe(
        tmp_path,
        f"""
        inputs: {{M: out/{INDEX}, A: {inputs["a"]}}}
        nodes: {{back: {{method: weighted_sum, models: [M, A], alpha: 0.5}}}}
        outputs: {{back: back.safetensors}}
        """,
        name="second.yaml",
    )
    # Given in the wrong order: the index is known as the first recipe's output.
    result = run_in_process("build", str(second), str(first))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back.safetensors").is_file()
    assert (tmp_path / "out" / INDEX).is_file()


def test_one_shard_is_one_plain_file_without_index(tmp_path, inputs, built):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"], options="max_shard_size: 1GB")
    out = build(recipe)
    assert files_in(tmp_path / "out") == ["merged.safetensors"]
    assert f"built merged -> {tmp_path / 'out' / 'merged.safetensors'} (" in out
    plain = read_header(built["plain"])
    written = read_header(tmp_path / "out" / "merged.safetensors")
    plain.pop("__metadata__"), written.pop("__metadata__")
    assert written == plain
    assert load_file(tmp_path / "out" / "merged.safetensors").keys() == plain.keys()
    lock = read_lock(recipe)
    assert lock is not None and lock.outputs["merged"].path == "out/merged.safetensors"


def test_each_form_replaces_the_other_and_shards_the_index_does_not_name_stay(tmp_path, inputs):
    out = tmp_path / "out"
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"], options="max_shard_size: 1GB")
    build(recipe)
    assert files_in(out) == ["merged.safetensors"]
    # Sharded now: the plain file of the previous build goes, the index is the model.
    merge_recipe(tmp_path, inputs["a"], inputs["b"], options="max_shard_size: 20MB")
    build(recipe)
    two = ["merged-00001-of-00002.safetensors", "merged-00002-of-00002.safetensors"]
    assert files_in(out) == sorted([*two, INDEX])
    # Another count: the earlier shards are not in the new index, and are left alone.
    merge_recipe(tmp_path, inputs["a"], inputs["b"], options=f"max_shard_size: {SHARD}")
    build(recipe)
    seven = sorted(shards_of(out / INDEX))
    assert len(seven) == 7 and not set(seven) & set(two)
    assert files_in(out) == sorted([*two, *seven, INDEX])
    assert isinstance(open_model(out / INDEX), ShardedSafetensorsReader)
    # One shard again: the plain file replaces the index.
    merge_recipe(tmp_path, inputs["a"], inputs["b"], options="max_shard_size: 1GB")
    build(recipe)
    assert files_in(out) == sorted(["merged.safetensors", *two, *seven])


# --- invalid settings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("max_shard_size: 5XB", "max_shard_size: must be a number of bytes"),
        ("max_shard_size: 0", "must be at least 1 byte"),
        ("max_shard_size: -5", "must be at least 1 byte"),
        ("max_shard_size: 0.4B", "must be at least 1 byte"),
        ("max_shard_size: 5gb", "capital B, e.g. 5GB"),
        ("max_shard_size: 2gib", "capital B, e.g. 2GiB"),
        ("max_shard_size: 1.5", "must be a number of bytes"),
        ("max_shard_size: true", "must be a number of bytes"),
        ("max_shard_size: GB", "must be a number of bytes"),
        ("max_shard_size: ''", "must be a number of bytes"),
        ("max_shard_size: [5GB]", "must be a number of bytes"),
    ],
)
def test_an_invalid_max_shard_size_is_refused_at_its_line(tmp_path, inputs, options, message):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"], options=options)
    result = run_in_process("validate", str(recipe))
    assert result.returncode == 2
    assert f"{recipe}:7: outputs.merged.max_shard_size" in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_max_shard_size_is_refused_for_a_lora_and_a_path_that_is_not_safetensors(tmp_path, inputs):
    lora = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {inputs["a"]}, B: {inputs["b"]}}}
        nodes: {{delta: B - A}}
        outputs:
          delta: {{path: delta.safetensors, format: lora, max_shard_size: 5MB}}
        """,
        name="lora.yaml",
    )
    result = run_in_process("build", str(lora))
    assert result.returncode == 2
    assert f"{lora}:4:" in result.stderr and "`max_shard_size` does not apply to a LoRA" in (
        result.stderr
    )
    other = merge_recipe(tmp_path, inputs["a"], inputs["b"], "out/merged.st", name="st.yaml")
    result = run_in_process("build", str(other))
    assert result.returncode == 2
    assert f"{other}:7:" in result.stderr and "must end in .safetensors" in result.stderr
    assert not (tmp_path / "delta.safetensors").exists() and not (tmp_path / "out").exists()


# --- the guards ---------------------------------------------------------------------


def test_an_output_whose_index_or_shards_would_be_an_input_is_refused(tmp_path, inputs, built):
    out = tmp_path / "out"
    out.mkdir()
    # A sharded input in the output's folder, under the output's own index name ...
    for file in [built["index"], *(built["index"].parent / n for n in shards_of(built["index"]))]:
        os.link(file, out / file.name)
    result = run_in_process(
        "build", str(merge_recipe(tmp_path, out / INDEX, inputs["b"], name="index.yaml"))
    )
    assert result.returncode == 2
    assert f"has the shard index {INDEX}, which is input 'A'" in result.stderr
    # ... or under another index name, its shards named as the output's would be.
    os.rename(out / INDEX, out / "other.safetensors.index.json")
    recipe = merge_recipe(
        tmp_path, out / "other.safetensors.index.json", inputs["b"], name="shards.yaml"
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert "merged-00001-of-00007.safetensors as a shard, which is a shard of input 'A'" in (
        result.stderr
    )
    # Unsharded, the same output may lie beside that input: it writes one file.
    build(merge_recipe(tmp_path, out / "other.safetensors.index.json", inputs["b"], options=""))


def test_two_outputs_whose_files_would_meet_are_refused(tmp_path, inputs):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {inputs["a"]}, B: {inputs["b"]}}}
        nodes: {{one: "weighted_sum(A, B, alpha=0.3)", two: "weighted_sum(A, B, alpha=0.6)"}}
        outputs:
          one: {{path: out/m.safetensors, max_shard_size: 5MB}}
          two: out/m-00002-of-00003.safetensors
        """,
    )
    for selected in ("one", "two"):
        result = run_in_process("build", str(recipe), selected)
        assert result.returncode == 2, selected
        assert "outputs 'one' and 'two'" in result.stderr or "outputs 'two' and 'one'" in (
            result.stderr
        )
    # Shard-like names of two unsharded outputs do not meet.
    write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {inputs["a"]}, B: {inputs["b"]}}}
        nodes: {{one: "weighted_sum(A, B, alpha=0.3)", two: "weighted_sum(A, B, alpha=0.6)"}}
        outputs:
          one: out/m-00001-of-00002.safetensors
          two: out/m-00002-of-00002.safetensors
        """,
    )
    assert run_in_process("validate", str(recipe)).returncode == 0


# --- atomicity ------------------------------------------------------------------------


def temporaries(folder: Path) -> list[str]:
    return [name for name in files_in(folder) if name.endswith(".tmp")]


def test_an_aborted_writer_leaves_nothing(tmp_path):
    tensors = {f"t{n}": TensorInfo(torch.float32, (100,)) for n in range(10)}
    for stage in ("written", "finished"):
        writer = ShardedSafetensorsWriter(tmp_path / "m.safetensors", tensors, {"a": "b"}, 1000)
        assert len(writer.shards) == 5
        for key in tensors:
            writer.write_tensor(key, torch.ones(100))
        if stage == "finished":
            writer.finish()
            assert len(temporaries(tmp_path)) == 6  # five shards and the index
        writer.abort()
        assert files_in(tmp_path) == []


def test_a_failed_build_leaves_the_previous_shards_as_they_were(tmp_path, inputs):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"])
    build(recipe)
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    # float16 cannot hold this difference: the build fails while writing.
    write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {inputs["a"]}, B: {inputs["b"]}}}
        nodes: {{merged: "A + 1e9 * (B - A)"}}
        outputs:
          merged: {{path: out/merged.safetensors, dtype: float16, max_shard_size: 1MB}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 1
    assert "infinite or NaN" in result.stderr
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before


def test_an_interrupted_build_leaves_no_file(tmp_path, inputs):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"])
    signals = tmp_path / "signals"
    process = start_paused_build("key", 300, signals, "build", "-j", "1", str(recipe))
    assert len(temporaries(tmp_path / "out")) == 7
    process.send_signal(signal.SIGTERM)
    (signals / "resume").touch()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert files_in(tmp_path / "out") == []


def test_a_stop_while_publishing_completes_every_shard_the_index_and_the_lock(tmp_path, inputs):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"])
    signals = tmp_path / "signals"
    # Paused between renaming the first shard into place and the second.
    process = start_paused_build("publish", 2, signals, "build", "--no-cache", str(recipe))
    assert files_in(tmp_path / "out") == sorted(
        ["merged-00001-of-00007.safetensors", *temporaries(tmp_path / "out")]
    )
    process.send_signal(signal.SIGTERM)
    (signals / "resume").touch()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert temporaries(tmp_path / "out") == []
    assert len(shards_of(tmp_path / "out" / INDEX)) == 7
    assert "up to date merged" in build(recipe)


# --- up to date, the lock and verify -------------------------------------------------


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        name: ((s := (folder / name).stat()).st_ino, s.st_mtime_ns) for name in files_in(folder)
    }


def test_a_second_build_does_no_work_and_the_lock_names_the_index(tmp_path, inputs):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"])
    first = build(recipe)
    assert f"built merged -> {tmp_path / 'out' / INDEX}" in first
    before = stats(tmp_path / "out")
    again = run_in_process("build", "--json", str(recipe))
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert [(o["name"], o["result"]) for o in report["outputs"]] == [("merged", "up to date")]
    assert stats(tmp_path / "out") == before
    lock = read_lock(recipe)
    assert lock is not None
    entry = lock.outputs["merged"]
    assert entry.path == f"out/{INDEX}"
    files = [tmp_path / "out" / name for name in files_in(tmp_path / "out")]
    assert entry.size == sum(file.stat().st_size for file in files)
    # The digest the build took from its tensors is the one read back from disk.
    assert entry.digest == output_digest(tmp_path / "out" / INDEX)


def test_verify_passes_and_a_modified_shard_is_rebuilt(tmp_path, inputs):
    recipe = merge_recipe(tmp_path, inputs["a"], inputs["b"])
    build(recipe)
    result = run_in_process("verify", "--json", str(recipe))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["reproducible"] and report["outputs"][0]["name"] == "merged"
    # Change one byte of tensor data in the fourth shard.
    index = tmp_path / "out" / INDEX
    shard = index.parent / sorted(shards_of(index))[3]
    original = shard.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0xFF
    shard.write_bytes(bytes(changed))
    later = shard.stat().st_mtime_ns + 1_000_000_000
    os.utime(shard, ns=(later, later))
    lock = read_lock(recipe)
    assert lock is not None and output_digest(index) != lock.outputs["merged"].digest
    status = run_in_process("status", str(recipe))
    assert "up to date" not in status.stdout, status.stdout
    assert f"built merged -> {index}" in build(recipe)
    assert shard.read_bytes() == original
    assert "up to date merged" in build(recipe)
    assert run_in_process("verify", str(recipe)).returncode == 0


# --- diffusers folders ------------------------------------------------------------------


def test_a_diffusers_output_shards_each_weights_file(tmp_path, inputs):
    options = "format: diffusers"
    build(merge_recipe(tmp_path, inputs["a"], inputs["b"], "plain", options, "plain.yaml"))
    recipe = merge_recipe(
        tmp_path, inputs["a"], inputs["b"], "sharded", f"{options}, max_shard_size: 5MB"
    )
    build(recipe)
    unet = tmp_path / "sharded" / "unet"
    assert "diffusion_pytorch_model.safetensors" not in files_in(unet)
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    assert len(shards_of(index)) > 2
    for name in shards_of(index):
        with safe_open(unet / name, "pt") as shard:
            assert "sdrecipe.recipe" in shard.metadata()
    # The VAE and the text encoder fit in 5 MB each: one plain file, no index.
    assert files_in(tmp_path / "sharded" / "vae") == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    # The folder reads back as the unsharded folder does.
    plain, sharded = DiffusersReader(tmp_path / "plain"), DiffusersReader(tmp_path / "sharded")
    assert set(sharded.keys()) == set(plain.keys())
    for key in plain.keys():  # noqa: SIM118 (a reader, not a dict)
        assert torch.equal(sharded.tensor(key), plain.tensor(key)), key
    # Up to date, then rebuilt in place once the recipe changes (the folder,
    # whose UNet is sharded, is known as sdrecipe's own).
    assert "up to date merged" in build(recipe)
    write_recipe(tmp_path, recipe.read_text().replace("alpha: 0.3", "alpha: 0.4"))
    assert "built merged" in build(recipe)
    assert run_in_process("verify", str(recipe)).returncode == 0
