"""Turn a recipe file into a validated Recipe, with file:line on every error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pydantic

from sdrecipe.errors import RecipeError
from sdrecipe.io.output_formats import output_format
from sdrecipe.io.shard_files import SUFFIX as SHARDED_SUFFIX
from sdrecipe.io.text_files import read_text_file
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import DIFFERENCE, MODEL
from sdrecipe.recipe.expr import (
    Call,
    Expr,
    ExpressionError,
    ExprTransformer,
    ParamValue,
    PerKey,
    parse_expression,
    references,
)
from sdrecipe.recipe.key_regex import key_regex
from sdrecipe.recipe.matrix import (
    Renamer,
    node_variables,
    read_matrix,
    substitute,
    variables_in,
    variant_name,
)
from sdrecipe.recipe.model import Input, KeySelection, LoraOptions, Node, Output, Recipe
from sdrecipe.recipe.schema import (
    LORA_OPTIONS,
    InputEntry,
    NodeEntry,
    OutputEntry,
    RecipeDocument,
)
from sdrecipe.recipe.yaml_source import YamlDocument, load_yaml

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Recipes are a few KB; a larger file is refused before it is parsed.
MAX_RECIPE_BYTES = 4 << 20
_UNSET_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def load_recipe(path: Path | str) -> Recipe:
    """Read, parse and validate the recipe at `path` (names, expressions, methods);
    only the recipe is read: its inputs' spaces are decided when they are opened
    (`sdrecipe.recipe.spaces.check_spaces`)."""
    path = Path(path)
    return parse_recipe(read_recipe_text(path), path)


def read_recipe_text(path: Path) -> str:
    """The text of the recipe file at `path`: a regular UTF-8 file of at most
    `MAX_RECIPE_BYTES`."""
    try:
        return read_text_file(path, "the recipe", MAX_RECIPE_BYTES)
    except FileNotFoundError:
        raise RecipeError("recipe file not found", path) from None


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate recipe `text`; relative input and output paths resolve against `path`'s folder.
    A `matrix:` expands into its variants (see `sdrecipe.recipe.matrix`)."""
    document = load_yaml(text, path, keep_text=keeps_text)
    if not isinstance(document.data, dict):
        raise RecipeError("the recipe must be a mapping with inputs, nodes and outputs", path, 1)
    if "matrix" in document.data:
        recipe = _expand_matrix(text, document, path)
    else:
        recipe = _make_recipe(text, document.data, document, path)
    # What the recipe says, as parsed (values kept as written, in the order
    # written, as the output's embedded recipe and metadata keep them): an edit
    # of comments or layout leaves it, and so the outputs, as they were.
    meaning = json.dumps(document.data, default=str)
    return dataclasses.replace(recipe, meaning=hashlib.sha256(meaning.encode()).hexdigest())


def _expand_matrix(text: str, document: YamlDocument, path: Path) -> Recipe:
    """The recipe with one node per variant of each node that depends on the
    matrix, and one output per variant of each output."""
    data = dict(document.data)
    try:
        matrix = read_matrix(data.pop("matrix"))
    except ValueError as exc:
        raise RecipeError(f"matrix: {exc}", path, document.line_of(("matrix",))) from None
    defined = set(matrix.variables)
    for section in ("inputs", "nodes"):
        entries = data.get(section)
        for name, entry in entries.items() if isinstance(entries, dict) else ():
            named = variables_in(entry)
            line = document.line_of((section, name))
            if named & defined and section == "inputs":
                raise RecipeError(f"input {name!r}: inputs cannot use matrix variables", path, line)
            # Paths may name environment variables; an expression may not.
            unknown = sorted(named - defined) if section == "nodes" else []
            if unknown:
                raise RecipeError(
                    f"{section}.{name} uses ${{{unknown[0]}}}, which the matrix does not "
                    f"define (it defines {', '.join(matrix.variables)})",
                    path,
                    line,
                )
    own = {
        section: {
            name: variables_in(entry) & defined for name, entry in (data.get(section) or {}).items()
        }
        for section in ("nodes", "outputs")
    }
    inputs: dict[str, Input] = {}
    nodes: dict[str, Node] = {}
    outputs: dict[str, Output] = {}
    written: dict[Path, str] = {}
    declared: dict[str, Input] | None = None  # inputs take no variables: made once
    for combination in matrix.combinations:
        described = ", ".join(f"{name}={value}" for name, value in combination.items())
        try:
            variant = _make_recipe(text, substitute(data, combination), document, path, declared)
        except RecipeError as exc:
            raise RecipeError(f"{exc.message} (with {described})", path, exc.line) from None
        if declared is None:
            declared = {name: variant.inputs[name] for name in data["inputs"]}
        expressions = {name: node.expr for name, node in variant.nodes.items()}
        used = node_variables(own["nodes"], expressions)
        names = {name: variant_name(name, used(name), matrix, combination) for name in expressions}
        renamer = Renamer(names)
        inputs.update(variant.inputs)
        for name, node in variant.nodes.items():
            renamed = dataclasses.replace(
                node, name=names[name], expr=renamer.visit(node.expr), origin=name
            )
            nodes.setdefault(names[name], renamed)
        for name, output in variant.outputs.items():
            varies = used(output.node)
            unused = sorted(own["outputs"].get(name, set()) - varies)
            if unused:
                # An output is its node written to a file: one file per node variant.
                raise RecipeError(
                    f"output {name!r} uses ${{{unused[0]}}}, which its node {output.node!r} "
                    "does not: every variant would hold the same tensors; use the variable "
                    "in the node, or leave it out of the output",
                    path,
                    output.line,
                )
            output_name = variant_name(name, varies, matrix, combination)
            if output_name in outputs:
                continue
            other = written.setdefault(output.path, output_name)
            if other != output_name:
                raise RecipeError(
                    f"outputs {other} and {output_name} write the same file {output.path}: "
                    f"put the variables it varies by ({', '.join(sorted(varies))}) in its path, "
                    "e.g. out-${" + sorted(varies)[0] + "}.safetensors",
                    path,
                    output.line,
                )
            values = tuple((var, combination[var]) for var in matrix.variables if var in varies)
            outputs[output_name] = dataclasses.replace(
                output, node=names[output.node], origin=name, variables=values
            )
    return Recipe(path=path, text=text, inputs=inputs, nodes=nodes, outputs=outputs)


