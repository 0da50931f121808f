"""YAML loading that remembers the line of every mapping key and list item."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdrecipe.errors import RecipeError

YamlPath = tuple[str | int, ...]

# Bounds that keep a hostile recipe cheap to reject: a few hundred bytes of
# nested aliases can otherwise expand to billions of values.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit, and floats as YAML 1.2 writes
    them: `5e-1` is a number, not the string YAML 1.1 makes of it."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise RecipeError(
                    f"the recipe nests lists or mappings more than {MAX_YAML_DEPTH} levels deep",
                    None,
                    self.peek_event().start_mark.line + 1,
                )
            return super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= 1

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Merge keys (`<<: *defaults`), refused once they expand without bound."""
        super().flatten_mapping(node)
        if len(node.value) > MAX_YAML_VALUES:
            raise RecipeError(
                f"merge keys expand a mapping to more than {MAX_YAML_VALUES:,} entries",
                None,
                node.start_mark.line + 1,
            )


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class YamlDocument:
    """Plain Python data plus a map from each path in it to its 1-based source line."""

    data: Any
    lines: dict[YamlPath, int]

    def line_of(self, path: YamlPath) -> int | None:
        """Line of the longest prefix of `path` that the document has."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None


def load_yaml(
    text: str, file: Path, keep_text: Callable[[YamlPath], bool] = lambda path: False
) -> YamlDocument:
    """Parse one YAML document safely; duplicate keys and syntax errors name file and line.

    Unquoted scalars at paths where `keep_text` is true stay the text as written,
    so a hash such as 0123... or a file named `1.safetensors` is not read as a number.
    """
    try:
        loader = _RecipeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise RecipeError(_unprintable(text, exc.position), file, line) from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise RecipeError("the recipe is empty", file, 1)
        lines: dict[YamlPath, int] = {}
        data = _Constructor(loader, file, keep_text, lines).value(root, ())
    except RecipeError as exc:
        raise RecipeError(exc.message, file, exc.line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"YAML syntax error: {problem}", file, mark.line + 1 if mark else None
        ) from None
    finally:
        loader.dispose()
    return YamlDocument(data, lines)


def _unprintable(text: str, position: int) -> str:
    """Why YAML refuses the character at `position` of `text`, in words."""
    line_start = text.rfind("\n", 0, position) + 1
    return (
        f"the recipe holds the control character U+{ord(text[position]):04X} at column "
        f"{position - line_start + 1}; a recipe is YAML text without control characters "
        "(is this a model or another binary file?)"
    )


class _Constructor:
    """Builds plain data from the node tree, recording lines, and counting
    values so that aliases cannot make it expand without bound."""

    def __init__(
        self,
        loader: yaml.SafeLoader,
        file: Path,
        keep_text: Callable[[YamlPath], bool],
        lines: dict[YamlPath, int],
    ):
        self.loader = loader
        self.file = file
        self.keep_text = keep_text
        self.lines = lines
        self.count = 0

    def value(self, node: yaml.Node, path: YamlPath) -> Any:
        self.count += 1
        line = node.start_mark.line + 1
        if len(path) > MAX_YAML_DEPTH:
            raise RecipeError(
                f"the recipe nests values more than {MAX_YAML_DEPTH} levels deep (through aliases)",
                self.file,
                line,
            )
        if self.count > MAX_YAML_VALUES:
            raise RecipeError(
                f"the recipe expands to more than {MAX_YAML_VALUES:,} values "
                "(nested aliases?); recipes need far fewer",
                self.file,
                line,
            )
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            written: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeError("mapping keys must be plain names", self.file, key_line)
                key = self.loader.construct_object(key_node)
                if key in written:
                    raise RecipeError(f"duplicate key {key!r}", self.file, key_line)
                written.add(key)
            # Merge keys (`<<: *defaults`) come first; keys written here override them.
            self.loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                result[key] = self.value(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, (*path, index)) for index, item in enumerate(node.value)]
        if node.style is None and self.keep_text(path):
            return node.value
        return self.loader.construct_object(node)
