"""Shared fixtures: small synthetic SD checkpoints and recipe helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click.testing
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import settings
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from sdrecipe.cli import main
from sdrecipe.engine.builder import update_outputs
from sdrecipe.plan.prepare import prepare
from sdrecipe.synthetic import ModelSpec, write_model

# Two test processes share two cores: a time limit per example would only flake.
settings.register_profile("sdrecipe", deadline=None)
settings.load_profile("sdrecipe")

SHRINK = 32
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"

MODELS = {
    "base": ModelSpec(shrink=SHRINK, seed=1),
    "finetune": ModelSpec(shrink=SHRINK, seed=1, delta_seed=2),
    "other": ModelSpec(shrink=SHRINK, seed=4),
    "inpainting": ModelSpec(shrink=SHRINK, variant="inpainting", seed=3),
    "pix2pix": ModelSpec(shrink=SHRINK, variant="instruct-pix2pix", seed=5),
}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache directory (the CLI's default is ./cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SDRECIPE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of small SD1.5-layout models (real key names, widths / 32)."""
    return write_models(tmp_path_factory.mktemp("models"))


def write_models(folder: Path) -> dict[str, Path]:
    """The `models` fixture's files, written into `folder`."""
    return {
        name: write_model(folder / f"{name}.safetensors", spec) for name, spec in MODELS.items()
    }


# The keys `small_models` keeps: one UNet block, the text encoder's last layer
# norm and the position ids (39 of 1131).
SMALL_KEYS = ("model.diffusion_model.input_blocks.1.", "final_layer_norm", POSITION_IDS)


@pytest.fixture(scope="session")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The `models` cut to the same 39 keys: for tests of what moves between
    caches, where each tensor is a file or a request of its own."""
    folder = tmp_path_factory.mktemp("small-models")
    full = write_models(tmp_path_factory.mktemp("full-models"))
    return {name: cut_small(path, folder / path.name) for name, path in full.items()}


def cut_small(source: Path, target: Path) -> Path:
    """Write `source`'s tensors under the keys `small_models` keeps to `target`."""
    kept = {k: v for k, v in load_torch(source).items() if any(s in k for s in SMALL_KEYS)}
    save_file(kept, target)
    return target


def write_small_model(path: Path, spec: ModelSpec) -> Path:
    """`write_model`, cut to the keys `small_models` keeps (a small input changed)."""
    full = write_model(path.with_name(f"{path.name}.full"), spec)
    cut_small(full, path)
    full.unlink()
    return path


@pytest.fixture(scope="session")
def arrays(models: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """The fixture models loaded with the reference safetensors library."""
    return {name: load_file(path) for name, path in models.items()}


@pytest.fixture
def standalone_vae(tmp_path: Path, models: dict[str, Path]) -> Path:
    """A VAE as distributed on its own: keys without `first_stage_model.`, fp32,
    with a training loss's tensor beside them."""
    vae = {
        key.removeprefix("first_stage_model."): torch.randn(value.shape, dtype=torch.float32)
        for key, value in load_torch(models["other"]).items()
        if key.startswith("first_stage_model.")
    }
    vae["loss.logvar"] = torch.zeros(())
    save_file(vae, tmp_path / "vae-ft.safetensors")
    return tmp_path / "vae-ft.safetensors"


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write a recipe (dedented) into `folder` and return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def convert(source: Path, target: Path, output_format: str = "diffusers", extra: str = "") -> Path:
    """Write `source` to `target` through a one-input recipe (node `model: A`);
    `extra` is more of the output's options, one YAML line."""
    recipe = write_recipe(
        target.parent,
        f"""
        inputs:
          A: {source}
        nodes:
          model: A
        outputs:
          model:
            path: {target}
            format: {output_format}
            {extra}
        """,
        name=f"{target.name}.yaml",
    )
    update_outputs(prepare(recipe), threads=2)
    return target


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the sdrecipe command line as a subprocess."""
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    env.pop("SDRECIPE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "sdrecipe", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def invoke(*args: str) -> click.testing.Result:
    """Run the sdrecipe command line in this process (no interpreter start-up)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def run_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`invoke`, answered in `run_cli`'s form, for tests that need no process of their own."""
    result = invoke(*args)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def start_paused_build(point: str, count: int, folder: Path, *args: str) -> subprocess.Popen[str]:
    """Start `sdrecipe ARGS` in a process that pauses at the `count`-th `point`
    (see paused_build.py) and return once it is paused there."""
    folder.mkdir(parents=True, exist_ok=True)
    harness = Path(__file__).with_name("paused_build.py")
    process = subprocess.Popen(
        [sys.executable, str(harness), point, str(count), str(folder), "--", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (folder / "paused").exists():
        if process.poll() is not None:
            raise AssertionError(f"the build ended before it paused: {process.stderr.read()}")
        time.sleep(0.005)
    return process


def as32(array: np.ndarray) -> np.ndarray:
    """float32 copy of an array."""
    return array.astype(np.float32)
