"""The output-format registry is the one source of what each format is: the
recipe schema accepts exactly its formats, and each format's properties are
what its writer does."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pydantic
import pytest

from conftest import convert, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.errors import RecipeError
from sdrecipe.io.output_formats import OUTPUT_FORMATS, OutputFormat, output_format
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.shard_files import index_path
from sdrecipe.plan.prepare import prepare
from sdrecipe.recipe import load_recipe
from sdrecipe.recipe.schema import OutputDtype, OutputEntry

# A path for each format's output, and one with `max_shard_size` for those that take it.
PATHS = {"safetensors": "out.safetensors", "diffusers": "out", "lora": "out.lora.safetensors"}
PATHS["gguf"] = "out.gguf"
SHARD_SIZE = 100_000


def test_the_schema_accepts_exactly_the_registered_formats():
    accepted = get_args(OutputEntry.model_fields["format"].annotation)
    assert accepted == tuple(OUTPUT_FORMATS) == ("safetensors", "diffusers", "lora", "gguf")
    assert set(PATHS) == set(OUTPUT_FORMATS)
    for name, found in OUTPUT_FORMATS.items():
        assert found.name == name and output_format(name) is found
        assert type(found).__bases__ == (OutputFormat,)
        assert OutputEntry(path=PATHS[name], format=name).format == name
    with pytest.raises(pydantic.ValidationError, match="'safetensors', 'diffusers', 'lora' or"):
        OutputEntry(path="out.ckpt", format="ckpt")


@pytest.mark.parametrize("name", list(OUTPUT_FORMATS))
def test_a_format_takes_the_dtypes_and_options_it_lists(name):
    found = output_format(name)
    assert set(found.dtypes) <= set(get_args(OutputDtype))
    for dtype in get_args(OutputDtype):
        try:
            OutputEntry(path=PATHS[name], format=name, dtype=dtype)
        except pydantic.ValidationError:
            assert dtype not in found.dtypes
        else:
            assert dtype in found.dtypes
    quant = {"path": PATHS[name], "format": name, "quant": "Q4_0"}
    if found.ggml:
        assert OutputEntry(**quant).quant == "Q4_0"
    else:
        with pytest.raises(pydantic.ValidationError, match="`quant` applies"):
            OutputEntry(**quant)
    lora = {"path": PATHS[name], "format": name, "rank": 4}
    if found.extracts_lora:
        assert OutputEntry(**lora).rank == 4
    else:
        with pytest.raises(pydantic.ValidationError, match="rank apply to `format: lora`"):
            OutputEntry(**lora)


@pytest.mark.parametrize("name", list(OUTPUT_FORMATS))
@pytest.mark.parametrize("suffix", [".safetensors", ".gguf", ".ckpt", ".bin", ""])
def test_a_format_takes_the_file_names_it_lists(tmp_path, models, name, suffix):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}}}
        nodes: {{out: B - A}}
        outputs: {{out: {{path: out{suffix}, format: {name}}}}}
        """,
    )
    found = output_format(name)
    taken = found.fits_suffix(suffix) and suffix not in found.refused_suffixes
    if taken:
        assert load_recipe(recipe).outputs["out"].quant == found.default_quant
    else:
        with pytest.raises(RecipeError, match=r"pickled checkpoint|GGUF output's file"):
            load_recipe(recipe)


@pytest.fixture(scope="module")
def written(tmp_path_factory, models):
    """Each format's output of one build, from a diffusers folder with a tokenizer,
    and with `max_shard_size` where the format takes it."""
    folder = tmp_path_factory.mktemp("formats")
    base = convert(models["base"], folder / "base")
    (base / "tokenizer").mkdir()
    (base / "tokenizer" / "vocab.json").write_text("{}")
    outputs, nodes = {}, {}
    for name, path in PATHS.items():
        node = "B - A" if output_format(name).extracts_lora else "A"
        outputs[name], nodes[name] = f"{{path: {path}, format: {name}}}", node
        entry = OutputEntry.model_construct(path=path, format=name, max_shard_size=SHARD_SIZE)
        if output_format(name).option_problem(entry) is None:
            outputs[f"{name}_sharded"] = (
                f"{{path: sharded-{path}, format: {name}, max_shard_size: {SHARD_SIZE}}}"
            )
            nodes[f"{name}_sharded"] = node
    listed = "".join(f"  {output}: {entry}\n" for output, entry in outputs.items())
    steps = "".join(f"  {output}: {node}\n" for output, node in nodes.items())
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"inputs: {{A: {base}, B: {models['finetune']}}}\nnodes:\n{steps}outputs:\n{listed}"
    )
    prepared = prepare(recipe)
    update_outputs(prepared, threads=2)
    return {name: output.path for name, output in prepared.recipe.outputs.items()}


def _reads_as_safetensors(path: Path) -> bool:
    try:
        SafetensorsReader(path)
    except RecipeError:
        return False
    return True


@pytest.mark.parametrize("name", list(OUTPUT_FORMATS))
def test_a_format_is_written_as_it_says(written, name):
    found = output_format(name)
    path = written[name]
    assert path.is_dir() == found.folder
    assert (path / "tokenizer" / "vocab.json").is_file() == found.copies_tokenizers
    assert _reads_as_safetensors(path) == found.packable
    assert (path.is_file() and path.read_bytes()[:4] == b"GGUF") == found.ggml
    if found.packable:
        keys = SafetensorsReader(path).keys()
        assert any(".lora_down." in key for key in keys) == found.extracts_lora
    sharded = written.get(f"{name}_sharded")
    if sharded is not None:
        assert index_path(sharded).is_file() == found.sharded_file
        assert sharded.exists() != found.sharded_file
    else:
        assert not found.sharded_file
