"""Pure stages: loading a recipe reads only the recipe; `prepare` opens each
input once, tells models from adapters by their headers and checks the spaces
there; with `download=False` a remote input is read by its header alone."""

from __future__ import annotations

import builtins
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from sdrecipe import api
from sdrecipe.errors import RecipeError
from sdrecipe.io.model_reader import file_reader
from sdrecipe.io.readers import open_adapter
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.plan.prepare import prepare, prepare_recipe
from sdrecipe.recipe import load_recipe
from sdrecipe.synthetic import AdapterSpec, write_adapter
from tests.conftest import SHRINK, write_recipe


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kohya LoRA (with alphas) for the SD1 fixture models."""
    folder = tmp_path_factory.mktemp("lora")
    return write_adapter(folder / "lora.safetensors", AdapterSpec("sd1", SHRINK))


@pytest.fixture
def bucket() -> Iterator[str]:
    """A fresh folder of fsspec's in-memory filesystem, as a URL prefix."""
    root = f"/pure-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fsspec.filesystem("memory").rm(root, recursive=True)


def upload(path: Path, url: str) -> str:
    fsspec.filesystem("memory").pipe(url.removeprefix("memory://"), path.read_bytes())
    return url


def three_inputs(folder: Path, a: object, b: object, lora: object, node: str, output: str) -> Path:
    """A recipe of inputs A, B and L (lines 2-4), one node (line 6), one output (line 8)."""
    return write_recipe(
        folder,
        f"""
        inputs:
          A: {a}
          B: {b}
          L: {lora}
        nodes:
          {node}
        outputs:
          {output}
        """,
    )


