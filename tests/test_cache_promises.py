"""The cache's promises, checked by bytes: a build that uses the cache writes
exactly what a build without it writes, and `verify` really rebuilds.

Each test names the deliberate bug (mutation) it was shown to catch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import UNET_IN, as32, invoke, write_recipe
from sdrecipe import api


def recipe_text(models, node_lines: str) -> str:
    nodes = "\n".join(f"  {line.strip()}" for line in node_lines.strip().splitlines())
    return (
        "inputs:\n"
        f"  A: {models['inpainting']}\n"
        f"  B: {models['finetune']}\n"
        f"  C: {models['base']}\n"
        f"nodes:\n{nodes}\n"
        "outputs:\n"
        "  out: out/x.safetensors\n"
    )


def output_bytes(tmp_path):
    return (tmp_path / "out" / "x.safetensors").read_bytes()


def build_json(recipe, *flags):
    """A build through the API (flags `--no-cache`, `--force`), as its JSON report."""
    options = api.Options(
        cache_dir=Path(os.environ["SDRECIPE_CACHE_DIR"]),
        no_cache="--no-cache" in flags,
        force="--force" in flags,
    )
    return api.build([recipe], options).to_json()


def cache_free_bytes(recipe, tmp_path):
    """What a build that reads nothing from the cache writes."""
    build_json(recipe, "--no-cache", "--force")
    return output_bytes(tmp_path)


# Mutation: the tensor identity ignores method parameters (`Call.params` left out
# of the identity template). Then every tensor after an edit comes from the cache
# and the old values are written.
@pytest.mark.parametrize(
    ("nodes", "old", "new"),
    [
        ("diff: B - C\nout: A + 0.3 * diff", "0.3", "0.4"),
        ("out: weighted_sum(A, B, alpha=0.3)", "0.3", "0.4"),
        ("out: {method: weighted_sum, models: [A, B], alpha: 0.3}", "0.3", "0.4"),
        ("mid: add_difference(A, B, C, alpha=0.3)\nout: sigmoid(mid, B)", "0.3", "0.4"),
        ("blend: inv_sigmoid(B, C, alpha=0.3)\nout: A + (blend - C)", "0.3", "0.4"),
        ("out: {expression: A + (B - C), only: [unet]}", "[unet]", "[unet, vae]"),
    ],
    ids=["factor", "call", "long form", "intermediate call", "upstream node", "selection"],
)
def test_a_rebuild_after_an_edit_writes_what_a_cache_free_build_writes(
    tmp_path, models, nodes, old, new
):
    recipe = write_recipe(tmp_path, recipe_text(models, nodes))
    build_json(recipe)
    before = output_bytes(tmp_path)
    recipe.write_text(recipe.read_text().replace(old, new))
    summary = build_json(recipe)
    assert summary["outputs"][0]["result"] == "built"
    rebuilt = output_bytes(tmp_path)
    assert rebuilt != before
    assert rebuilt == cache_free_bytes(recipe, tmp_path)


# Mutation: `verify` re-hashes the outputs on disk instead of rebuilding them.
def test_verify_rebuilds_and_fails_when_an_input_changed_under_the_lock(tmp_path, models):
    victim = tmp_path / "B.safetensors"
    shutil.copyfile(models["finetune"], victim)
    recipe = write_recipe(
        tmp_path,
        recipe_text(models, "out: A + (B - C)").replace(str(models["finetune"]), str(victim)),
    )
    build_json(recipe)
    ok = invoke("verify", str(recipe))
    assert ok.exit_code == 0 and ok.stdout.strip().endswith("reproducible")
    tensors = load_file(victim)
    tensors[UNET_IN] = tensors[UNET_IN] + np.float16(0.5)
    save_file(tensors, victim)  # same names and shapes, other values; lock untouched
    result = invoke("verify", str(recipe))
    assert result.exit_code == 1
    assert "out: DIFFERS" in result.stdout and result.stdout.strip().endswith("not reproducible")


# Mutation: the digest check on cache reads accepts any entry that parses.
def test_a_well_formed_cache_entry_with_other_values_is_caught(tmp_path, models, isolated_cache):
    recipe = write_recipe(
        tmp_path, recipe_text(models, "diff: {expression: B - C, cache: true}\nout: A + 0.5 * diff")
    )
    build_json(recipe)
    victim = max(isolated_cache.glob("objects/*/*.safetensors"), key=lambda p: p.stat().st_size)
    tampered = {k: np.full_like(v, 0.25) for k, v in load_file(victim).items()}
    save_file(tampered, victim)  # a valid file, same dtype and shape, other values
    recipe.write_text(recipe.read_text().replace("0.5", "0.7"))
    summary = build_json(recipe)
    assert summary["cache"]["corrupt_entries"] == 1
    assert summary["cache"]["tensors_from_cache"] == 1129
    assert output_bytes(tmp_path) == cache_free_bytes(recipe, tmp_path)


# Mutation: the channel rule zero-pads the narrower operands to the base's
# channels instead of keeping the base's extra ones. `A + (B - C)` cannot show
# it (0 - 0 = 0); a weighted sum halves the inpainting channels.
def test_inpainting_weighted_sum_keeps_the_base_extra_channels(tmp_path, models, arrays):
    recipe = write_recipe(
        tmp_path,
        recipe_text(models, "out: weighted_sum(A, B, alpha=0.5)").replace(
            "out/x.safetensors", "{path: out/x.safetensors, dtype: fp32}"
        ),
    )
    build_json(recipe)
    out = load_file(tmp_path / "out" / "x.safetensors")[UNET_IN]
    a, b = as32(arrays["inpainting"][UNET_IN]), as32(arrays["finetune"][UNET_IN])
    np.testing.assert_array_equal(out[:, 4:], a[:, 4:])
    np.testing.assert_allclose(out[:, :4], 0.5 * a[:, :4] + 0.5 * b, rtol=1e-6)


def test_a_pix2pix_model_that_is_not_the_base_is_refused(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        recipe_text(models, "out: weighted_sum(B, P, alpha=0.5)").replace(
            "inputs:\n", f"inputs:\n  P: {models['pix2pix']}\n"
        ),
    )
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2
    assert "P has 8 input channels and the base B only 4" in result.stderr
    assert "must be the first (base) model" in result.stderr
