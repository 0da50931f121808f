"""Adapter algorithms, each one registered class: the factors that name it, how
they must fit together, the rank and size of its delta, the delta itself, and
whether that delta can stay factored (see `sdrecipe.adapters.low_rank`).

Formulas follow kohya's `merge_lora.py`, LyCORIS' functional API and the
A1111/ComfyUI loaders (README, "LoRA and LyCORIS"). Every delta is returned as
rows x everything else; the caller gives it the layer's shape. Torch is
imported when a delta is computed, not before: reading keys needs none.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from math import prod
from typing import TYPE_CHECKING, ClassVar, TypeVar

from sdrecipe.adapters.factor_shapes import FactorShapes

if TYPE_CHECKING:
    import torch

    from sdrecipe.adapters.naming import KeyPart

# A module's factor by parameter name, in the compute dtype (None where it has none).
Factor = Callable[[str], "torch.Tensor | None"]
Shapes = Mapping[str, tuple[int, ...]]
# (rows, elements, kernel) of a weight delta.
Size = tuple[int, int, tuple[int, ...]]
# Matrices (up scaled by alpha/r, down) whose product is rows of a delta.
Pair = tuple["torch.Tensor", "torch.Tensor"]


class Algorithm(ABC):
    """An adapter algorithm. The subclasses registered with `@adapter_algorithm`
    are those sdrecipe applies; each module holds the factors of exactly one."""

    name: ClassVar[str]
    # The parameter names of its factors, and a pattern for numbered ones.
    factors: ClassVar[tuple[str, ...]] = ()
    numbered: ClassVar[re.Pattern[str] | None] = None
    # A key's parameter that starts so and names no known factor is refused by name.
    prefix: ClassVar[str | None] = None
    # The factor that holds a delta of the layer's bias, where the algorithm has one.
    bias: ClassVar[str | None] = None
    # The naming convention its factors alone tell (for `inspect`).
    naming: ClassVar[str | None] = None

    def owns(self, parameter: str) -> bool:
        """True when `parameter` names one of the algorithm's factors."""
        if parameter in self.factors:
            return True
        return self.numbered is not None and self.numbered.fullmatch(parameter) is not None

    @abstractmethod
    def missing(self, found: Collection[str]) -> list[str]:
        """The factors a module with parameters `found` lacks."""

    @abstractmethod
    def check(self, factors: FactorShapes) -> None:
        """AdapterError unless the factors fit together: ranks and sides that agree,
        and each rank at most the rows plus the columns of the delta it makes."""

    def rank(self, shapes: Shapes) -> int | None:
        """The module's rank; None where no factor is low-rank."""
        return None

    @abstractmethod
    def weight_size(self, shapes: Shapes) -> Size:
        """(rows, elements, kernel) of the weight delta, from the factors' shapes
        alone; kernel is the trailing spatial shape where the factors fix it, else ()."""

    @abstractmethod
    def delta(self, factor: Factor) -> torch.Tensor:
        """The weight delta before DoRA, rows x everything else."""

    def bias_delta(self, factor: Factor) -> torch.Tensor:
        """The delta of the layer's bias, stored whole as the `bias` factor."""
        delta = None if self.bias is None else factor(self.bias)
        assert delta is not None, f"{self.name} has no bias delta"
        return delta

    def low_rank(self, keys: Collection[str], part: KeyPart, factor: Factor) -> list[Pair] | None:
        """The pairs whose products, stacked by rows, are the weight delta of a module
        with parameters `keys` at `part`; None where it is no such sum (it is made whole)."""
        return None


AlgorithmClass = TypeVar("AlgorithmClass", bound=type[Algorithm])
_REGISTRY: dict[str, Algorithm] = {}


def adapter_algorithm(cls: AlgorithmClass) -> AlgorithmClass:
    """Register an algorithm class: its one instance is what modules hold."""
    _REGISTRY[cls.name] = cls()
    return cls


def registered_algorithms() -> list[Algorithm]:
    """Every registered algorithm, in the order registered."""
    return list(_REGISTRY.values())


def algorithm_of(parameter: str) -> Algorithm | None:
    """The algorithm a factor belongs to (None for shared ones: alpha, DoRA)."""
    return next((a for a in _REGISTRY.values() if a.owns(parameter)), None)