def test_loading_reads_no_input_file_and_no_url(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a model, and an error to read as one")
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {garbage}
          B: missing.safetensors
          C: memory://nowhere/none.safetensors
          D: nosuch://host/lora.safetensors
        nodes: {{mix: "weighted_sum(A, B, alpha=0.5)", other: C + 0.5 * D}}
        outputs: {{mix: mix.safetensors, other: other.safetensors}}
        """,
    )
    opened: list[Path] = []
    real_open = builtins.open

    def counted(file, *args, **kwargs):
        opened.append(Path(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda *a, **k: pytest.fail("a URL was read"))
    loaded = load_recipe(recipe)
    assert set(opened) <= {recipe}
    assert {spec.space for spec in loaded.inputs.values()} == {None}
    assert {node.space for node in loaded.nodes.values()} == {None}
    assert loaded.inputs["D"].url == "nosuch://host/lora.safetensors"


@pytest.mark.parametrize(
    ("node", "output", "message", "line"),
    [
        ("out: weighted_sum(A, L)", "out: o.safetensors", "operand 'L' is a difference", 6),
        ("out: A + L", "out: {path: o.safetensors, space: difference}", "output 'out'", 8),
        ("out: L", "out: o.safetensors", "output 'out': node 'out' is a difference", 8),
        ("out: A + B", "out: o.safetensors", "in 'A + B' the model coefficients sum to 2", 6),
    ],
)
def test_space_errors_come_from_prepare_with_the_file_and_line(
    tmp_path, models, lora, node, output, message, line
):
    recipe = three_inputs(tmp_path, models["base"], models["finetune"], lora, node, output)
    load_recipe(recipe)  # the recipe alone is fine: L's kind is in its header
    with pytest.raises(RecipeError) as caught:
        prepare(recipe)
    assert message in caught.value.message
    assert (caught.value.file, caught.value.line) == (recipe, line)


def test_prepare_reads_each_header_once_and_knows_the_spaces(tmp_path, models, lora, monkeypatch):
    recipe = three_inputs(
        tmp_path,
        models["base"],
        models["finetune"],
        lora,
        'out: "weighted_sum(A, B, alpha=0.5) + 0.8 * L"',
        "out: o.safetensors",
    )
    reads: Counter[str] = Counter()
    original = SafetensorsReader.__init__

    def counted(self, path):
        reads[Path(path).name] += 1
        original(self, path)

    monkeypatch.setattr(SafetensorsReader, "__init__", counted)
    prepared = prepare(recipe)
    assert reads == {"base.safetensors": 1, "finetune.safetensors": 1, "lora.safetensors": 1}
    spaces = {name: spec.space for name, spec in prepared.recipe.inputs.items()}
    assert spaces == {"A": "model", "B": "model", "L": "difference"}
    assert prepared.recipe.nodes["out"].space == "model"
    assert prepared.not_downloaded == frozenset()


def test_prepare_without_download_reads_remote_headers_only(tmp_path, models, lora, bucket):
    base = upload(models["base"], f"{bucket}/base.safetensors")
    style = upload(lora, f"{bucket}/lora.safetensors")
    recipe = three_inputs(
        tmp_path,
        base,
        models["finetune"],
        style,
        'out: "weighted_sum(A, B, alpha=0.5) + 0.8 * L"',
        "out: o.safetensors",
    )
    cache = tmp_path / "cache"
    prepared = prepare_recipe(load_recipe(recipe), cache_root=cache, download=False)
    assert not cache.exists() or not any(cache.rglob("*")), "nothing downloaded"
    assert prepared.not_downloaded == {"A", "L"}
    assert prepared.architectures["A"].family == "sd1"
    assert prepared.recipe.inputs["L"].space == "difference"
    assert prepared.plan.outputs["out"].tensors
    alphas = prepared.readers["L"].adapter.alphas  # one-number tensors, by ranged reads
    assert alphas.keys() == open_adapter(lora).alphas.keys()
    assert all(alphas[k] == value for k, value in open_adapter(lora).alphas.items())
    with pytest.raises(RecipeError, match="is not downloaded"):
        file_reader(prepared.readers["A"]).fingerprint()

    downloaded = prepare_recipe(load_recipe(recipe), cache_root=cache)
    assert downloaded.not_downloaded == frozenset()
    stored = sorted(path.name for path in (cache / "inputs").iterdir())
    assert downloaded.recipe.inputs["A"].path.parent == cache / "inputs"
    again = prepare_recipe(load_recipe(recipe), cache_root=cache, download=False)
    assert again.not_downloaded == frozenset(), "the store's copies are used"
    assert again.recipe.inputs["L"].path == downloaded.recipe.inputs["L"].path
    assert sorted(path.name for path in (cache / "inputs").iterdir()) == stored


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("{bucket}/none.safetensors", "cannot read {url}: it does not exist"),
        ("nosuch://host/none.safetensors", "cannot read nosuch://host/none.safetensors ("),
        ("{bucket}/base.ckpt", "{url} is not downloaded, and only a safetensors file"),
    ],
)
def test_a_remote_input_that_cannot_be_read_names_the_input_and_line(
    tmp_path, models, lora, bucket, url, message
):
    url = url.format(bucket=bucket)
    fsspec.filesystem("memory").pipe(f"{bucket}/base.ckpt".removeprefix("memory://"), b"x")
    recipe = three_inputs(
        tmp_path, url, models["finetune"], lora, "out: A + 0.8 * L", "out: o.safetensors"
    )
    with pytest.raises(RecipeError) as caught:
        prepare(recipe, cache_root=tmp_path / "cache", download=False)
    assert caught.value.message.startswith(f"input 'A': {message.format(url=url)}")
    assert (caught.value.file, caught.value.line) == (recipe, 2)
    assert not (tmp_path / "cache" / "inputs").exists()


def test_an_input_only_unselected_outputs_need_is_not_opened(tmp_path, models, lora):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, X: missing.safetensors, L: {lora}}}
        nodes: {{mine: A + 0.8 * L, theirs: X + 0.8 * L}}
        outputs: {{mine: mine.safetensors, theirs: theirs.safetensors}}
        """,
    )
    prepared = prepare(recipe, ["mine"])
    assert set(prepared.readers) == {"A", "L"}
    assert prepared.recipe.inputs["X"].space is None
    assert prepared.graph.models_under("L") == ["A"]


def test_validate_plan_and_status_never_download(tmp_path, models, lora, bucket):
    base = upload(models["base"], f"{bucket}/base.safetensors")
    recipe = three_inputs(
        tmp_path,
        base,
        models["finetune"],
        lora,
        "out: weighted_sum(A, B, alpha=0.5)",
        "out: o.safetensors",
    )
    cache = tmp_path / "cache"
    options = api.Options(cache_dir=cache)
    assert api.validate(recipe, options).architectures["A"].startswith("sd1")
    (line,) = api.status([recipe], options).outputs
    assert (line.status, line.reason) == (
        "rebuild",
        "not assessed until input A is downloaded (a build downloads it)",
    )
    assert [node.reason for node in api.plan([recipe], options).nodes] == [line.reason]
    assert not (cache / "inputs").exists(), "nothing downloaded"
    assert api.build([recipe], options).outputs[0].result == "built"
    assert ".safetensors" in {path.suffix for path in (cache / "inputs").iterdir()}
    (line,) = api.status([recipe], options).outputs
    assert line.status == "up to date"