def _make_recipe(
    text: str,
    data: dict,
    document: YamlDocument,
    path: Path,
    declared: dict[str, Input] | None = None,
) -> Recipe:
    """The recipe that `data` (one YAML document's data, without a matrix)
    describes; `declared`, its `inputs:` already made (they take no variables)."""
    try:
        schema = RecipeDocument.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _schema_error(exc, document, path) from None
    folder = path.parent
    inputs = (
        dict(declared)
        if declared is not None
        else {
            name: _make_input(name, entry, folder, document, path)
            for name, entry in schema.inputs.items()
        }
    )
    nodes = {name: _make_node(name, entry, document, path) for name, entry in schema.nodes.items()}
    for name in [*inputs, *nodes]:
        if not _IDENTIFIER.match(name):
            section = "inputs" if name in inputs else "nodes"
            raise RecipeError(
                f"{name!r} is not a valid name: use letters, digits and '_', not starting "
                "with a digit",
                path,
                document.line_of((section, name)),
            )
    for name in set(inputs) & set(nodes):
        raise RecipeError(
            f"the name {name!r} is both an input and a node; names must be unique",
            path,
            document.line_of(("nodes", name)),
        )
    for node in nodes.values():
        for ref in references(node.expr):
            if ref not in inputs and ref not in nodes:
                raise RecipeError(
                    f"node {node.name!r} uses unknown name {ref!r} "
                    f"(inputs: {', '.join(inputs)}; nodes: {', '.join(nodes)})",
                    path,
                    node.line,
                )
    outputs = {
        name: _make_output(name, entry, inputs, nodes, folder, document, path)
        for name, entry in schema.outputs.items()
    }
    for name, output in outputs.items():
        entry = schema.outputs[name]
        if output.vae and output.vae not in inputs and isinstance(entry, OutputEntry):
            # A VAE given by path becomes an input of its own (see _make_output).
            vae = _make_input(output.vae, entry.vae or "", folder, document, path)
            line = document.line_of(("outputs", name, "vae"))
            inputs[vae.name] = dataclasses.replace(vae, line=line)
    return Recipe(path=path, text=text, inputs=inputs, nodes=nodes, outputs=outputs)


def keeps_text(at: tuple[str | int, ...]) -> bool:
    """Input and output paths, hashes and metadata stay as written; options do not."""
    if at[:1] == ("inputs",):
        return True
    return at[:1] == ("outputs",) and (
        len(at) == 2 or at[2] in ("path", "dtype", "vae", "metadata")
    )


def _schema_error(exc: pydantic.ValidationError, document: YamlDocument, path: Path) -> RecipeError:
    error = _relevant_error(exc.errors(), document)
    location = tuple(part for part in error["loc"] if not _is_union_branch(part))
    where = ".".join(str(part) for part in location) or "recipe"
    if error["type"] == "extra_forbidden":
        message = f"unknown field {where!r}"
    elif error["type"] == "missing":
        message = f"missing field {where!r}"
    elif error["loc"][-1] == "str":
        message = f"{where} must be a string or a mapping (got {error['input']!r})"
    else:
        message = f"{where}: {error['msg'].removeprefix('Value error, ')}"
        if not isinstance(error["input"], dict | list):
            message += f" (got {error['input']!r})"
    return RecipeError(message, path, document.line_of(location))


