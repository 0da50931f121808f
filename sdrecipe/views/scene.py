"""A small vector scene (boxes, lines, text) drawn once and rendered twice:
as SVG text, and as PNG through Pillow, so pictures need no system binary.

Text is measured with Pillow's built-in font in both renderers, so boxes fit
their labels in the PNG and (with the same sans-serif metrics near enough) in
the SVG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from PIL import ImageFont

Anchor = Literal["start", "middle", "end"]
# Arial's metrics are nearest to Pillow's built-in font, which sizes the boxes.
FONT_FAMILY = "Arial, Helvetica, Liberation Sans, sans-serif"


@dataclass(frozen=True)
class Box:
    """A filled rectangle with an outline (`stroke` None: no outline); `key`
    names what it stands for in the SVG (`data-key`), for a page to link."""

    x: float
    y: float
    width: float
    height: float
    fill: str
    stroke: str | None = "#333333"
    radius: float = 0.0
    key: str | None = None


@dataclass(frozen=True)
class Line:
    """A polyline, with an arrowhead at its end when `arrow`."""

    points: tuple[tuple[float, float], ...]
    stroke: str = "#555555"
    arrow: bool = False


@dataclass(frozen=True)
class Text:
    """One line of text; `y` is its baseline's middle (the text is centred on it)."""

    x: float
    y: float
    text: str
    size: int = 12
    anchor: Anchor = "start"
    fill: str = "#111111"
    bold: bool = False


@dataclass
class Scene:
    """Items in drawing order on a white canvas of `width` by `height` pixels."""

    width: int
    height: int
    items: list[Box | Line | Text] = field(default_factory=list)

    def add(self, *items: Box | Line | Text) -> None:
        self.items.extend(items)

    def to_svg(self) -> str:
        """The scene as a standalone SVG document."""
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            f'font-family="{FONT_FAMILY}">',
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
            'markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
            '<path d="M 0 0 L 10 5 L 0 10 z" fill="#555555"/></marker></defs>',
            f'<rect width="{self.width}" height="{self.height}" fill="#ffffff"/>',
        ]
        for item in self.items:
            parts.append(_svg_item(item))
        parts.append("</svg>")
        return "\n".join(parts) + "\n"

    def to_png(self, path: Path, text: Mapping[str, str] | None = None) -> None:
        """Render the scene to a PNG file at `path`, with `text` as its text chunks."""
        from PIL import Image, ImageDraw
        from PIL.PngImagePlugin import PngInfo

        image = Image.new("RGB", (self.width, self.height), "#ffffff")
        draw = ImageDraw.Draw(image)
        for item in self.items:
            if isinstance(item, Box):
                shape = [item.x, item.y, item.x + item.width, item.y + item.height]
                draw.rounded_rectangle(
                    shape, radius=item.radius, fill=item.fill, outline=item.stroke, width=1
                )
            elif isinstance(item, Line):
                draw.line(item.points, fill=item.stroke, width=1)
                if item.arrow and len(item.points) > 1:
                    draw.polygon(_arrowhead(item.points[-2], item.points[-1]), fill=item.stroke)
            else:
                anchor = {"start": "lm", "middle": "mm", "end": "rm"}[item.anchor]
                draw.text(
                    (item.x, item.y), item.text, fill=item.fill, font=font(item.size), anchor=anchor
                )
        chunks = PngInfo()
        for key, value in (text or {}).items():
            chunks.add_text(key, value)
        image.save(path, format="PNG", pnginfo=chunks)


def _svg_item(item: Box | Line | Text) -> str:
    if isinstance(item, Box):
        stroke = f' stroke="{item.stroke}"' if item.stroke else ""
        key = f' data-key="{escape(item.key, {chr(34): "&quot;"})}"' if item.key else ""
        return (
            f'<rect x="{item.x:g}" y="{item.y:g}" width="{item.width:g}" '
            f'height="{item.height:g}" rx="{item.radius:g}" fill="{item.fill}"{stroke}{key}/>'
        )
    if isinstance(item, Line):
        points = " ".join(f"{x:g},{y:g}" for x, y in item.points)
        marker = ' marker-end="url(#arrow)"' if item.arrow else ""
        return f'<polyline points="{points}" fill="none" stroke="{item.stroke}"{marker}/>'
    weight = ' font-weight="bold"' if item.bold else ""
    return (
        f'<text x="{item.x:g}" y="{item.y:g}" font-size="{item.size}" '
        f'text-anchor="{item.anchor}" dominant-baseline="central" fill="{item.fill}"'
        f"{weight}>{escape(item.text)}</text>"
    )


def _arrowhead(start: tuple[float, float], end: tuple[float, float]) -> list[tuple[float, float]]:
    """The triangle of an arrowhead 8 px long pointing from `start` to `end`."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = max((dx * dx + dy * dy) ** 0.5, 1e-9)
    ux, uy = dx / length, dy / length
    back = (end[0] - 8 * ux, end[1] - 8 * uy)
    return [end, (back[0] - 4 * uy, back[1] + 4 * ux), (back[0] + 4 * uy, back[1] - 4 * ux)]


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable font at `size` pixels."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def text_width(text: str, size: int) -> float:
    """The width of `text` at `size` pixels, in the built-in font."""
    return float(font(size).getlength(text))
