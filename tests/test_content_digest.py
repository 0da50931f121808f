"""Outputs are known by content digest: the build takes it from the tensor digests
it already has, and it equals an independent computation from the file's bytes."""

from __future__ import annotations

import json
import shutil
import struct

import blake3
import pytest
import yaml

from conftest import invoke, run_in_process, write_recipe
from sdrecipe.io.safetensors_reader import output_digest

# safetensors dtype codes as torch names them, written out here, not imported.
DTYPE_NAMES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "I64": "int64"}


def independent_digest(data: bytes) -> str:
    """The content digest of a gap-free safetensors file, from its bytes alone."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    start = 8 + size
    outer = blake3.blake3(b"sdrecipe content digest: safetensors\0" + data[:start])
    for entry in sorted(header.values(), key=lambda entry: entry["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        prefix = f"{DTYPE_NAMES[entry['dtype']]}{entry['shape']}\0".encode()
        outer.update(blake3.blake3(prefix + data[start + begin : start + end]).digest())
    return outer.hexdigest()


@pytest.fixture
def recipe(tmp_path, models):
    """An add-difference (with CLIP's position ids passed through, uncomputed)
    and a weighted sum written in float32."""
    return write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {models["inpainting"]}
          B: {models["finetune"]}
          C: {models["base"]}
        nodes:
          inpaint: A + (B - C)
          soft: "weighted_sum(C, B, alpha=0.3)"
        outputs:
          inpaint: out/inpaint.safetensors
          soft: {{path: out/soft.safetensors, dtype: fp32}}
        """,
    )


def locked_outputs(recipe):
    return yaml.safe_load(recipe.with_suffix(".lock").read_text())["outputs"]


def test_the_locked_digest_is_the_files_content_digest(recipe):
    result = run_in_process("build", "--json", str(recipe))
    assert result.returncode == 0, result.stderr
    summary = {output["name"]: output for output in json.loads(result.stdout)["outputs"]}
    for name, entry in locked_outputs(recipe).items():
        path = recipe.parent / entry["path"]
        expected = independent_digest(path.read_bytes())
        assert entry["digest"] == expected, name
        assert summary[name]["digest"] == expected
        assert output_digest(path) == expected  # read back from the file


def test_a_changed_byte_changes_the_digest(recipe, tmp_path):
    assert run_in_process("build", str(recipe)).returncode == 0
    path = recipe.parent / locked_outputs(recipe)["inpaint"]["path"]
    original = output_digest(path)
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    for offset in (len(data) - 1, 8 + size, 9):  # last tensor byte, first one, header
        changed = tmp_path / f"changed-{offset}.safetensors"
        flipped = bytearray(data)
        flipped[offset] ^= 1
        changed.write_bytes(bytes(flipped))
        assert output_digest(changed) != original, offset
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(bytes(data) + b"\0")  # not gap-free: digested as bytes
    assert output_digest(trailing) not in (original, independent_digest(bytes(data)))
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(path, copy)
    assert output_digest(copy) == original


def test_a_lock_that_records_sha256_is_rebuilt_once(recipe):
    assert run_in_process("build", str(recipe)).returncode == 0
    lock = recipe.with_suffix(".lock")
    data = yaml.safe_load(lock.read_text())
    data["format"] = 1
    for entry in data["outputs"].values():
        entry["sha256"] = entry.pop("digest")
    for entry in (*data["nodes"].values(), *data["outputs"].values()):
        entry["key"] = entry.pop("identity")  # as format 1 called it
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    refused = run_in_process("verify", str(recipe))
    assert refused.returncode == 2
    assert "older sdrecipe" in refused.stderr and "build" in refused.stderr
    status = run_in_process("status", "--json", str(recipe))
    assert status.returncode == 0, status.stderr
    states = {line["output"]: line["status"] for line in json.loads(status.stdout)["outputs"]}
    assert set(states) == {"inpaint", "soft"} and "up to date" not in states.values()
    assert run_in_process("build", str(recipe)).returncode == 0
    assert yaml.safe_load(lock.read_text())["format"] == 3
    assert run_in_process("verify", str(recipe)).returncode == 0


def test_a_build_does_not_read_its_outputs_back(recipe, monkeypatch):
    def read_back(path):
        raise AssertionError(f"{path} was read back to be digested")

    monkeypatch.setattr("sdrecipe.io.safetensors_reader.output_digest", read_back)
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.output
    for entry in locked_outputs(recipe).values():
        assert entry["digest"] == independent_digest((recipe.parent / entry["path"]).read_bytes())