def _is_union_branch(part: str | int) -> bool:
    """pydantic names the branch of a `str | ...Entry` union it tried in an error's
    location, e.g. `str`, `InputEntry` or `function-after[_one_form(), NodeEntry]`."""
    return isinstance(part, str) and (part == "str" or "Entry" in part)


def _relevant_error(errors: list, document: YamlDocument) -> dict:
    """Of the errors of a `str | Entry` union, keep the branch that matches the YAML value."""
    for error in errors:
        location = error["loc"]
        branch = next((i for i, part in enumerate(location) if _is_union_branch(part)), None)
        if branch is None:
            return error
        value = document.data
        for part in location[:branch]:
            value = value[part]
        if (location[branch] == "str") != isinstance(value, dict):
            return error
    return errors[0]


def is_url(text: str) -> bool:
    """True for `scheme://...` other than `file://`, in any case (a local path by
    another name)."""
    return bool(_SCHEME.match(text)) and text[:7].lower() != "file://"


def remote_placeholder(url: str) -> Path:
    """The `path` a remote input has until it is fetched: a name no file has."""
    return Path("/nonexistent-remote-input") / hashlib.sha256(url.encode()).hexdigest()


def resolve_path(raw: str, folder: Path) -> Path:
    """Expand `~` and environment variables; make relative paths relative to
    `folder`; a `file://` URL is the local path it names."""
    _check_no_nul(raw, raw)
    expanded = os.path.expanduser(os.path.expandvars(raw))
    unset = _UNSET_VARIABLE.search(expanded)
    if unset:
        raise ValueError(f"environment variable {unset.group(1)} is not set (in {raw!r})")
    if expanded[:5].lower() == "file:" and expanded[5:6] == "/":
        expanded = _file_url_path(expanded)
    return Path(os.path.normpath(folder / expanded))


def _check_no_nul(path: str, raw: str) -> None:
    """ValueError for a path with a NUL character, which no file name can hold."""
    if "\0" in path:
        raise ValueError(f"the path {raw!r} holds a NUL character (\\0), which no file name can")


def _file_url_path(url: str) -> str:
    """The absolute local path of a `file:` URL (`file:///models/a.safetensors`,
    or `file:/models/a.safetensors` as urllib reads it; %-escapes undone);
    ValueError for another host, or for no path."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"{url} names the host {parts.netloc!r}; a file:// URL names a local file "
            "(file:///path/to/file)"
        )
    local = urllib.request.url2pathname(parts.path)
    if local in ("", "/"):
        raise ValueError(f"{url} names no file; a file:// URL names one (file:///path/to/file)")
    _check_no_nul(local, url)
    return local


def _make_input(
    name: str, entry: str | InputEntry, folder: Path, document: YamlDocument, path: Path
) -> Input:
    line = document.line_of(("inputs", name))
    spec = InputEntry(path=entry) if isinstance(entry, str) else entry
    sha256 = spec.sha256.lower() if spec.sha256 else None
    if is_url(spec.path):
        if "\0" in spec.path:
            raise RecipeError(
                f"input {name!r}: the URL {spec.path!r} holds a NUL character", path, line
            )
        return Input(
            name=name, path=remote_placeholder(spec.path), sha256=sha256, line=line, url=spec.path
        )
    try:
        resolved = resolve_path(spec.path, folder)
    except ValueError as exc:
        raise RecipeError(f"input {name!r}: {exc}", path, line) from None
    return Input(name=name, path=resolved, sha256=sha256, line=line)


def _make_node(name: str, entry: str | NodeEntry, document: YamlDocument, path: Path) -> Node:
    line = document.line_of(("nodes", name))
    source = entry if isinstance(entry, str) else entry.expression
    if source is not None:
        try:
            expr = parse_expression(source)
        except ExpressionError as exc:
            raise RecipeError(
                f"node {name!r}: {exc.message} at column {exc.column} of {source!r}", path, line
            ) from None
    else:
        assert isinstance(entry, NodeEntry) and entry.method and entry.models
        try:
            args = tuple(parse_expression(model) for model in entry.models)
        except ExpressionError as exc:
            raise RecipeError(f"node {name!r}: models: {exc.message}", path, line) from None
        params = {}
        for key, value in entry.parameters.items():
            try:
                params[key] = _param_value(value)
            except ValueError as exc:
                raise RecipeError(
                    f"node {name!r}: parameter {key!r} {exc}",
                    path,
                    document.line_of(("nodes", name, key)),
                ) from None
        expr = Call(entry.method, args, tuple(params.items()))
    try:
        expr = _check_calls(expr)
    except ValueError as exc:
        raise RecipeError(f"node {name!r}: {exc}", path, line) from None
    if not isinstance(entry, NodeEntry):
        return Node(name=name, expr=expr, line=line)
    patterns = {}
    for option in ("include_keys", "exclude_keys"):
        try:
            patterns[option] = tuple(key_regex(p) for p in getattr(entry, option) or ())
        except ValueError as exc:
            raise RecipeError(
                f"node {name!r}: {option}: {exc}", path, document.line_of(("nodes", name, option))
            ) from None
    selection = KeySelection(
        only=frozenset(entry.only or ()), exclude=frozenset(entry.exclude or ()), **patterns
    )
    return Node(
        name,
        expr,
        line,
        cache=entry.cache,
        force=entry.force,
        allow_unmatched=entry.allow_unmatched,
        selection=selection,
    )


def _param_value(value: object) -> ParamValue:
    """A long-form parameter as the expression parser would give it: a number,
    flag or choice as is, a list as a tuple, a mapping as a per-key value."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, list):
        numbers = []
        for position, item in enumerate(value, 1):
            try:
                numbers.append(_number(item))
            except ValueError:
                raise ValueError(
                    f"has {item!r} as value {position} of the {len(value)} in its list; "
                    "each must be a finite number"
                ) from None
        return tuple(numbers)
    if isinstance(value, dict):
        return PerKey(tuple((str(label), _number(number)) for label, number in value.items()))
    return _number(value)


