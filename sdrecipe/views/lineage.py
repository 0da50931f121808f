"""`sdrecipe lineage`: the tree of how a model was made, from its embedded
sdrecipe record and A1111's `sd_merge_recipe` / `sd_merge_models`, followed
recursively through the lineage each generation of merges carried along."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdrecipe.cache.store import Cache, file_sha256
from sdrecipe.io.readers import open_model
from sdrecipe.plan.provenance import json_field, read_provenance
from sdrecipe.text import printable
from sdrecipe.views.mermaid import mermaid_label

# Merge recipes name at most these three models (A1111's form).
RANKED_HASHES = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")
# A crafted `sd_merge_models` can make any tree huge: each ancestor is expanded
# once (a repeat refers to it), at most this deep and this many in all.
MAX_DEPTH = 64
MAX_ANCESTORS = 1000
SHOWN_ABOVE = "its ancestors are shown above"


@dataclass(eq=False)
class Ancestor:
    """A model in the tree: its name, hashes, how it was made, and what from;
    `cut` says why its ancestors are not followed (a limit, or a cycle)."""

    name: str
    sha256: str | None
    operation: str | None = None
    inputs: list[Ancestor] = field(default_factory=list)
    cut: str | None = None

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    def to_dict(self, shown: set[int] | None = None) -> dict[str, object]:
        """The tree as JSON-ready data; an ancestor met again is listed without
        its inputs and with `shown_above`, so repeats cost one entry each."""
        shown = set() if shown is None else shown
        data: dict[str, object] = {
            "name": self.name,
            "sha256": self.sha256,
            "operation": self.operation,
            "autov2": self.autov2,
        }
        if self.cut:
            data["cut"] = self.cut
        if self.inputs and id(self) in shown:
            return {**data, "inputs": [], "shown_above": True}
        shown.add(id(self))
        return {**data, "inputs": [ancestor.to_dict(shown) for ancestor in self.inputs]}


def model_lineage(path: Path, cache: Cache | None) -> Ancestor:
    """The lineage tree of the model at `path`."""
    metadata = open_model(path).metadata
    found = _Ancestry(json_field(metadata, "sd_merge_models") or {})
    root = Ancestor(path.name, file_sha256(path, cache))
    own = read_provenance(metadata)
    if own is not None:
        root.operation = f"{own.node} = {own.expression} (sdrecipe {own.version})"
        root.inputs = [
            found.ancestor(
                str(entry.get("sha256")), {root.sha256 or ""}, f"{name}: {entry['file']}"
            )
            for name, entry in own.inputs.items()
        ]
        return root
    recipe = json_field(metadata, "sd_merge_recipe")
    if recipe is not None:
        root.operation = _operation(recipe)
        root.inputs = found.ranked_inputs(recipe, {root.sha256 or ""})
    return root


class _Ancestry:
    """The ancestors `sd_merge_models` records, each built once and shared."""

    def __init__(self, models: Mapping):
        self.models = models
        self.built: dict[str, Ancestor] = {}

    def ancestor(self, sha256: str, path: set[str], label: str | None = None) -> Ancestor:
        """The ancestor with `sha256` and its own inputs; `path` holds the hashes
        above it, so a cycle ends the branch."""
        if label is None and sha256 in self.built:
            return self.built[sha256]
        entry = self.models.get(sha256)
        entry = entry if isinstance(entry, dict) else {}
        ancestor = Ancestor(label or str(entry.get("name") or "(not recorded)"), sha256)
        recipe = entry.get("sd_merge_recipe")
        if isinstance(recipe, dict):
            ancestor.operation = _operation(recipe)
            if sha256 in path:
                ancestor.cut = "a cycle: it is recorded as its own ancestor"
            elif len(path) >= MAX_DEPTH:
                ancestor.cut = f"more than {MAX_DEPTH} generations"
            elif len(self.built) >= MAX_ANCESTORS:
                ancestor.cut = f"more than {MAX_ANCESTORS} ancestors"
        if label is None and ancestor.cut is None:
            self.built[sha256] = ancestor
        if isinstance(recipe, dict) and ancestor.cut is None:
            ancestor.inputs = self.ranked_inputs(recipe, path | {sha256})
        return ancestor

    def ranked_inputs(self, recipe: Mapping, path: set[str]) -> list[Ancestor]:
        hashes = [recipe.get(rank) for rank in RANKED_HASHES]
        return [self.ancestor(sha, path) for sha in hashes if isinstance(sha, str) and sha]


def _operation(recipe: Mapping) -> str:
    """A merge recipe's operation in words: A1111's method and multiplier, or
    sdrecipe's expression."""
    method = str(recipe.get("interp_method") or "unknown method")
    multiplier = recipe.get("multiplier")
    tool = recipe.get("type")
    text = method if multiplier is None else f"{method}, multiplier {multiplier}"
    return f"{text} ({tool})" if tool else text


def to_text(root: Ancestor) -> str:
    """The tree drawn with box-drawing characters, one model a line; an ancestor
    met again is one line that refers to its first appearance."""
    lines = [_line(root)]
    shown = {id(root)}

    def walk(node: Ancestor, prefix: str) -> None:
        for index, child in enumerate(node.inputs):
            last = index == len(node.inputs) - 1
            repeated = bool(child.inputs) and id(child) in shown
            note = f"  ({SHOWN_ABOVE})" if repeated else ""
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_line(child)}{note}")
            if not repeated:
                shown.add(id(child))
                walk(child, prefix + ("    " if last else "│   "))

    walk(root, "")
    return "\n".join(lines) + "\n"


def _line(node: Ancestor) -> str:
    """One model's line, what came from the file escaped so it stays one line."""
    hashes = f"  [{printable(node.autov2)}]" if node.autov2 else ""
    operation = f"  {printable(node.operation)}" if node.operation else ""
    cut = f"  (ancestors not shown: {node.cut})" if node.cut else ""
    return f"{printable(node.name)}{hashes}{operation}{cut}"


def to_json(root: Ancestor) -> str:
    return json.dumps(root.to_dict(), indent=2) + "\n"


def to_mermaid(root: Ancestor) -> str:
    """A Mermaid flowchart, ancestors below the model, arrows towards it; each
    ancestor is one box, whatever the number of models made from it."""
    lines = ["flowchart BT"]
    ids: dict[int, str] = {}

    def add(node: Ancestor) -> str:
        if id(node) in ids:
            return ids[id(node)]
        node_id = ids[id(node)] = f"m{len(ids)}"
        label = [node.name, node.autov2 or "", node.operation or ""]
        label.append(f"ancestors not shown: {node.cut}" if node.cut else "")
        text = mermaid_label([printable(part) for part in label if part])
        lines.append(f'  {node_id}["{text}"]')
        for child in node.inputs:
            lines.append(f"  {add(child)} --> {node_id}")
        return node_id

    add(root)
    return "\n".join(lines) + "\n"
