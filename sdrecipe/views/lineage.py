"""`sdrecipe lineage`: the tree of how a model was made, from its embedded
sdrecipe record and A1111's `sd_merge_recipe` / `sd_merge_models`, followed
recursively through the lineage each generation of merges carried along."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdrecipe.cache import Cache, file_sha256
from sdrecipe.io.readers import open_model
from sdrecipe.provenance import json_field, read_provenance
from sdrecipe.views.mermaid import mermaid_label

# Merge recipes name at most these three models (A1111's form).
RANKED_HASHES = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")
MAX_DEPTH = 64


@dataclass
class Ancestor:
    """A model in the tree: its name, hashes, how it was made, and what from."""

    name: str
    sha256: str | None
    operation: str | None = None
    inputs: list[Ancestor] = field(default_factory=list)

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "operation": self.operation,
            "autov2": self.autov2,
            "inputs": [ancestor.to_dict() for ancestor in self.inputs],
        }


def model_lineage(path: Path, cache: Cache | None) -> Ancestor:
    """The lineage tree of the model at `path`."""
    metadata = open_model(path).metadata
    models = json_field(metadata, "sd_merge_models") or {}
    root = Ancestor(path.name, file_sha256(path, cache))
    own = read_provenance(metadata)
    if own is not None:
        root.operation = f"{own.node} = {own.expression} (sdrecipe {own.version})"
        root.inputs = [
            _ancestor(
                str(entry.get("sha256")), models, {root.sha256 or ""}, f"{name}: {entry['file']}"
            )
            for name, entry in own.inputs.items()
        ]
        return root
    recipe = json_field(metadata, "sd_merge_recipe")
    if recipe is not None:
        root.operation = _operation(recipe)
        root.inputs = _ranked_inputs(recipe, models, {root.sha256 or ""})
    return root


def _ancestor(sha256: str, models: Mapping, path: set[str], label: str | None = None) -> Ancestor:
    """The ancestor with `sha256`, as `sd_merge_models` records it, and its own
    inputs; `path` holds the hashes above it, so a cycle ends the branch."""
    entry = models.get(sha256)
    entry = entry if isinstance(entry, dict) else {}
    name = label or str(entry.get("name") or "(not recorded)")
    ancestor = Ancestor(name, sha256)
    recipe = entry.get("sd_merge_recipe")
    if isinstance(recipe, dict) and sha256 not in path and len(path) < MAX_DEPTH:
        ancestor.operation = _operation(recipe)
        ancestor.inputs = _ranked_inputs(recipe, models, path | {sha256})
    return ancestor


def _ranked_inputs(recipe: Mapping, models: Mapping, path: set[str]) -> list[Ancestor]:
    hashes = [recipe.get(rank) for rank in RANKED_HASHES]
    return [_ancestor(sha, models, path) for sha in hashes if isinstance(sha, str) and sha]


def _operation(recipe: Mapping) -> str:
    """A merge recipe's operation in words: A1111's method and multiplier, or
    sdrecipe's expression."""
    method = str(recipe.get("interp_method") or "unknown method")
    multiplier = recipe.get("multiplier")
    tool = recipe.get("type")
    text = method if multiplier is None else f"{method}, multiplier {multiplier}"
    return f"{text} ({tool})" if tool else text


def to_text(root: Ancestor) -> str:
    """The tree drawn with box-drawing characters, one model a line."""
    lines = [_line(root)]

    def walk(node: Ancestor, prefix: str) -> None:
        for index, child in enumerate(node.inputs):
            last = index == len(node.inputs) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_line(child)}")
            walk(child, prefix + ("    " if last else "│   "))

    walk(root, "")
    return "\n".join(lines) + "\n"


def _line(node: Ancestor) -> str:
    hashes = f"  [{node.autov2}]" if node.autov2 else ""
    return f"{node.name}{hashes}" + (f"  {node.operation}" if node.operation else "")


def to_json(root: Ancestor) -> str:
    return json.dumps(root.to_dict(), indent=2)


def to_mermaid(root: Ancestor) -> str:
    """A Mermaid flowchart, ancestors below the model, arrows towards it."""
    lines = ["flowchart BT"]
    counter = iter(range(1_000_000))

    def add(node: Ancestor) -> str:
        node_id = f"m{next(counter)}"
        label = [node.name, *([node.autov2] if node.autov2 else []), node.operation or ""]
        lines.append(f'  {node_id}["{mermaid_label([part for part in label if part])}"]')
        for child in node.inputs:
            lines.append(f"  {add(child)} --> {node_id}")
        return node_id

    add(root)
    return "\n".join(lines) + "\n"
