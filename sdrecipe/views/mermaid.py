"""Mermaid text: labels escaped the way Mermaid's flowcharts read them."""

from __future__ import annotations


def mermaid_label(lines: list[str]) -> str:
    """`lines` as one quoted-label body: entities for `&`, `"` and `<`, and
    `<br/>` between lines."""
    escaped = (
        line.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;") for line in lines
    )
    return "<br/>".join(escaped)
