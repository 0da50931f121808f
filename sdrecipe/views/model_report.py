"""What a model file is: format, architecture, components, dtypes, hashes, lineage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sdrecipe.adapters.modules import is_adapter
from sdrecipe.arch import PREDICTION_MARKERS, component_of
from sdrecipe.arch.detect import detect
from sdrecipe.cache.store import Cache, file_sha256
from sdrecipe.errors import RecipeError
from sdrecipe.io.adapter_reader import AdapterReader
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.dtypes import DTYPE_TO_CODE, UNQUANTIZED
from sdrecipe.io.fingerprint import FileStat, legacy_hash_of
from sdrecipe.io.formats import format_of
from sdrecipe.io.model_reader import stored_as
from sdrecipe.io.quantized import quantization_of
from sdrecipe.io.readers import open_adapter, open_model
from sdrecipe.plan.provenance import read_provenance

# Formats of models made of many files, which have no legacy (AutoV1) hash.
MANY_FILES = ("diffusers", "sharded-safetensors")

# The training metadata `inspect` shows for an adapter (kohya's ss_* fields).
ADAPTER_METADATA = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "modelspec.architecture",
)


def inspect_adapter(path: Path, cache: Cache | None, against: Path | None) -> dict[str, object]:
    """A JSON-ready description of the adapter at `path`: its modules' algorithms,
    ranks, alphas and family; with `against`, which modules match that model."""
    adapter = open_adapter(path)
    summary = adapter.summary()
    if against is not None:
        model = open_model(against)
        infos = model.infos()
        if is_adapter(list(infos)):
            raise RecipeError("--against names an adapter; it takes the model to apply to", against)
        family = detect(infos, model.metadata).family
        reader = AdapterReader(adapter, infos, model, family)
        summary["against"] = {"path": str(against), "family": family}
        summary["matched"] = len(adapter.modules) - len(reader.unmatched)
        summary["unmatched"] = reader.unmatched
        summary["keys_patched"] = len(reader.keys())
    sha256 = file_sha256(path, cache)
    return {
        "path": str(path),
        "format": "lora",
        "adapter": summary,
        "keys": len(adapter.infos),
        "parameters": sum(info.numel for info in adapter.infos.values()),
        "size": FileStat.of(path).size,
        "sha256": sha256,
        "autov2": sha256[:10],
        "metadata": {k: v for k, v in adapter.metadata.items() if k in ADAPTER_METADATA},
    }


def inspect_model(path: Path, cache: Cache | None) -> dict[str, object]:
    """A JSON-ready description of the model at `path` (see README, `inspect`)."""
    reader = open_model(path)
    infos = reader.infos()
    architecture = detect(infos, reader.metadata)
    components: dict[str, dict[str, int]] = {}
    storage: dict[str, dict[str, dict[str, int]]] = {}
    for key, info in infos.items():
        component = component_of(key, architecture.family)
        entry = components.setdefault(component, {"keys": 0, "parameters": 0})
        entry["keys"] += 1
        entry["parameters"] += info.numel
        stored, size = stored_as(reader, key)
        kind = storage.setdefault(component, {}).setdefault(stored, {"keys": 0, "bytes": 0})
        kind["keys"] += 1
        kind["bytes"] += size
    total = sum(k["bytes"] for types in storage.values() for k in types.values())
    quantized = sum(
        k["bytes"]
        for types in storage.values()
        for name, k in types.items()
        if name not in UNQUANTIZED
    )
    sha256 = file_sha256(path, cache)
    return {
        "path": str(path),
        "format": format_of(path),
        "family": architecture.family,
        "variant": architecture.variant,
        "kind": architecture.kind,
        "ema": architecture.ema,
        "prediction_type": architecture.prediction,
        "zero_terminal_snr": architecture.zero_terminal_snr,
        "prediction": architecture.describe_prediction(),
        "prediction_markers": [key for key in PREDICTION_MARKERS if key in infos],
        "modelspec_architecture": architecture.modelspec,
        "key_prefixes": list(architecture.prefixes),
        "keys": len(infos),
        "parameters": sum(info.numel for info in infos.values()),
        "components": components,
        "dtypes": dict(Counter(DTYPE_TO_CODE[info.dtype] for info in infos.values())),
        "quantization": quantization_of(reader),
        "storage": storage,
        "quantized_share": round(quantized / total, 4) if total else 0.0,
        "size": FileStat.of(path).size,
        "sha256": sha256,
        "autov2": sha256[:10],
        "legacy_hash": None if format_of(path) in MANY_FILES else legacy_hash_of(path),
        "lineage": _lineage(reader.metadata),
    }


def _lineage(metadata: dict[str, str]) -> dict[str, object]:
    """What the file says about how it was made: sdrecipe's entry and A1111's."""
    lineage: dict[str, object] = {}
    own = read_provenance(metadata)
    if own is not None:
        lineage["sdrecipe"] = {
            "version": own.version,
            "node": own.node,
            "expression": own.expression,
            "inputs": own.inputs,
        }
    try:
        models = load_json(metadata["sd_merge_models"])
        lineage["sd_merge_models"] = {
            sha: entry.get("name") for sha, entry in models.items() if isinstance(entry, dict)
        }
    except (KeyError, ValueError, AttributeError):
        pass
    return lineage
