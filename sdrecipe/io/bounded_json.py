"""JSON from files sdrecipe did not write, read with a stated nesting limit.

A header or metadata field nested thousands of levels deep would otherwise end
in Python's RecursionError, here or wherever the value is used later.
"""

from __future__ import annotations

import json

# sdrecipe's own structures nest at most 6 levels (lineage inside metadata).
MAX_JSON_DEPTH = 32


def load_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    """`json.loads`, raising ValueError for a document nested deeper than `max_depth`."""
    too_deep = ValueError(f"the JSON is nested more than {max_depth} levels deep")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if level > max_depth:
            raise too_deep
        if isinstance(item, dict):
            pending.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, level + 1) for child in item)
    return value
