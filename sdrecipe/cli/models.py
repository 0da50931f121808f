"""Commands about models and methods: inspect, blocks, methods."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sdrecipe.cache.store import Cache
from sdrecipe.cli.common import cache_dir_option, emit_json, json_option, note, reports_errors
from sdrecipe.text import printable


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--against",
    type=click.Path(exists=True, path_type=Path),
    help="For an adapter: the model to match its modules against.",
)
@cache_dir_option
@click.option("--no-cache", is_flag=True, help="Hash the file without remembering it.")
@json_option
@reports_errors
def inspect(
    model: Path, against: Path | None, cache_dir: Path, no_cache: bool, as_json: bool
) -> None:
    """Show what MODEL is: format, architecture, components, dtypes, hashes,
    lineage; for an adapter (LoRA, LyCORIS), its algorithms, ranks and family."""
    from sdrecipe.io.adapter_files import is_adapter_path
    from sdrecipe.views.model_report import inspect_adapter, inspect_model

    cache = None if no_cache else Cache.existing(cache_dir, notify=note)
    adapter = is_adapter_path(model)
    if against is not None and not adapter:
        raise click.UsageError("--against applies to adapters, and MODEL is not one")
    report = inspect_adapter(model, cache, against) if adapter else inspect_model(model, cache)
    if as_json:
        emit_json(report)
        return

    def say(line: str) -> None:
        # Names, expressions and lineage come from the file: escape them.
        click.echo(printable(line))

    if adapter:
        _describe_adapter(report, say)
        return

    words = [report["family"], report["kind"], report["variant"]]
    kind = " ".join(str(word) for word in words if word not in (None, "normal"))
    say(f"{model}: {report['format']}, {kind}{', with EMA' if report['ema'] else ''}")
    if report["family"] == "unknown":
        say(f"  key prefixes: {', '.join(report['key_prefixes'])}")
    if report["prediction"]:
        say(f"  prediction: {report['prediction']}")
    say(
        f"  {report['keys']} keys, {report['parameters']:,} parameters, "
        f"{report['size'] / 1e6:,.1f} MB, dtypes "
        + ", ".join(f"{code} {count}" for code, count in report["dtypes"].items())
    )
    for name, counts in report["components"].items():
        stored = ", ".join(
            f"{kind} {entry['keys']}" for kind, entry in report["storage"][name].items()
        )
        say(
            f"  {name:15} {counts['keys']:5} keys {counts['parameters']:>15,} parameters"
            f"  ({stored})"
        )
    if report["quantization"]:
        share = report["quantized_share"]
        say(f"  quantized: {report['quantization']}; {share:.1%} of the bytes")
    legacy = f"  AutoV1 {report['legacy_hash']}" if report["legacy_hash"] else ""
    say(f"  sha256 {report['sha256']}  AutoV2 {report['autov2']}{legacy}")
    lineage = report["lineage"]
    if "sdrecipe" in lineage:
        own = lineage["sdrecipe"]
        say(f"  made by sdrecipe {own['version']}: {own['node']} = {own['expression']}")
    if "sd_merge_models" in lineage:
        names = sorted({str(name) for name in lineage["sd_merge_models"].values()})
        say("  merged from: " + ", ".join(names))


def _describe_adapter(report: dict, say: Callable[[str], None]) -> None:
    """`inspect`'s text for an adapter."""
    adapter = report["adapter"]
    algorithms = ", ".join(f"{name} {count}" for name, count in adapter["algorithms"].items())
    say(f"{report['path']}: lora ({algorithms}), {adapter['family']}, {adapter['naming']} names")
    say(
        f"  {adapter['modules']} modules, rank {', '.join(map(str, adapter['ranks'])) or '-'}, "
        f"alpha {', '.join(f'{a:g}' for a in adapter['alphas']) or '-'}, "
        f"{report['size'] / 1e6:,.1f} MB"
    )
    if "against" in adapter:
        unmatched = adapter["unmatched"]
        say(
            f"  against {adapter['against']['path']} ({adapter['against']['family']}): "
            f"{adapter['matched']} modules match, {len(unmatched)} do not"
            + (f" (e.g. {', '.join(unmatched[:3])})" if unmatched else "")
        )
    say(f"  sha256 {report['sha256']}  AutoV2 {report['autov2']}")


