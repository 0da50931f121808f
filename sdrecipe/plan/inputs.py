"""Opening a recipe's inputs, each once, by its header: a local file, the local
copy of a remote one, or a remote safetensors file's header alone (ranged
reads). Whether an input is a model or an adapter is told here, from its keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from sdrecipe.adapters.modules import is_adapter
from sdrecipe.errors import RecipeError
from sdrecipe.io.adapter_reader import AdapterFile
from sdrecipe.io.model_reader import ModelReader, StandaloneVaeReader, is_standalone_vae
from sdrecipe.io.quantized import dequantized
from sdrecipe.io.readers import open_model
from sdrecipe.io.remote_inputs import RemoteSafetensorsReader, local_copy
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.recipe import Recipe

# An opened input: a model's reader, or an adapter's modules.
InputFile = ModelReader | AdapterFile


def fetch_inputs(
    recipe: Recipe, names: Iterable[str], store: Path, download: bool = True
) -> tuple[Recipe, frozenset[str]]:
    """`recipe` with the `path` of each remote input of `names` set to its local
    copy in `store`, downloaded unless the store holds it already. With
    `download` False nothing is downloaded: the remote inputs the store lacks
    keep their path, and are the set returned."""
    inputs = dict(recipe.inputs)
    not_downloaded = set()
    for name in names:
        spec = inputs[name]
        if spec.url is None:
            continue
        try:
            local = local_copy(spec.url, store, spec.sha256, download)
        except RecipeError as exc:
            raise RecipeError(f"input {name!r}: {exc.message}", recipe.path, spec.line) from None
        except Exception as exc:  # each fsspec backend raises its own kinds
            raise RecipeError(
                f"input {name!r}: cannot {'fetch' if download else 'read'} {spec.url} "
                f"({type(exc).__name__}: {exc})",
                recipe.path,
                spec.line,
            ) from None
        if local is None:
            not_downloaded.add(name)
        else:
            inputs[name] = dataclasses.replace(spec, path=local)
    return dataclasses.replace(recipe, inputs=inputs), frozenset(not_downloaded)


def open_files(
    recipe: Recipe, names: Iterable[str], not_downloaded: frozenset[str] = frozenset()
) -> dict[str, InputFile]:
    """Each input of `names` opened once (headers only); those `not_downloaded`
    by their remote header. Errors name the input and its line."""
    opened: dict[str, InputFile] = {}
    for name in names:
        spec = recipe.inputs[name]
        remote = spec.url if name in not_downloaded else None
        if remote is None and not spec.path.exists():
            raise RecipeError(f"input {name!r}: {spec.path} does not exist", recipe.path, spec.line)
        try:
            opened[name] = (
                _open_file(spec.path) if remote is None else _open_remote(remote, spec.path)
            )
        except RecipeError as exc:
            raise RecipeError(f"input {name!r}: {exc}", recipe.path, spec.line) from None
    return opened


def _open_file(path: Path) -> InputFile:
    """The file at `path`: an adapter when it is a safetensors file of an
    adapter's keys, else a model."""
    reader = open_model(path)
    if (
        path.suffix.lower() == ".safetensors"
        and isinstance(reader, SafetensorsReader)
        and is_adapter(reader.keys())
    ):
        return AdapterFile(reader)
    return reader


def _open_remote(url: str, path: Path) -> InputFile:
    """The remote safetensors file at `url` (`path`, its local copy to be), as
    `_open_file` sees a local one, from its header."""
    if PurePosixPath(url).suffix.lower() != ".safetensors":
        raise RecipeError(
            f"{url} is not downloaded, and only a safetensors file can be read without "
            "downloading it (a build downloads it)"
        )
    try:
        reader = RemoteSafetensorsReader(url, path)
        if is_adapter(reader.keys()):
            return AdapterFile(reader)
        model = dequantized(reader)
    except RecipeError:
        raise
    except Exception as exc:  # each fsspec backend raises its own kinds
        raise RecipeError(f"cannot read {url} ({type(exc).__name__}: {exc})") from None
    return StandaloneVaeReader(model) if is_standalone_vae(model.keys()) else model
