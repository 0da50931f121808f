"""`sdrecipe bake` and `sdrecipe extract`: one-shot commands that leave a recipe behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from sdrecipe.synthetic import AdapterSpec, write_adapter
from tests.conftest import SHRINK, run_in_process
from tests.test_adapters import expected_bake


def test_bake_writes_its_recipe_and_the_baked_model(
    models: dict[str, Path], arrays: dict[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    style = write_adapter(tmp_path / "style.safetensors", AdapterSpec("sd1", SHRINK, seed=1))
    detail = write_adapter(tmp_path / "detail.safetensors", AdapterSpec("sd1", SHRINK, "loha"))
    output = tmp_path / "out" / "baked.safetensors"
    args = ["bake", str(models["base"]), f"{style}=0.8", f"{detail}=-0.25", "-o", str(output)]
    result = run_in_process(*args, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    recipe = output.with_name("baked.recipe.yaml")
    assert "baked: base + 0.8 * style - 0.25 * detail" in recipe.read_text()
    base = arrays["base"]
    first = expected_bake("sd1", base, load_file(style), 0.8)
    second = expected_bake("sd1", base, load_file(detail), -0.25)
    built = load_file(output)
    for key, value in built.items():
        if np.issubdtype(base[key].dtype, np.floating):
            wanted = first[key] + second[key] - base[key].astype(np.float64)
            np.testing.assert_allclose(value, wanted, rtol=2e-5, atol=2e-6, err_msg=key)
    again = run_in_process(*args, "--dtype", "float32", "--json")
    assert json.loads(again.stdout)["outputs"][0]["result"] == "up to date"
    text = recipe.read_text()
    changed = run_in_process("bake", str(models["base"]), f"{style}=0.5", "-o", str(output))
    assert changed.returncode == 2 and "does not replace it" in changed.stderr
    assert recipe.read_text() == text  # the user's recipe is never replaced


def test_extract_writes_a_lora_and_its_recipe(models: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "learned.safetensors"
    kept = tmp_path / "recipes" / "learned.yaml"
    result = run_in_process(
        "extract", str(models["finetune"]), str(models["base"]), "-o", str(output),
        "--rank", "4", "--conv-rank", "2", "--text-encoder", "false", "--recipe", str(kept),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    factors = load_file(output)
    assert not any(key.startswith("lora_te") for key in factors)
    assert factors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2
    assert "format: lora" in kept.read_text() and "path: ../learned.safetensors" in kept.read_text()
    assert run_in_process("verify", str(kept)).returncode == 0


def test_an_existing_file_is_not_replaced_and_a_failed_run_leaves_no_recipe(
    models: dict[str, Path], tmp_path: Path
) -> None:
    style = write_adapter(tmp_path / "style.safetensors", AdapterSpec("sd1", SHRINK))
    taken = tmp_path / "mine.safetensors"
    taken.write_bytes(b"a user's file")
    refused = run_in_process("bake", str(models["base"]), str(style), "-o", str(taken))
    assert refused.returncode == 2 and "does not replace it" in refused.stderr
    assert taken.read_bytes() == b"a user's file"
    missing = tmp_path / "missing.safetensors"
    output = tmp_path / "baked.safetensors"
    failed = run_in_process("bake", str(models["base"]), str(missing), "-o", str(output))
    assert failed.returncode == 2 and "does not exist" in failed.stderr
    assert not list(tmp_path.glob("*.recipe.yaml"))  # a corrected rerun is not refused
    assert (
        run_in_process("bake", str(models["base"]), str(style), "-o", str(output)).returncode == 0
    )
