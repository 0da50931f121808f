"""Everything a build checks before reading any tensor data: the recipe, the
inputs' headers, architectures, output safety and the per-key plan (`validate`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdrecipe.arch import VAE_PREFIX, vae_prefix
from sdrecipe.arch.detect import Architecture, detect
from sdrecipe.arch.diffusers_names import COMPONENTS
from sdrecipe.errors import RecipeError
from sdrecipe.io.adapter_reader import AdapterFile, AdapterReader, guess_family
from sdrecipe.io.diffusers_writer import TOKENIZERS
from sdrecipe.io.model_reader import ModelReader, StandaloneVaeReader, with_model_prefix
from sdrecipe.io.quantized import dequantized_keys
from sdrecipe.methods.registry import DIFFERENCE, MODEL
from sdrecipe.plan.graph import MergeGraph, build_graph
from sdrecipe.plan.guard import check_cache_folder, check_outputs
from sdrecipe.plan.inputs import InputFile, fetch_inputs, open_files
from sdrecipe.plan.tensor_plan import BuildPlan, make_plan
from sdrecipe.recipe import Recipe, load_recipe
from sdrecipe.recipe.spaces import check_spaces

# Where remote inputs are kept when no cache folder is given (the CLI's default).
DEFAULT_CACHE = Path("cache")


@dataclass(frozen=True)
class Prepared:
    """A recipe checked against its input files' headers, ready to build; its
    inputs' and nodes' spaces are known. The remote inputs `not_downloaded` were
    read by their headers alone: their tensor data and fingerprints are not
    at hand (their readers refuse `fingerprint()`)."""

    recipe: Recipe
    graph: MergeGraph
    readers: dict[str, ModelReader]
    plan: BuildPlan
    architectures: dict[str, Architecture]
    not_downloaded: frozenset[str] = frozenset()


def open_inputs(graph: MergeGraph, files: Mapping[str, InputFile]) -> dict[str, ModelReader]:
    """The readers of the opened input `files`, models first; adapters are seen
    against the model they are applied to (`graph`'s recipe knows its spaces)."""
    recipe = graph.recipe
    readers = {name: found for name, found in files.items() if not isinstance(found, AdapterFile)}
    for name, found in files.items():
        if isinstance(found, AdapterFile):
            try:
                readers[name] = open_adapter_against(graph, name, found, readers)
            except RecipeError as exc:
                line = recipe.inputs[name].line
                raise RecipeError(f"input {name!r}: {exc}", recipe.path, line) from None
    return readers


def open_adapter_against(
    graph: MergeGraph, name: str, adapter: AdapterFile, readers: Mapping[str, ModelReader]
) -> AdapterReader:
    """Adapter input `name` (its file `adapter`), seen over the keys of the
    model it is applied to.

    Every model it is added to must be of one family; an adapter with DoRA
    modules (whose deltas depend on the weights) must be added to one model."""
    bases = graph.models_under(name)
    if not bases:
        raise RecipeError(
            "is an adapter (a difference), and no node adds it to a model, so there is "
            "no model whose keys it patches (write e.g. `A + 0.8 * L`)"
        )
    families = {
        base: detect(readers[base].infos(), readers[base].metadata).family for base in bases
    }
    if len(set(families.values())) > 1:
        described = ", ".join(f"{base} ({family})" for base, family in families.items())
        raise RecipeError(f"is an adapter added to models of different families: {described}")
    base = bases[0]
    reader = AdapterReader(adapter, readers[base].infos(), readers[base], families[base])
    if reader.has_dora and len(bases) > 1:
        raise RecipeError(
            f"holds DoRA modules, whose deltas depend on the model's weights, and is "
            f"added to {len(bases)} models ({', '.join(bases)}); use one adapter input per model"
        )
    return reader


def prepare(
    recipe_path: Path,
    selected: Iterable[str] | None = None,
    force: bool = False,
    cache_root: Path | None = None,
    download: bool = True,
) -> Prepared:
    """Load and check everything a build needs, without reading tensor data.

    Operands of different architectures are refused unless `force` (or the
    node's `force: true`) says the per-key merge is meant. Outputs that would
    replace an input, the recipe, its lock, another output or anything in
    `cache_root` are refused (see `sdrecipe.plan.guard`). Remote inputs are
    downloaded unless `download` is False (see `prepare_recipe`).
    """
    return prepare_recipe(load_recipe(recipe_path), selected, force, cache_root, download)


def prepare_recipe(
    recipe: Recipe,
    selected: Iterable[str] | None = None,
    force: bool = False,
    cache_root: Path | None = None,
    download: bool = True,
) -> Prepared:
    """`prepare` for a recipe already loaded. The remote inputs the selected
    outputs need are downloaded into the cache's store first; with `download`
    False none is: those the store lacks are read by their headers alone
    (ranged reads) and named in `Prepared.not_downloaded`. Each input is opened
    once, which tells models from adapters, and then the spaces are checked."""
    if cache_root is not None:
        check_cache_folder(recipe, cache_root)
    graph = build_graph(recipe, selected)
    needed = graph.needed_inputs()
    store = (cache_root or DEFAULT_CACHE) / "inputs"
    recipe, not_downloaded = fetch_inputs(recipe, needed, store, download)
    check_outputs(recipe, cache_root, graph.outputs)
    files = open_files(recipe, needed, not_downloaded)
    spaces = {n: DIFFERENCE if isinstance(f, AdapterFile) else MODEL for n, f in files.items()}
    recipe = check_spaces(recipe, spaces)
    graph = dataclasses.replace(graph, recipe=recipe)
    readers = open_inputs(graph, files)
    architectures = {
        name: detect(r.infos(), r.metadata)
        for name, r in readers.items()
        if not isinstance(r, AdapterReader)
    }
    for name, reader in readers.items():
        if isinstance(reader, AdapterReader):
            architectures[name] = architectures[graph.models_under(name)[0]]
            check_unmatched(graph, name, reader)
    if not force:
        check_architectures(graph, architectures)
    _place_standalone_vaes(graph, readers, architectures)
    _align_model_prefixes(graph, readers, architectures)
    for name in graph.outputs:
        output = recipe.outputs[name]
        base = graph.base_input(output.node)
        if output.format == "diffusers" and architectures[base].family == "unknown":
            raise RecipeError(
                f"output {name!r}: a diffusers folder needs a known architecture, and "
                f"{base} is {architectures[base].describe()}",
                recipe.path,
                output.line,
            )
        if output.format == "diffusers" and architectures[base].family not in COMPONENTS:
            raise RecipeError(
                f"output {name!r}: {base} is {architectures[base].describe()}, which has "
                "no diffusers folder layout",
                recipe.path,
                output.line,
            )
    plan = make_plan(
        graph,
        {name: reader.infos() for name, reader in readers.items()},
        {name: architecture.family for name, architecture in architectures.items()},
    )
    notes = (*_float32_outputs(graph, readers), *_fp8_outputs(graph, readers))
    if notes:
        plan = dataclasses.replace(plan, warnings=plan.warnings + notes)
    return Prepared(recipe, graph, readers, plan, architectures, not_downloaded)


def _float32_outputs(graph: MergeGraph, readers: Mapping[str, ModelReader]) -> Iterator[str]:
    """A note for each output without `dtype` whose base is quantized: its
    dequantized tensors keep float32, four times an fp8 file's size."""
    for name in graph.outputs:
        output = graph.recipe.outputs[name]
        base = graph.base_input(output.node)
        count = dequantized_keys(readers[base])
        if output.dtype is None and output.format in ("safetensors", "diffusers") and count:
            yield (
                f"output {name!r} has no `dtype`, and {count} tensor(s) of its base {base} are "
                "stored quantized and read as float32, so it is written in float32; set "
                "`dtype:` (bfloat16, fp8_e4m3fn) for a smaller file"
            )


def _fp8_outputs(graph: MergeGraph, readers: Mapping[str, ModelReader]) -> Iterator[str]:
    """A note for each computed output without `dtype` whose base stores fp8
    tensors: the merged values are rounded to fp8 (3 or 2 mantissa bits), which
    loses most of a small change such as a LoRA's."""
    for name in graph.outputs:
        output = graph.recipe.outputs[name]
        base = graph.base_input(output.node)
        if output.dtype is not None or output.node not in graph.recipe.nodes:
            continue
        infos = readers[base].infos().values()
        fp8 = sum(1 for info in infos if info.is_floating and info.dtype.itemsize == 1)
        if fp8 and output.format in ("safetensors", "diffusers"):
            yield (
                f"output {name!r} has no `dtype`, and {fp8} tensor(s) of its base {base} are "
                "fp8, so the merged values are rounded to fp8 there, which keeps little of a "
                "small change such as a LoRA's; set `dtype: bfloat16` to keep it"
            )


def _place_standalone_vaes(
    graph: MergeGraph, readers: dict[str, ModelReader], architectures: Mapping[str, Architecture]
) -> None:
    """A bare VAE file baked into an output (`vae:`) is seen under the prefix
    where the output's base family keeps its VAE (`vae.` for Flux.1)."""
    for name in graph.outputs:
        output = graph.recipe.outputs[name]
        reader = readers.get(output.vae) if output.vae else None
        if not isinstance(reader, StandaloneVaeReader):
            continue
        prefix = vae_prefix(architectures[graph.base_input(output.node)].family)
        if prefix != VAE_PREFIX:
            readers[output.vae] = StandaloneVaeReader(reader.wrapped, prefix)  # type: ignore[index]


def _align_model_prefixes(
    graph: MergeGraph, readers: dict[str, ModelReader], architectures: dict[str, Architecture]
) -> None:
    """A transformer file without prefix (BFL's Flux.1, a bare SD3) and a
    checkpoint with `model.diffusion_model.` merge key by key: an input that is
    no node's base is seen under the prefix of the bases it is merged into,
    where they are of its family and agree on one prefix."""
    bases = {graph.base_input(node) for node in graph.order}
    targets: dict[str, set[Architecture]] = {}
    for node in graph.order:
        base = architectures[graph.base_input(node)]
        for operand in graph.operands(node)[1:]:
            if operand in readers and operand not in bases:
                targets.setdefault(operand, set()).add(base)
    for name, merged_into in targets.items():
        found = architectures[name]
        if len(merged_into) != 1 or isinstance(readers[name], AdapterReader):
            continue
        (target,) = merged_into
        prefix = target.model_prefix
        if target.family == found.family != "unknown" and prefix != found.model_prefix:
            readers[name] = with_model_prefix(readers[name], found.model_prefix, prefix)
            architectures[name] = dataclasses.replace(found, model_prefix=prefix)


def check_unmatched(graph: MergeGraph, name: str, adapter: AdapterReader) -> None:
    """Refuse an adapter with modules that match no key of its model, unless
    every node that uses it says `allow_unmatched: true`."""
    recipe = graph.recipe
    users = [node for node in graph.dag.successors(name) if node in recipe.nodes]
    strict = [node for node in users if not recipe.nodes[node].allow_unmatched]
    if not adapter.unmatched or not strict:
        return
    spec = recipe.inputs[name]
    count, total = len(adapter.unmatched), len(adapter.adapter.modules)
    shown = ", ".join(adapter.unmatched[:3]) + (", ..." if count > 3 else "")
    model = graph.models_under(name)[0]
    if count == total:
        advice = f"; its modules look like a {guess_family(adapter.adapter)} adapter"
    else:
        advice = (
            f". Set `allow_unmatched: true` on node {strict[0]!r} (`sdrecipe bake "
            "--allow-unmatched`) to apply the modules that match"
        )
    raise RecipeError(
        f"input {name!r}: {count} of the adapter's {total} modules match no key of "
        f"{model} ({adapter.family}): {shown}{advice}",
        recipe.path,
        spec.line,
    )


def check_architectures(graph: MergeGraph, architectures: Mapping[str, Architecture]) -> None:
    """Refuse a node whose inputs are of different known families."""
    recipe = graph.recipe
    for node in graph.order:
        if recipe.nodes[node].force:
            continue
        families = {
            leaf: architectures[leaf].family
            for leaf in graph.inputs_of(node)
            if architectures[leaf].family != "unknown"
        }
        if len(set(families.values())) > 1:
            described = ", ".join(
                f"{leaf} is {architectures[leaf].describe()}" for leaf in families
            )
            raise RecipeError(
                f"node {node!r} mixes architectures ({described}); a per-key merge of "
                "different architectures gives a broken model. If you mean it, set "
                "`force: true` on the node or build with --force",
                recipe.path,
                recipe.nodes[node].line,
            )


def tokenizer_folders(prepared: Prepared, output: str) -> dict[str, Path]:
    """The tokenizer folders a diffusers output copies: those of the first
    diffusers-folder input it depends on (the base first) that has any."""
    for leaf in prepared.graph.output_inputs(output):
        folder = prepared.recipe.inputs[leaf].path
        found = {name: folder / name for name in TOKENIZERS if (folder / name).is_dir()}
        if found:
            return found
    return {}
