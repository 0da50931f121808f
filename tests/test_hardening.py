"""sdrecipe never destroys what it did not write, and bad input gets a clear error.

Each test names the item of the hardening issue it covers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from conftest import invoke, run_cli, write_recipe
from sdrecipe.cache.store import Cache, ObjectWriter
from sdrecipe.engine.builder import update_outputs
from sdrecipe.errors import BuildError
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.plan.prepare import prepare
from sdrecipe.plan.provenance import LINEAGE_TRUNCATED, MAX_LINEAGE_BYTES


def three_inputs(models, nodes="out: A + (B - C)", outputs="out: out/x.safetensors"):
    """A recipe over the inpainting, fine-tune and base models; `nodes` and
    `outputs` are block-style YAML lines, separated by `;`."""
    lines = [
        "inputs:",
        f"  A: {models['inpainting']}",
        f"  B: {models['finetune']}",
        f"  C: {models['base']}",
        "nodes:",
        *(f"  {line.strip()}" for line in nodes.split(";")),
        "outputs:",
        *(f"  {line.strip()}" for line in outputs.split(";")),
    ]
    return "\n".join(lines) + "\n"


def snapshot(folder):
    """Every file under `folder` with its bytes (hidden temporaries included)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def cache_snapshot(folder):
    """The cache's files, with its SQLite index as the rows it holds: the index's
    bytes and its -wal/-shm files change whenever SQLite checkpoints, which
    happens when a connection closes (here, when the garbage collector says)."""
    files = snapshot(folder)
    index = folder / "index.sqlite"
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        files.pop(name, None)
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        files["index rows"] = list(db.iterdump())
    return files