def _number(value: object) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, a list of numbers or a mapping, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


class _CallChecker(ExprTransformer):
    """Validates every method call (ValueError) and fills in parameter defaults."""

    def params(self, call: Call) -> tuple[tuple[str, ParamValue], ...]:
        try:
            method = get_method(call.method)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        problem = method.check_model_count(len(call.args))
        if problem:
            raise ValueError(problem)
        return tuple(method.validate(dict(call.params)).items())


def _check_calls(expr: Expr) -> Expr:
    """Validate every method call; return the expression with defaults filled in."""
    return _CallChecker().visit(expr)


def _make_output(
    name: str,
    entry: str | OutputEntry,
    inputs: dict[str, Input],
    nodes: dict[str, Node],
    folder: Path,
    document: YamlDocument,
    path: Path,
) -> Output:
    line = document.line_of(("outputs", name))
    if name not in nodes:
        raise RecipeError(f"output {name!r} names no node (nodes: {', '.join(nodes)})", path, line)
    spec = OutputEntry(path=entry) if isinstance(entry, str) else entry
    try:
        resolved = resolve_path(spec.path, folder)
    except ValueError as exc:
        raise RecipeError(f"output {name!r}: {exc}", path, line) from None
    if resolved.suffix.lower() in output_format(spec.format).refused_suffixes:
        raise RecipeError(
            f"output {name!r}: {resolved.name} names a pickled checkpoint, but sdrecipe writes "
            "safetensors (a pickle can run code when it is loaded); name the file .safetensors",
            path,
            document.line_of(("outputs", name)),
        )
    if not output_format(spec.format).fits_suffix(resolved.suffix.lower()):
        raise RecipeError(
            f"output {name!r}: a GGUF output's file ends in .gguf, and only a GGUF output's "
            f"(set `format: gguf` with a .gguf path, or name {resolved.name} otherwise)",
            path,
            document.line_of(("outputs", name)),
        )
    if (
        spec.max_shard_size is not None
        and output_format(spec.format).sharded_file
        and not resolved.name.lower().endswith(SHARDED_SUFFIX)
    ):
        raise RecipeError(
            f"output {name!r}: max_shard_size names shards after the output's file, which must "
            f"end in {SHARDED_SUFFIX} (e.g. model.safetensors → model-00001-of-00002.safetensors)",
            path,
            document.line_of(("outputs", name, "max_shard_size")),
        )
    # `vae` names an input, or a file that becomes the input `<output>.vae`.
    vae = spec.vae if spec.vae is None or spec.vae in inputs else f"{name}.vae"
    lora = None
    if output_format(spec.format).extracts_lora:
        given = {option: getattr(spec, option) for option in LORA_OPTIONS}
        lora = LoraOptions(
            **{option: value for option, value in given.items() if value is not None},
            dtype=spec.dtype or "float16",
        )
    return Output(
        node=name,
        path=resolved,
        dtype=spec.dtype,
        line=line,
        format=spec.format,
        prune_ema=spec.prune_ema,
        space=spec.space or (DIFFERENCE if lora else MODEL),
        vae=vae,
        metadata=dict(spec.metadata),
        lora=lora,
        max_shard_size=spec.max_shard_size,
        scaled=spec.scaled,
        quant=spec.quant or output_format(spec.format).default_quant,
    )