def lora_scale(alpha: torch.Tensor | None, rank: int) -> float:
    """alpha / rank; 1 where the file stores no alpha (kohya, A1111, ComfyUI), and 0
    where it stores 0, as kohya's merge_lora, A1111 and ComfyUI apply it."""
    return 1.0 if alpha is None else float(alpha) / rank


def rebuild_tucker(core: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A CP/Tucker-form factor: core [r, r, *kernel], rows [r, out], columns [r, in]."""
    import torch

    return torch.einsum("i j ..., i p, j q -> p q ...", core, rows, columns)


def _first_of(names: tuple[str, ...], found: Collection[str]) -> str:
    """The first of `names` in `found` (the factor convention a module uses)."""
    return next(name for name in names if name in found)


def _scaled_pair(factor: Factor, up_name: str, down_name: str) -> Pair:
    """A LoRA pair as matrices, the scale on the small factor (up), not the product."""
    up, down = factor(up_name), factor(down_name)
    assert up is not None and down is not None
    rank = down.shape[0]
    up = up.reshape(up.shape[0], -1) * lora_scale(factor("alpha"), rank)
    return up, down.reshape(rank, -1)


# A LoRA's factors by convention: kohya, PEFT, XLabs; and LoCon's CP core.
LORA_UP = ("lora_up.weight", "lora_B.weight", "up.weight")
LORA_DOWN = ("lora_down.weight", "lora_A.weight", "down.weight")
LORA_MID = "lora_mid.weight"


@adapter_algorithm
class LoRA(Algorithm):
    """LoRA/LoCon: (alpha/r)·up·down, or through the CP core `lora_mid`."""

    name = "lora"
    factors = (*LORA_UP, *LORA_DOWN, LORA_MID)
    prefix = "lora_"

    def missing(self, found: Collection[str]) -> list[str]:
        """Both factors of one convention."""
        pairs = [{up, down} for up, down in zip(LORA_UP, LORA_DOWN, strict=True)]
        used = [pair for pair in pairs if pair & set(found)]
        if len(used) > 1:
            return [f"one convention: it has {', '.join(sorted(set().union(*used)))}"]
        if any(pair <= set(found) for pair in pairs):
            return []
        return sorted(next((p for p in pairs if p & set(found)), pairs[0]) - set(found))

    def check(self, factors: FactorShapes) -> None:
        up_name = _first_of(LORA_UP, factors.shapes)
        down_name = _first_of(LORA_DOWN, factors.shapes)
        up, down = factors.shape(up_name, 2), factors.shape(down_name, 2)
        columns = prod(down[1:])
        if LORA_MID in factors.shapes:
            mid = factors.shape(LORA_MID, 2)
            factors.agree(up_name, prod(up[1:]), LORA_MID, mid[0])
            factors.agree(down_name, down[0], LORA_MID, mid[1])
            columns *= prod(mid[2:])
            factors.bounded(LORA_MID, mid[0], up[0], columns)
        else:
            factors.agree(up_name, prod(up[1:]), down_name, down[0])
        factors.bounded(down_name, down[0], up[0], columns)

    def rank(self, shapes: Shapes) -> int | None:
        return shapes[_first_of(LORA_DOWN, shapes)][0]

    def weight_size(self, shapes: Shapes) -> Size:
        up = shapes[_first_of(LORA_UP, shapes)]
        down = shapes[_first_of(LORA_DOWN, shapes)]
        if LORA_MID in shapes:
            kernel = shapes[LORA_MID][2:]
            return up[0], up[0] * down[1] * prod(kernel), kernel
        return up[0], up[0] * prod(down[1:]), down[2:]

    def delta(self, factor: Factor) -> torch.Tensor:
        up = next(u for name in LORA_UP if (u := factor(name)) is not None)
        down = next(d for name in LORA_DOWN if (d := factor(name)) is not None)
        rank = down.shape[0]
        # The scale goes on the small factor, not the product: one pass fewer.
        up = up.reshape(up.shape[0], -1) * lora_scale(factor("alpha"), rank)
        down = down.reshape(rank, -1)
        mid = factor(LORA_MID)
        delta = up @ down if mid is None else rebuild_tucker(mid, up.T, down)
        return delta.reshape(up.shape[0], -1)

    def low_rank(self, keys: Collection[str], part: KeyPart, factor: Factor) -> list[Pair] | None:
        """One pair, where there is no CP core and the part's rows are in order."""
        if LORA_MID in keys or part.swapped:
            return None
        return [_scaled_pair(factor, _first_of(LORA_UP, keys), _first_of(LORA_DOWN, keys))]


# sd-scripts' split LoRA: `lora_up.{i}.weight` and `lora_down.{i}.weight` for part i.
SPLIT_PARAMETER = re.compile(r"lora_(up|down)\.(0|[1-9]\d{0,2})\.weight")


@adapter_algorithm
class SplitLoRA(Algorithm):
    """sd-scripts' split q/k/v (and MLP) LoRA of a fused layer: one pair per part,
    one alpha; (alpha/r)·up_i·down_i for each part i, stacked by rows."""

    name = "split_lora"
    numbered = SPLIT_PARAMETER
    prefix = "lora_"
    naming = "kohya-split"

    @staticmethod
    def parts(found: Collection[str]) -> int:
        """How many parts a module has (once `missing` found them numbered 0, 1,
        ... each with both factors: its pairs)."""
        return sum(1 for p in found if SPLIT_PARAMETER.fullmatch(p)) // 2

    def missing(self, found: Collection[str]) -> list[str]:
        """Parts numbered 0, 1, ...: the first number out of that order is missing."""
        numbers = sorted({int(m[2]) for p in found if (m := SPLIT_PARAMETER.fullmatch(p))})
        gap = next((i for i, number in enumerate(numbers) if number != i), None)
        if gap is not None:
            return [f"lora_up.{gap}.weight and lora_down.{gap}.weight"]
        needed = [f"lora_{side}.{i}.weight" for i in numbers for side in ("up", "down")]
        return [p for p in needed if p not in found]

    def check(self, factors: FactorShapes) -> None:
        """Each part's pair fits together, every part of one rank and one input width."""
        first = factors.shape("lora_down.0.weight", 2, exact=True)
        rows = 0
        for index in range(self.parts(factors.shapes)):
            up_name, down_name = f"lora_up.{index}.weight", f"lora_down.{index}.weight"
            up = factors.shape(up_name, 2, exact=True)
            down = factors.shape(down_name, 2, exact=True)
            factors.agree(up_name, up[1], down_name, down[0])
            factors.agree(down_name, down, "lora_down.0.weight", first)
            rows += up[0]
        factors.bounded("lora_down.0.weight", first[0], rows, first[1])

    def rank(self, shapes: Shapes) -> int | None:
        return shapes["lora_down.0.weight"][0]

    def weight_size(self, shapes: Shapes) -> Size:
        rows = sum(shapes[f"lora_up.{i}.weight"][0] for i in range(self.parts(shapes)))
        return rows, rows * prod(shapes["lora_down.0.weight"][1:]), ()

    def delta(self, factor: Factor) -> torch.Tensor:
        import torch

        pieces = []
        index = 0
        while (up := factor(f"lora_up.{index}.weight")) is not None:
            down = factor(f"lora_down.{index}.weight")
            assert down is not None
            pieces.append((up * lora_scale(factor("alpha"), down.shape[0])) @ down)
            index += 1
        return torch.cat(pieces)

    def low_rank(self, keys: Collection[str], part: KeyPart, factor: Factor) -> list[Pair] | None:
        """A pair per part, where the module patches the whole key."""
        if not part.whole:
            return None
        count = self.parts(keys)
        return [
            _scaled_pair(factor, f"lora_up.{i}.weight", f"lora_down.{i}.weight")
            for i in range(count)
        ]


@adapter_algorithm
class LoHa(Algorithm):
    """LoHa: (alpha/r)·(w1a·w1b) * (w2a·w2b), each half optionally in CP form."""

    name = "loha"
    factors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    prefix = "hada_"

    def missing(self, found: Collection[str]) -> list[str]:
        """Both halves' products, and a CP core for both halves or neither."""
        needed = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if ("hada_t1" in found) != ("hada_t2" in found):
            needed += ["hada_t1", "hada_t2"]
        return [p for p in needed if p not in found]

    def check(self, factors: FactorShapes) -> None:
        sides = []
        for half in "12":
            a_name, b_name = f"hada_w{half}_a", f"hada_w{half}_b"
            a = factors.shape(a_name, 2, exact=True)
            if "hada_t1" in factors.shapes:  # CP form: t [r, r', *kernel], a [r, out], b [r', in]
                t_name = f"hada_t{half}"
                core, b = factors.shape(t_name, 2), factors.shape(b_name, 2, exact=True)
                factors.agree(a_name, a[0], t_name, core[0])
                factors.agree(b_name, b[0], t_name, core[1])
                rows, columns = a[1], b[1] * prod(core[2:])
                factors.bounded(t_name, max(core[:2]), rows, columns)
                sides.append((a_name, rows, t_name, columns, core[2:]))
            else:
                b = factors.shape(b_name, 2)
                factors.agree(a_name, a[1], b_name, b[0])
                rows, columns = a[0], prod(b[1:])
                factors.bounded(b_name, b[0], rows, columns)
                sides.append((a_name, rows, b_name, columns, ()))
        (a1, rows1, b1, columns1, kernel1), (a2, rows2, b2, columns2, kernel2) = sides
        factors.agree(a1, rows1, a2, rows2)
        factors.agree(b1, (columns1, kernel1), b2, (columns2, kernel2))

    def rank(self, shapes: Shapes) -> int | None:
        return shapes["hada_w1_b"][0]

    def weight_size(self, shapes: Shapes) -> Size:
        if "hada_t1" in shapes:
            kernel = shapes["hada_t1"][2:]
            rows = shapes["hada_w1_a"][1]
            return rows, rows * shapes["hada_w1_b"][1] * prod(kernel), kernel
        rows = shapes["hada_w1_a"][0]
        return rows, rows * prod(shapes["hada_w1_b"][1:]), shapes["hada_w1_b"][2:]

    def delta(self, factor: Factor) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (
            factor(p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        )
        assert w1a is not None and w1b is not None and w2a is not None and w2b is not None
        t1, t2 = factor("hada_t1"), factor("hada_t2")
        rank = w1b.shape[0]
        w1a = w1a * lora_scale(factor("alpha"), rank)
        if t1 is not None and t2 is not None:
            first, second = rebuild_tucker(t1, w1a, w1b), rebuild_tucker(t2, w2a, w2b)
        else:
            first = w1a @ w1b.reshape(rank, -1)
            second = w2a @ w2b.reshape(w2b.shape[0], -1)
        delta = first.mul_(second)
        return delta.reshape(delta.shape[0], -1)


@adapter_algorithm
class LoKr(Algorithm):
    """LoKr: s·kron(w1, w2), each side whole or a product; s = alpha/r if a side is a
    product, else 1 (the alpha of an unfactorised LoKr is ignored, as in LyCORIS)."""

    name = "lokr"
    factors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    prefix = "lokr_"

    def missing(self, found: Collection[str]) -> list[str]:
        """Each side whole or as both its factors."""
        missing = []
        if "lokr_w1" not in found and not {"lokr_w1_a", "lokr_w1_b"} <= set(found):
            missing.append("lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        if "lokr_w2" not in found and not {"lokr_w2_a", "lokr_w2_b"} <= set(found):
            missing.append("lokr_w2 (or lokr_w2_a and lokr_w2_b)")
        return missing

    def check(self, factors: FactorShapes) -> None:
        if "lokr_w1" in factors.shapes:
            factors.shape("lokr_w1", 2, exact=True)
        else:
            a = factors.shape("lokr_w1_a", 2, exact=True)
            b = factors.shape("lokr_w1_b", 2, exact=True)
            factors.agree("lokr_w1_a", a[1], "lokr_w1_b", b[0])
            factors.bounded("lokr_w1_b", b[0], a[0], b[1])
        if "lokr_w2" in factors.shapes:
            factors.shape("lokr_w2", 2)
        elif "lokr_t2" in factors.shapes:  # CP form: t [r, r', *kernel], a [r, out], b [r', in]
            core = factors.shape("lokr_t2", 2)
            a = factors.shape("lokr_w2_a", 2, exact=True)
            b = factors.shape("lokr_w2_b", 2, exact=True)
            factors.agree("lokr_w2_a", a[0], "lokr_t2", core[0])
            factors.agree("lokr_w2_b", b[0], "lokr_t2", core[1])
            factors.bounded("lokr_t2", max(core[:2]), a[1], b[1] * prod(core[2:]))
        else:
            a = factors.shape("lokr_w2_a", 2, exact=True)
            b = factors.shape("lokr_w2_b", 2)
            factors.agree("lokr_w2_a", a[1], "lokr_w2_b", b[0])
            factors.bounded("lokr_w2_b", b[0], a[0], prod(b[1:]))

    def rank(self, shapes: Shapes) -> int | None:
        """The rank of a side stored as a product; None when both are stored whole."""
        for parameter in ("lokr_w1_b", "lokr_w2_b"):
            if parameter in shapes:
                return shapes[parameter][0]
        return None

    def weight_size(self, shapes: Shapes) -> Size:
        first = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        second = self._second_shape(shapes)
        rows = first[0] * second[0]
        return rows, rows * first[1] * prod(second[1:]), second[2:]

    @staticmethod
    def _second_shape(shapes: Shapes) -> tuple[int, ...]:
        """The second Kronecker factor's shape, stored whole, as a product, or in CP form."""
        if "lokr_w2" in shapes:
            return shapes["lokr_w2"]
        if "lokr_t2" in shapes:
            return (shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1], *shapes["lokr_t2"][2:])
        return (shapes["lokr_w2_a"][0], *shapes["lokr_w2_b"][1:])

    def delta(self, factor: Factor) -> torch.Tensor:
        import torch

        w1 = factor("lokr_w1")
        rank = None
        if w1 is None:
            w1a, w1b = factor("lokr_w1_a"), factor("lokr_w1_b")
            assert w1a is not None and w1b is not None
            w1, rank = w1a @ w1b, w1b.shape[0]
        w2 = factor("lokr_w2")
        if w2 is None:
            w2a, w2b, t2 = factor("lokr_w2_a"), factor("lokr_w2_b"), factor("lokr_t2")
            assert w2a is not None and w2b is not None
            rank = w2b.shape[0]
            if t2 is not None:
                w2 = rebuild_tucker(t2, w2a, w2b)
            else:
                w2 = (w2a @ w2b.reshape(rank, -1)).reshape(w2a.shape[0], *w2b.shape[1:])
        scale = 1.0 if rank is None else lora_scale(factor("alpha"), rank)
        w1 = w1 * scale
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1.contiguous(), w2.contiguous())
        return delta.reshape(delta.shape[0], -1)


class Whole(Algorithm):
    """A delta stored whole as the `weight` factor, and optionally one of the bias
    (callers never modify what a reader returns, so a float32 delta is not copied)."""

    weight: ClassVar[str]

    def missing(self, found: Collection[str]) -> list[str]:
        """A weight or a bias delta."""
        return [] if self.weight in found or self.bias in found else [self.weight]

    def check(self, factors: FactorShapes) -> None:
        for parameter in (self.weight, self.bias):
            if parameter in factors.shapes:
                factors.shape(parameter, 1)

    def weight_size(self, shapes: Shapes) -> Size:
        whole = shapes[self.weight]
        return whole[0], prod(whole), whole[2:]

    def delta(self, factor: Factor) -> torch.Tensor:
        delta = factor(self.weight)
        assert delta is not None
        return delta.reshape(delta.shape[0], -1)


@adapter_algorithm
class Full(Whole):
    """A full delta of a layer (`diff`) and of its bias (`diff_b`)."""

    name = "full"
    weight = "diff"
    bias = "diff_b"
    factors = (weight, bias)


@adapter_algorithm
class Norm(Whole):
    """A norm layer's delta (`w_norm`) and its bias's (`b_norm`)."""

    name = "norm"
    weight = "w_norm"
    bias = "b_norm"
    factors = (weight, bias)
