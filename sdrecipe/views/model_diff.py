"""`sdrecipe diff`: how much models differ from a reference, per block, per
component and per key, streamed one tensor at a time, and a heatmap of it.

For each group of keys (a block of the family's block table, a component, or
one key) over the floating tensors both models have with the same shape:
relative L2 change ||B - A|| / ||A||, cosine similarity <A, B> / (||A|| ||B||), and
the largest absolute change. Sums run in float64, a few million elements at a
time, so memory stays bounded whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrecipe.arch import component_of
from sdrecipe.arch.blocks import block_ids, block_of
from sdrecipe.arch.detect import detect
from sdrecipe.errors import RecipeError
from sdrecipe.io.adapter_files import is_adapter_path
from sdrecipe.io.model_reader import ModelReader, with_model_prefix
from sdrecipe.io.readers import open_model
from sdrecipe.views.scene import Box, Scene, Text, text_width

CHUNK_ELEMENTS = 1 << 22
MEASURES = ("relative_l2", "cosine", "max_abs")


@dataclass
class Sums:
    """Running sums over a group of tensors."""

    a2: float = 0.0
    b2: float = 0.0
    ab: float = 0.0
    d2: float = 0.0
    max_abs: float = 0.0
    keys: int = 0
    parameters: int = 0

    def add(self, other: Sums) -> None:
        self.a2 += other.a2
        self.b2 += other.b2
        self.ab += other.ab
        self.d2 += other.d2
        self.max_abs = max(self.max_abs, other.max_abs)
        self.keys += other.keys
        self.parameters += other.parameters

    def measures(self) -> dict[str, float | int | None]:
        """The measures of the group; a ratio with a zero denominator is None."""
        norms = math.sqrt(self.a2 * self.b2)
        return {
            "relative_l2": math.sqrt(self.d2 / self.a2) if self.a2 else None,
            "cosine": self.ab / norms if norms else None,
            "max_abs": self.max_abs,
            "keys": self.keys,
            "parameters": self.parameters,
        }


def tensor_sums(a: torch.Tensor, b: torch.Tensor) -> Sums:
    """The sums of one pair of tensors of the same shape, in float64 pieces."""
    sums = Sums(keys=1, parameters=a.numel())
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        piece_a = flat_a[start : start + CHUNK_ELEMENTS].double()
        piece_b = flat_b[start : start + CHUNK_ELEMENTS].double()
        difference = piece_b - piece_a
        sums.a2 += float(piece_a.dot(piece_a))
        sums.b2 += float(piece_b.dot(piece_b))
        sums.ab += float(piece_a.dot(piece_b))
        sums.d2 += float(difference.dot(difference))
        if difference.numel():
            sums.max_abs = max(sums.max_abs, float(difference.abs().max()))
    return sums


@dataclass
class Comparison:
    """One model B against the reference A."""

    path: Path
    blocks: dict[str, Sums] = field(default_factory=dict)
    components: dict[str, Sums] = field(default_factory=dict)
    keys: dict[str, Sums] = field(default_factory=dict)
    total: Sums = field(default_factory=Sums)
    only_in_reference: list[str] = field(default_factory=list)
    only_in_model: list[str] = field(default_factory=list)
    shape_differs: list[str] = field(default_factory=list)

    def add(self, key: str, family: str, sums: Sums) -> None:
        """Count one key's sums in its key, component, block and the total."""
        self.keys[key] = sums
        self.total.add(sums)
        self.components.setdefault(component_of(key, family), Sums()).add(sums)
        block = block_of(family, key)
        if block is not None:
            self.blocks.setdefault(block, Sums()).add(sums)

    def to_dict(self, by_key: bool) -> dict[str, object]:
        data: dict[str, object] = {
            "model": str(self.path),
            "total": self.total.measures(),
            "blocks": {name: sums.measures() for name, sums in self.blocks.items()},
            "components": {name: sums.measures() for name, sums in self.components.items()},
            "only_in_reference": self.only_in_reference,
            "only_in_model": self.only_in_model,
            "shape_differs": self.shape_differs,
        }
        if by_key:
            data["keys"] = {key: sums.measures() for key, sums in self.keys.items()}
        return data


@dataclass(frozen=True)
class ModelDiff:
    """The reference, its family, and one comparison per model."""

    reference: Path
    family: str
    comparisons: tuple[Comparison, ...]

    @property
    def block_order(self) -> tuple[str, ...]:
        """The family's block IDs in table order (empty without a block table)."""
        return block_ids(self.family)

    def to_dict(self, by_key: bool = False) -> dict[str, object]:
        return {
            "reference": str(self.reference),
            "family": self.family,
            "models": [comparison.to_dict(by_key) for comparison in self.comparisons],
        }