def dead_pid():
    """The id of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def fine_tune_with_metadata(models, path, metadata):
    """The fine-tune fixture saved at `path` with JSON `metadata` fields."""
    fields = {key: json.dumps(value) for key, value in metadata.items()}
    save_file(load_torch(models["finetune"]), path, metadata=fields)
    return path


def blend_recipe(tmp_path, model, models):
    """A recipe blending `model` with the base fixture into o.safetensors."""
    return write_recipe(
        tmp_path,
        f"inputs: {{A: {model}, B: {models['base']}}}\nnodes:\n  out: weighted_sum(A, B)\n"
        "outputs: {out: o.safetensors}\n",
    )


# --- 1. an output may not replace an input, the recipe, its lock, another output or the cache


@pytest.mark.parametrize(
    "target",
    [
        "input",
        "input spelled differently",
        "symlink to input",
        "hard link to input",
        "recipe",
        "lock",
        "baked vae",
        "cache index",
        "inside the cache",
    ],
)
def test_an_output_that_would_replace_a_protected_file_is_refused(
    tmp_path, models, isolated_cache, target
):
    work = tmp_path / "work"
    (work / "m").mkdir(parents=True)
    model = work / "m" / "x.safetensors"
    shutil.copyfile(models["finetune"], model)
    vae = work / "m" / "vae.safetensors"
    shutil.copyfile(models["other"], vae)
    invoke("build", "--json", str(write_recipe(work, three_inputs(models), "seed.yaml")))
    lock = work / "recipe.lock"
    lock.write_text("format: 1\n")
    paths = {
        "input": "m/x.safetensors",
        "input spelled differently": "m/../m/./x.safetensors",
        "symlink to input": "link.safetensors",
        "hard link to input": "hard.safetensors",
        "recipe": "recipe.yaml",
        "lock": "recipe.lock",
        "baked vae": "m/vae.safetensors",
        "cache index": str(isolated_cache / "index.sqlite"),
        "inside the cache": str(isolated_cache / "packs" / "new.safetensors"),
    }
    (work / "link.safetensors").symlink_to(model)
    os.link(model, work / "hard.safetensors")
    recipe = write_recipe(
        work,
        f"""
        inputs: {{A: m/x.safetensors, B: {models["other"]}, C: {models["base"]}}}
        nodes: {{out: A + (B - C)}}
        outputs: {{out: {{path: "{paths[target]}", vae: m/vae.safetensors}}}}
        """,
    )
    before, cache_before = snapshot(work), cache_snapshot(isolated_cache)
    for command in ("validate", "build"):
        result = invoke(command, str(recipe))
        assert result.exit_code == 2, result.stderr
        assert "never replaces what it did not write" in result.stderr
        assert "recipe.yaml:3" in result.stderr
    assert snapshot(work) == before
    assert cache_snapshot(isolated_cache) == cache_before


def test_two_outputs_with_one_path_are_refused(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        three_inputs(
            models, "a: A + (B - C); b: B", "a: out/x.safetensors; b: out/../out/x.safetensors"
        ),
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "outputs 'a' and 'b' would write the same place" in result.stderr


# --- 2. and 3. targets that are not regular files, and folders sdrecipe did not write


def test_an_output_on_a_device_a_fifo_or_a_folder_is_refused(tmp_path, models):
    # Never the machine's own /dev/null: on code with this bug the test would replace it.
    targets = [tmp_path / "fifo", tmp_path / "folder"]
    os.mkfifo(targets[0])
    targets[1].mkdir()
    with contextlib.suppress(PermissionError):
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets.append(tmp_path / "null")
    for target in targets:
        recipe = write_recipe(tmp_path, three_inputs(models, outputs=f"out: {target}"))
        result = invoke("build", str(recipe))
        assert result.exit_code == 2
        assert "is not a regular file" in result.stderr
        assert not target.is_file()


def test_a_diffusers_output_never_replaces_a_folder_sdrecipe_did_not_write(tmp_path, models):
    notes = tmp_path / "precious" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    for path in ("precious", "."):
        recipe = write_recipe(
            tmp_path, three_inputs(models, outputs=f"out: {{path: {path}, format: diffusers}}")
        )
        result = invoke("build", str(recipe))
        assert result.exit_code == 2, result.stderr
    assert notes.read_text() == "mine"
    assert recipe.exists()
    assert (
        "did not write"
        in invoke(
            "build",
            str(
                write_recipe(
                    tmp_path,
                    three_inputs(models, outputs="out: {path: precious, format: diffusers}"),
                )
            ),
        ).stderr
    )


def test_a_diffusers_folder_that_sdrecipe_wrote_is_replaced(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        three_inputs(models, "out: A + 0.5 * (B - C)", "out: {path: folder, format: diffusers}"),
    )
    assert invoke("build", str(recipe)).exit_code == 0
    first = snapshot(tmp_path / "folder")
    recipe.write_text(recipe.read_text().replace("0.5", "0.7"))
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    assert snapshot(tmp_path / "folder") != first


# --- 4. a failed build publishes nothing


def test_a_failed_build_leaves_every_output_and_the_lock_as_they_were(tmp_path, small_models):
    recipe = write_recipe(
        tmp_path,
        three_inputs(
            small_models,
            "soft: weighted_sum(B, C, alpha=0.3); strong: A + 0.5 * (B - C)",
            "soft: out/soft.safetensors; strong: out/strong.safetensors",
        ),
    )
    assert invoke("build", str(recipe)).exit_code == 0
    lock = recipe.with_suffix(".lock").read_bytes()
    strong = (tmp_path / "out" / "strong.safetensors").read_bytes()
    (tmp_path / "out" / "soft.safetensors").unlink()  # would be restored from the cache
    recipe.write_text(recipe.read_text().replace("0.5 * (B - C)", "1e308 * (B - C)"))
    result = invoke("build", str(recipe))
    assert result.exit_code == 1
    assert not (tmp_path / "out" / "soft.safetensors").exists()
    assert (tmp_path / "out" / "strong.safetensors").read_bytes() == strong
    assert recipe.with_suffix(".lock").read_bytes() == lock
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["strong.safetensors"]


# --- 5. YAML that expands without bound, 7. nesting


def alias_bomb(levels=9, width=9):
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    return "\n".join("  " + line for line in lines)


def merge_bomb(levels=40):
    lines = ["b0: &b0 {k: 1}"]
    for level in range(1, levels + 1):
        lines.append(f"b{level}: &b{level} {{<<: [*b{level - 1}, *b{level - 1}]}}")
    return "\n".join("  " + line for line in lines)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (f"unused:\n{alias_bomb()}\n", "expands to more than 100,000 values"),
        # PyYAML 6.0.4 and later merge each key once, so the bomb no longer
        # expands and the recipe fails on its unknown field instead.
        (f"unused:\n{merge_bomb()}\n", ("more than 100,000", "unknown field 'unused'")),
        ("unused: " + "[" * 2000 + "]" * 2000 + "\n", "more than 64 levels deep"),
    ],
    ids=["aliases", "merge keys", "nesting"],
)
def test_hostile_yaml_is_refused_at_once(tmp_path, models, extra, message):
    recipe = write_recipe(tmp_path, three_inputs(models) + extra)
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    messages = message if isinstance(message, tuple) else (message,)
    assert any(text in result.stderr for text in messages), result.stderr


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("(" * 300 + "A" + ")" * 300, "more than 50 levels deep"),
        ("-" * 300 + "A", "more than 50 levels deep"),
        ("A" + " + B" * 5000, "more than 200 operations deep"),
        ("weighted_sum(" * 80 + "A, B" + ")" * 80, "more than 50 levels deep"),
    ],
    ids=["parentheses", "signs", "flat sum", "calls"],
)
def test_deeply_nested_expressions_are_refused_with_the_limit(
    tmp_path, models, expression, message
):
    recipe = write_recipe(tmp_path, three_inputs(models, f"out: {expression}"))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert message in result.stderr and "internal error" not in result.stderr


def write_with_header(path, header: bytes, data: bytes = b""):
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_a_deeply_nested_safetensors_header_is_refused(tmp_path, models):
    model = tmp_path / "deep.safetensors"
    write_with_header(model, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    for command in (
        ["inspect", str(model)],
        [
            "validate",
            str(
                write_recipe(
                    tmp_path,
                    (
                        f"inputs: {{A: {model}}}\nnodes: {{out: A}}\n"
                        "outputs: {out: o.safetensors}\n"
                    ),
                )
            ),
        ],
    ):
        result = invoke(*command)
        assert result.exit_code == 2, result.stderr
        assert "nested more than" in result.stderr


def test_deeply_nested_lineage_metadata_is_ignored_not_fatal(tmp_path, models):
    tensors = load_torch(models["finetune"])
    deep = "[" * 50_000 + "]" * 50_000
    model = tmp_path / "deep_meta.safetensors"
    save_file(tensors, model, metadata={"sd_merge_models": deep, "sdrecipe": deep})
    assert invoke("inspect", str(model)).exit_code == 0
    result = invoke("build", str(blend_recipe(tmp_path, model, models)))
    assert result.exit_code == 0, result.stderr


# --- 6. non-finite parameters and results


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_parameters_are_refused(tmp_path, models, value):
    recipe = write_recipe(
        tmp_path,
        three_inputs(models, f"out: {{method: weighted_sum, models: [A, B], alpha: {value}}}"),
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "must be a finite number" in result.stderr


@pytest.mark.parametrize(
    ("expression", "dtype", "message"),
    [
        ("A + 1e308 * (B - C)", "", "node 'out' gives infinite or NaN values"),
        ("A + 1e9 * (B - C)", "", "output 'out' gives infinite or NaN values"),
    ],
    ids=["in float32", "cast to float16"],
)
def test_a_result_that_is_not_finite_fails_the_build(tmp_path, models, expression, dtype, message):
    recipe = write_recipe(tmp_path, three_inputs(models, f"out: {expression}"))
    result = invoke("build", str(recipe))
    assert result.exit_code == 1
    assert message in result.stderr and "model." in result.stderr
    assert not (tmp_path / "out" / "x.safetensors").exists()
    assert not recipe.with_suffix(".lock").exists()


def test_yaml_1_2_floats_are_numbers(tmp_path, models, arrays):
    recipe = write_recipe(
        tmp_path,
        three_inputs(models, "out: {method: weighted_sum, models: [B, C], alpha: 5e-1}"),
    )
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    key = "model.diffusion_model.out.2.weight"
    expected = 0.5 * arrays["finetune"][key].astype(np.float32) + 0.5 * arrays["base"][key]
    built = load_file(tmp_path / "out" / "x.safetensors")[key]
    np.testing.assert_array_equal(built, expected.astype(np.float16))


# --- 8. lineage does not grow without bound


def test_inherited_lineage_is_capped_nearest_generations_first(tmp_path, models):
    parents = {
        f"{n:064x}": {"name": f"parent{n}", "legacy_hash": "0", "sd_merge_recipe": None}
        for n in (1, 2)
    }
    distant = {
        f"{n:064x}": {"name": "x" * 1000, "legacy_hash": "0", "sd_merge_recipe": None}
        for n in range(100, 3100)
    }
    lineage = {**distant, **parents}
    recipe_field = {"primary_model_hash": f"{1:064x}", "secondary_model_hash": f"{2:064x}"}
    model = fine_tune_with_metadata(
        models,
        tmp_path / "ancestral.safetensors",
        {"sd_merge_models": lineage, "sd_merge_recipe": recipe_field},
    )
    assert invoke("build", str(blend_recipe(tmp_path, model, models))).exit_code == 0
    metadata = SafetensorsReader(tmp_path / "o.safetensors").metadata
    assert len(metadata["sd_merge_models"]) < MAX_LINEAGE_BYTES + 10_000
    written = json.loads(metadata["sd_merge_models"])
    assert set(parents) <= set(written)
    assert LINEAGE_TRUNCATED in written and "dropped" in written[LINEAGE_TRUNCATED]["name"]
    assert len(written) < len(lineage)


# --- 9. terminal escapes from a file's metadata


def test_inspect_escapes_control_characters_from_the_file(tmp_path, models):
    hostile = "\x1b[2J\x1b]0;owned\x07\u202e"
    own = {"version": hostile, "node": hostile, "expression": hostile, "inputs": {}}
    model = fine_tune_with_metadata(
        models,
        tmp_path / "hostile.safetensors",
        {"sdrecipe": own, "sd_merge_models": {"0" * 64: {"name": hostile}}},
    )
    result = invoke("inspect", str(model))
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\u202e" not in result.stdout
    assert "\\x1b[2J" in result.stdout


# --- 10. inputs that are not files, or shrink while read


def test_a_fifo_input_is_refused_not_waited_on(tmp_path, models):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    recipe = write_recipe(
        tmp_path, f"inputs: {{A: {fifo}}}\nnodes: {{out: A}}\noutputs: {{out: o.safetensors}}\n"
    )
    for command in (["validate", str(recipe)], ["inspect", str(fifo)]):
        result = run_cli(*command)  # a subprocess: a hang ends in a timeout, not a stuck suite
        assert result.returncode == 2
        assert "not a regular file" in result.stderr


def test_an_input_truncated_before_it_is_read_fails_the_build(tmp_path, models):
    victim = tmp_path / "victim.safetensors"
    shutil.copyfile(models["finetune"], victim)
    recipe = write_recipe(
        tmp_path, three_inputs(models).replace(str(models["finetune"]), str(victim))
    )
    prepared = prepare(recipe)
    os.truncate(victim, 50_000)
    with pytest.raises(BuildError, match=r"shrank from .* to 50,000 bytes"):
        update_outputs(prepared, threads=1)
    assert not (tmp_path / "out" / "x.safetensors").exists()


SHRINK_WHILE_MAPPED = """
import os, sys
from pathlib import Path
from sdrecipe.io.mapped_files import install_sigbus_handler
from sdrecipe.io.safetensors_reader import SafetensorsReader
install_sigbus_handler()
reader = SafetensorsReader(Path(sys.argv[1]))
last = reader.keys()[-1]
tensor = reader.tensor(last)   # mapped while the file is whole
os.truncate(reader.path, 4096)
print(float(tensor.float().sum()))   # touches pages past the new end: SIGBUS
"""


def test_an_input_truncated_while_mapped_ends_with_a_message_not_a_crash(tmp_path, models):
    victim = tmp_path / "victim.safetensors"
    shutil.copyfile(models["finetune"], victim)
    result = subprocess.run(
        [sys.executable, "-c", SHRINK_WHILE_MAPPED, str(victim)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert str(victim) in result.stderr and "shrank" in result.stderr
    assert "Traceback" not in result.stderr and "Fatal" not in result.stderr


# --- 11. bad input or I/O that used to end in internal errors


def test_an_fp8_model_merges_by_upcasting(tmp_path, models):
    tensors = load_torch(models["inpainting"])
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in tensors.items()}
    model = tmp_path / "fp8.safetensors"
    save_file(fp8, model)
    recipe = write_recipe(
        tmp_path, three_inputs(models).replace(str(models["inpainting"]), str(model))
    )
    result = invoke("build", str(recipe))
    assert result.exit_code == 0, result.stderr
    key = "model.diffusion_model.out.2.weight"
    b, c = load_torch(models["finetune"])[key], load_torch(models["base"])[key]
    expected = (fp8[key].float() + (b.float() - c.float())).to(torch.float8_e4m3fn)
    built = load_torch(tmp_path / "out" / "x.safetensors")[key]
    assert built.dtype == torch.float8_e4m3fn
    assert torch.equal(built.view(torch.uint8), expected.view(torch.uint8))


def test_a_crafted_unet_key_beside_label_emb_is_not_an_internal_error(tmp_path, models):
    unet = "model.diffusion_model."
    tensors = {k: v for k, v in load_torch(models["finetune"]).items() if k.startswith(unet)}
    tensors["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    tensors["model.diffusion_model.input_blocks.x.weight"] = torch.zeros(2)
    model = tmp_path / "crafted.safetensors"
    save_file(tensors, model)
    result = invoke("inspect", "--json", str(model))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["family"].startswith("sdxl")  # label_emb decides


def test_an_empty_checkpoint_says_so(tmp_path, models):
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    result = invoke("inspect", str(empty))
    assert result.exit_code == 2
    assert "the checkpoint is empty" in result.stderr


@pytest.fixture
def immutable(tmp_path):
    """Make folders read-only even for root (chattr +i); undone after the test."""
    made = []

    def make(folder):
        if shutil.which("chattr") is None:
            pytest.skip("chattr is not available")
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("this file system does not support immutable folders")
        made.append(folder)

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path, models, immutable):
    recipe = write_recipe(tmp_path, three_inputs(models, outputs="out: out/x.safetensors"))
    assert invoke("build", str(recipe)).exit_code == 0
    (tmp_path / "out" / "x.safetensors").unlink()  # to be restored from the cache
    immutable(tmp_path / "out")
    result = invoke("build", str(recipe))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'out'}")
    assert "Operation not permitted" in result.stderr
    recipe.write_text(recipe.read_text().replace("out/x", "new/x"))
    immutable(tmp_path)
    result = invoke("build", str(recipe))
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path / 'new'}: Operation not permitted\n"


def test_an_unwritable_recipe_folder_is_a_clear_error(tmp_path, models, immutable):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = write_recipe(folder, three_inputs(models, outputs="out: ../out/x.safetensors"))
    immutable(folder)
    result = invoke("build", str(recipe))
    assert result.exit_code == 1
    assert "recipe.lock: the outputs were built, but the lock file cannot be written" in (
        result.stderr
    )


def test_a_cache_write_error_names_the_cache_folder(tmp_path):
    cache = Cache(tmp_path / "cache")
    shutil.rmtree(cache.objects)
    cache.objects.write_text("not a folder")
    with pytest.raises(BuildError) as caught:
        ObjectWriter(cache, TensorInfo(torch.float32, (4,)))
    assert str(caught.value).startswith(f"{cache.objects}: cannot create a new cache entry")


# --- 12. a damaged cache index


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cache_index_is_set_aside_and_rebuilt(
    tmp_path, small_models, isolated_cache, damage
):
    recipe = write_recipe(tmp_path, three_inputs(small_models, "out: A + 0.5 * (B - C)"))
    assert invoke("build", str(recipe)).exit_code == 0
    index = isolated_cache / "index.sqlite"
    with sqlite3.connect(index) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = index.read_bytes()
    index.write_bytes(b"\x00garbage" * 1000 if damage == "garbage" else data[: len(data) // 2])
    recipe.write_text(recipe.read_text().replace("0.5", "0.7"))
    result = invoke("build", "--json", str(recipe))
    assert result.exit_code == 0, result.stderr
    assert "damaged" in result.stderr
    built = (tmp_path / "out" / "x.safetensors").read_bytes()
    assert invoke("build", "--force", "--no-cache", str(recipe)).exit_code == 0
    assert built == (tmp_path / "out" / "x.safetensors").read_bytes()
    assert list(isolated_cache.glob("index.sqlite.damaged-*"))
    assert invoke("cache", "clear").exit_code == 0


# --- 13. leftovers


def test_every_build_removes_stale_temporaries_beside_its_outputs(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models))
    assert invoke("build", str(recipe)).exit_code == 0
    out = tmp_path / "out"
    pid = dead_pid()
    stale = [out / f".x.safetensors.sdrecipe-{pid}.tmp", out / f".other.sdrecipe-{pid}.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    verify_folder = out / f".verify-abc.sdrecipe-{pid}.tmp"
    (verify_folder / "0").mkdir(parents=True)
    live = out / f".x.safetensors.sdrecipe-{os.getpid()}.tmp"
    live.write_bytes(b"still being written")
    result = invoke("build", str(recipe))
    assert "up to date" in result.stdout
    assert not any(path.exists() for path in stale)
    assert not verify_folder.exists()
    assert live.exists()  # its writer still runs


def test_restoring_an_output_that_is_already_its_cache_link_leaves_no_temporary(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models))
    assert invoke("build", str(recipe)).exit_code == 0
    recipe.with_suffix(".lock").unlink()  # the output is no longer known to be current
    result = invoke("build", "--json", str(recipe))
    assert json.loads(result.stdout)["outputs"][0]["result"] == "restored from cache"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.safetensors"]


# --- smaller problems


def test_a_build_that_waits_for_the_cache_lock_says_for_whom(
    tmp_path, small_models, isolated_cache
):
    recipe = write_recipe(tmp_path, three_inputs(small_models))
    Cache(isolated_cache)
    with open(isolated_cache / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 (build other.yaml)")
        held.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "sdrecipe", "build", str(recipe)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = process.stderr.readline()  # waits for the state, not for a time
        assert "waiting for the cache lock" in line and "pid 4242 (build other.yaml)" in line
        assert process.poll() is None
        fcntl.flock(held, fcntl.LOCK_UN)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr


def test_json_mode_prints_an_error_object_on_failure(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models, "out: A + (B - D)"))
    result = invoke("build", "--json", str(recipe))
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and "unknown name 'D'" in error["error"]


def test_an_unknown_node_option_is_named(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models, "out: {expression: A, onlyy: [unet]}"))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "unknown option 'onlyy'" in result.stderr


def test_paths_are_printed_normalised(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models, outputs="out: sub/../out/x.safetensors"))
    result = invoke("build", str(recipe))
    assert result.exit_code == 0
    assert "/../" not in result.stdout and "out/x.safetensors" in result.stdout


def test_read_only_commands_create_no_cache(tmp_path, models, isolated_cache):
    recipe = write_recipe(tmp_path, three_inputs(models))
    for command in (
        ["inspect", str(models["base"])],
        ["plan", str(recipe)],
        ["validate", str(recipe)],
        ["cache", "info"],
        ["cache", "gc"],
    ):
        assert invoke(*command).exit_code == 0
    assert not isolated_cache.exists()
    assert not (tmp_path / "out").exists()


def test_cache_info_separates_own_bytes_from_bytes_shared_with_outputs(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models))
    assert invoke("build", str(recipe)).exit_code == 0
    info = json.loads(invoke("cache", "info", "--json").stdout)
    output_size = (tmp_path / "out" / "x.safetensors").stat().st_size
    assert info["shared_with_outputs"] == output_size
    assert info["size"] == 0  # one node: nothing but the output, which is linked
    (tmp_path / "out" / "x.safetensors").unlink()
    info = json.loads(invoke("cache", "info", "--json").stdout)
    assert (info["size"], info["shared_with_outputs"]) == (output_size, 0)


def test_an_output_named_like_a_pickle_is_refused(tmp_path, models):
    recipe = write_recipe(tmp_path, three_inputs(models, outputs="out: out/x.ckpt"))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "names a pickled checkpoint" in result.stderr


def test_a_selection_that_matches_no_key_is_warned_about(tmp_path, models):
    recipe = write_recipe(
        tmp_path, three_inputs(models, "out: {expression: A + (B - C), include_keys: [^nothing]}")
    )
    result = invoke("build", str(recipe))
    assert result.exit_code == 0
    assert "warning: node 'out': its selection (include_keys: ^nothing) matches no key" in (
        result.stderr
    )


def test_the_cache_is_trimmed_to_its_limit_after_each_build(tmp_path, small_models, isolated_cache):
    recipe = write_recipe(
        tmp_path,
        three_inputs(small_models, "diff: {expression: B - C, cache: true}; out: A + 0.5 * diff"),
    )
    assert invoke("build", str(recipe)).exit_code == 0
    grown = json.loads(invoke("cache", "info", "--json").stdout)
    assert grown["size"] > 10_000 and grown["max_size"] == 20_000_000_000
    assert invoke("cache", "limit", "10KB").exit_code == 0
    recipe.write_text(recipe.read_text().replace("0.5", "0.6"))
    result = invoke("build", str(recipe))
    assert "trimmed the cache" in result.stderr
    info = json.loads(invoke("cache", "info", "--json").stdout)
    assert info["max_size"] == 10_000 and info["size"] <= 10_000


@pytest.mark.parametrize("foreign", [b"my notes\n", b"not sdrecipe's model"])
def test_a_file_sdrecipe_did_not_write_is_never_replaced_by_an_output(
    tmp_path, small_models, foreign
):
    models = small_models
    output = tmp_path / "out" / "precious.safetensors"
    output.parent.mkdir()
    output.write_bytes(foreign)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}}}
        nodes: {{mix: "weighted_sum(A, B, alpha=0.5)"}}
        outputs: {{mix: out/precious.safetensors}}
        """,
    )
    for command in ("build", "validate"):
        result = invoke(command, str(recipe))
        assert result.exit_code == 2, result.output
        assert "sdrecipe did not write it" in result.stderr
    assert output.read_bytes() == foreign
    output.unlink()
    assert invoke("build", str(recipe)).exit_code == 0
    # What it wrote it may replace: by its provenance, or by the lock's word
    # when the file no longer holds it (a damaged output).
    recipe.write_text(recipe.read_text().replace("0.5", "0.25"))
    assert invoke("build", str(recipe)).exit_code == 0
    output.write_bytes(b"damaged")
    assert invoke("build", str(recipe)).exit_code == 0
    assert output.read_bytes() != b"damaged"
