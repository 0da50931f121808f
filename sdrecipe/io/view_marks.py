"""The mark that every view file sdrecipe writes carries, so that a later view
may replace it and nothing else: a first comment line in SVG, Mermaid and
Graphviz text, a first `generator` field in JSON, a text chunk in PNG. Reads
at most the first 64 KiB of a file; imports nothing heavy."""

from __future__ import annotations

import struct
from pathlib import Path

MARK = "sdrecipe view"
# How a text view of each kind begins when sdrecipe wrote it.
TEXT_HEADS = {
    "svg": f"<!-- {MARK} -->\n",
    "mermaid": f"%% {MARK}\n",
    "dot": f"// {MARK}\n",
    "json": f'{{\n  "generator": "{MARK}"',
}
JSON_FIELD = "generator"
PNG_TEXT = ("Software", MARK)
VIEW_KINDS = (*TEXT_HEADS, "png")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD_BYTES = 64 * 1024


def carries_mark(path: Path, kind: str) -> bool:
    """True when the file at `path` is a `kind` view that sdrecipe wrote."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if kind == "png":
        return _png_marked(head)
    return head.startswith(TEXT_HEADS[kind].encode())


def _png_marked(head: bytes) -> bool:
    """True when a PNG's chunks before its image data include sdrecipe's text."""
    if not head.startswith(_PNG_SIGNATURE):
        return False
    wanted = "\0".join(PNG_TEXT).encode("latin-1")
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(head):
        length, chunk = struct.unpack(">I4s", head[position : position + 8])
        if chunk == b"IDAT":
            return False
        if chunk == b"tEXt" and head[position + 8 : position + 8 + length] == wanted:
            return True
        position += 12 + length
    return False