def diff_models(
    reference: Path,
    models: Sequence[Path],
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    force: bool = False,
) -> ModelDiff:
    """Compare each of `models` with `reference`, reading each key once per file;
    models of another family than the reference's are refused unless `force`."""
    for path in (reference, *models):
        if is_adapter_path(path):
            raise RecipeError(
                f"{path} is a LoRA / LyCORIS file, not a model: bake it into one first "
                "(`sdrecipe bake`), or see it with `sdrecipe inspect --against`"
            )
    base = open_model(reference)
    infos = base.infos()
    found = detect(infos, base.metadata)
    family = found.family
    readers: list[ModelReader] = [open_model(path) for path in models]
    for index, (path, reader) in enumerate(zip(models, readers, strict=True)):
        theirs = detect(reader.infos(), reader.metadata)
        if theirs.family != family and not force:
            raise RecipeError(
                f"{path} is {theirs.family} and the reference {reference} is {family}: models "
                "of different families share few keys, so a measure over them means little; "
                "pass --force to compare them anyway"
            )
        if theirs.family == family and theirs.model_prefix != found.model_prefix:
            # A bare transformer file (BFL's Flux.1) against a prefixed checkpoint.
            readers[index] = with_model_prefix(reader, theirs.model_prefix, found.model_prefix)
    others = [reader.infos() for reader in readers]
    comparisons = [Comparison(path) for path in models]
    for comparison, other in zip(comparisons, others, strict=True):
        comparison.only_in_reference = [key for key in infos if key not in other]
        comparison.only_in_model = [key for key in other if key not in infos]
    advance = progress("diff", len(infos)) if progress else lambda done: None
    with _one_thread():
        for key, info in infos.items():
            reference_tensor = None
            for reader, other, comparison in zip(readers, others, comparisons, strict=True):
                theirs = other.get(key)
                if not info.is_floating or theirs is None or not theirs.is_floating:
                    continue
                if theirs.shape != info.shape:
                    comparison.shape_differs.append(key)
                    continue
                if reference_tensor is None:
                    reference_tensor = base.tensor(key)
                comparison.add(key, family, tensor_sums(reference_tensor, reader.tensor(key)))
            advance(1)
    ids = block_ids(family)
    for comparison in comparisons:
        comparison.blocks = {b: comparison.blocks[b] for b in ids if b in comparison.blocks}
    return ModelDiff(reference, family, tuple(comparisons))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's operations on this thread alone, as a build's workers do: each
    is one pass over a tensor, too short to share, and handing it to other
    threads cost ten times the arithmetic once other processes held the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# A sequential colour scale (viridis' anchors), from the smallest value to the largest.
SCALE = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
CELL_WIDTH = 52
CELL_HEIGHT = 26
MEASURE_TITLES = {
    "relative_l2": "relative L2 change ||B - A|| / ||A||",
    "cosine": "cosine similarity of A and B",
    "max_abs": "largest absolute change",
}


def heatmap(diff: ModelDiff, measure: str = "relative_l2") -> Scene:
    """One row per model, one column per block (per component for a family
    without a block table), each cell coloured by `measure` and labelled."""
    by_block = bool(diff.block_order)
    columns = list(diff.block_order) if by_block else _component_columns(diff)
    rows = [
        [_group(comparison, column, by_block).measures()[measure] for column in columns]
        for comparison in diff.comparisons
    ]
    known = [value for row in rows for value in row if value is not None]
    low, high = (min(known), max(known)) if known else (0.0, 1.0)
    labels = [comparison.path.name for comparison in diff.comparisons]
    left = 20 + max(text_width(label, 12) for label in labels) + 12
    top = 70
    width = int(left + CELL_WIDTH * len(columns) + 20)
    scene = Scene(max(width, 480), int(top + CELL_HEIGHT * len(rows) + 70))
    scene.add(
        Text(20, 20, f"{MEASURE_TITLES[measure]}, against {diff.reference.name}", 14, bold=True)
    )
    for index, column in enumerate(columns):
        x = left + CELL_WIDTH * (index + 0.5)
        scene.add(Text(x, top - 12, column, 11, anchor="middle"))
    for row_index, (label, row) in enumerate(zip(labels, rows, strict=True)):
        y = top + CELL_HEIGHT * row_index
        scene.add(Text(left - 12, y + CELL_HEIGHT / 2, label, 12, anchor="end"))
        for index, value in enumerate(row):
            x = left + CELL_WIDTH * index
            fraction = 0.0 if value is None or high == low else (value - low) / (high - low)
            fill = "#ffffff" if value is None else colour_at(fraction)
            scene.add(Box(x, y, CELL_WIDTH, CELL_HEIGHT, fill, stroke="#ffffff"))
            text = "-" if value is None else f"{value:.2g}"
            ink = "#ffffff" if value is not None and fraction < 0.6 else "#111111"
            scene.add(Text(x + CELL_WIDTH / 2, y + CELL_HEIGHT / 2, text, 10, "middle", ink))
    legend_y = top + CELL_HEIGHT * len(rows) + 24
    for step in range(100):
        scene.add(Box(left + step * 2, legend_y, 2, 12, colour_at(step / 99), stroke=None))
    scene.add(Text(left - 6, legend_y + 6, f"{low:.2g}", 11, anchor="end"))
    scene.add(Text(left + 206, legend_y + 6, f"{high:.2g}", 11))
    return scene


def _component_columns(diff: ModelDiff) -> list[str]:
    found: dict[str, None] = {}
    for comparison in diff.comparisons:
        found.update(dict.fromkeys(comparison.components))
    return list(found)


def _group(comparison: Comparison, column: str, by_block: bool) -> Sums:
    groups = comparison.blocks if by_block else comparison.components
    return groups.get(column, Sums())


def colour_at(fraction: float) -> str:
    """The scale's colour at `fraction` in [0, 1], interpolated between anchors."""
    position = min(max(fraction, 0.0), 1.0) * (len(SCALE) - 1)
    index = min(int(position), len(SCALE) - 2)
    weight = position - index
    start, end = SCALE[index], SCALE[index + 1]
    channels = [
        round(int(start[i : i + 2], 16) * (1 - weight) + int(end[i : i + 2], 16) * weight)
        for i in (1, 3, 5)
    ]
    return "#" + "".join(f"{channel:02x}" for channel in channels)
