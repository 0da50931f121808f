"""YAML loading that remembers the line of every mapping key and list item."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdrecipe.errors import RecipeError

YamlPath = tuple[str | int, ...]


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
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise RecipeError("the recipe is empty", file, 1)
        lines: dict[YamlPath, int] = {}
        data = _construct(loader, root, (), lines, file, keep_text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"YAML syntax error: {problem}", file, mark.line + 1 if mark else None
        ) from None
    finally:
        loader.dispose()
    return YamlDocument(data, lines)


def _construct(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: YamlPath,
    lines: dict[YamlPath, int],
    file: Path,
    keep_text: Callable[[YamlPath], bool],
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool):
                raise RecipeError("mapping keys must be plain names", file, key_line)
            if key in result:
                raise RecipeError(f"duplicate key {key!r}", file, key_line)
            lines[(*path, key)] = key_line
            result[key] = _construct(loader, value_node, (*path, key), lines, file, keep_text)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(loader, item, (*path, index), lines, file, keep_text)
            for index, item in enumerate(node.value)
        ]
    if isinstance(node, yaml.ScalarNode) and node.style is None and keep_text(path):
        return node.value
    return loader.construct_object(node, deep=True)