@click.command()
@json_option
@reports_errors
def methods(as_json: bool) -> None:
    """List the merge methods: models, spaces, parameters and defaults."""
    from sdrecipe.methods.registry import registered_methods

    listed = [
        {
            "name": method.name,
            "signature": method.signature,
            "models": list(method.model_names),
            "variadic": method.variadic,
            "min_models": method.min_models,
            "spaces": dict(method.spaces),
            "parameters": {
                name: {"type": _type_name(info.annotation), "default": info.default}
                for name, info in method.parameters.model_fields.items()
            },
            "elementwise": method.elementwise,
            "key_aware": method.key_aware,
            # In a build on a device: "same bytes" (as the CPU's), "own bytes" (the
            # device class's, recorded), or "cpu" (it runs on the CPU).
            "device": method.device or "cpu",
            "summary": (method.function.__doc__ or "").strip().splitlines()[0],
        }
        for method in registered_methods()
    ]
    if as_json:
        emit_json({"methods": listed})
        return
    for entry in listed:
        device = {"same bytes": "on a GPU: the CPU's bytes", "own bytes": "on a GPU: its own bytes"}
        where = device.get(entry["device"], "on a GPU: runs on the CPU")
        click.echo(f"{entry['signature']}\n    {entry['summary']} ({where})")


def _type_name(annotation: Any) -> str:
    """A parameter's type as people write it: `float`, `Literal['sum', 'count']`."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@click.command()
@click.argument("model_or_family")
@click.option("--keys", "with_keys", is_flag=True, help="Also list the keys of each block.")
@json_option
@reports_errors
def blocks(model_or_family: str, with_keys: bool, as_json: bool) -> None:
    """List the merge blocks of a family (sd1, sd2, sdxl, flux1, sd3, sd35-medium,
    sd35-large, ...) or of a model file: each block's key and parameter counts,
    in the order pasted lists use."""
    import math

    from sdrecipe.arch import layout
    from sdrecipe.arch.blocks import block_ids, block_of
    from sdrecipe.arch.family import family_by_name, family_names
    from sdrecipe.errors import RecipeError

    path = Path(model_or_family)
    try:
        is_file = bool(model_or_family) and path.exists()
    except OSError:  # a name too long for a path is no file
        is_file = False
    if is_file:
        from sdrecipe.arch.detect import detect
        from sdrecipe.io.readers import open_model

        reader = open_model(path)
        infos = reader.infos()
        family = detect(infos, reader.metadata).family
        sizes = {key: info.numel for key, info in infos.items()}
    else:
        data = family_by_name(model_or_family)
        if data is None:
            raise RecipeError(
                f"{model_or_family!r} is neither a model file nor a family "
                f"({', '.join(family_names())})"
            )
        family = data.name
        sizes = {}
        if data.layout is not None:
            shapes, _ = layout(data.layout)
            sizes = {key: math.prod(shape) for key, shape in shapes.items()}
    ids = block_ids(family)
    if not ids:
        raise RecipeError(f"{family} has no block table (no merging tool defines one)")
    table: dict[str, dict[str, Any]] = {block: {"keys": [], "parameters": 0} for block in ids}
    for key, size in sizes.items():
        block = block_of(family, key)
        if block is None:
            continue
        entry = table[block]
        entry["keys"].append(key)
        entry["parameters"] += size
    if as_json:
        emit_json(
            {
                "family": family,
                "blocks": {
                    block: {
                        "keys": len(entry["keys"]),
                        "parameters": entry["parameters"],
                        **({"key_names": entry["keys"]} if with_keys else {}),
                    }
                    for block, entry in table.items()
                },
            }
        )
        return
    click.echo(f"{family}: {len(ids)} blocks")
    for block, entry in table.items():
        click.echo(f"  {block:6} {len(entry['keys']):5} keys {entry['parameters']:>15,} parameters")
        if with_keys:
            for key in entry["keys"]:
                click.echo(f"         {printable(key)}")
