"""The modules of an adapter file, found from its keys (never its file name).

An adapter key is `<stem>.<parameter>`: the stem names the patched layer
(`lora_unet_down_blocks_0_attentions_0_proj_in`, `unet.down_blocks.0...to_q`),
the parameter says which factor of which algorithm it is. Imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import prod
from typing import NoReturn

from sdrecipe.io.tensor_info import TensorInfo

# Parameter name → algorithm. `alpha` and `dora_scale` go with any algorithm.
ALGORITHM_OF_PARAMETER = {
    "lora_up.weight": "lora",
    "lora_down.weight": "lora",
    "lora_mid.weight": "lora",
    "lora_B.weight": "lora",
    "lora_A.weight": "lora",
    "up.weight": "lora",  # XLabs
    "down.weight": "lora",
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "diff": "full",
    "diff_b": "full",
    "w_norm": "norm",
    "b_norm": "norm",
}
# A LoRA's factors by convention: kohya, PEFT, XLabs.
LORA_UP = ("lora_up.weight", "lora_B.weight", "up.weight")
LORA_DOWN = ("lora_down.weight", "lora_A.weight", "down.weight")
# sd-scripts' split q/k/v (and MLP) LoRA of a fused layer: one pair per part,
# `lora_up.{i}.weight` and `lora_down.{i}.weight`, one alpha.
SPLIT_PARAMETER = re.compile(r"lora_(up|down)\.(0|[1-9]\d{0,2})\.weight")
SHARED_PARAMETERS = ("alpha", "dora_scale")
FACTOR_LIKE = re.compile(r"\.(lora_|hada_|lokr_)[^.]*(\.[^.]+){0,2}$")
# Parameters of algorithms sdrecipe does not apply, so that a file holding them
# is refused by name rather than half applied.
UNSUPPORTED_PARAMETERS = {
    "on_input": "(IA)^3",
    "oft_blocks": "OFT",
    "oft_R": "BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "lora_magnitude_vector": "PEFT DoRA",
}
# Parameters that change a layer's bias rather than its weight.
BIAS_PARAMETERS = ("diff_b", "b_norm")
_KNOWN = sorted(
    [*ALGORITHM_OF_PARAMETER, *SHARED_PARAMETERS, *UNSUPPORTED_PARAMETERS], key=len, reverse=True
)
# Checkpoint prefixes: a file with any of these keys is a model, not an adapter.
MODEL_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.",
)


class AdapterError(ValueError):
    """An adapter file that cannot be applied as it is."""


@dataclass(frozen=True)
class AdapterModule:
    """One patched layer: its stem, algorithm, and the file key of each parameter."""

    stem: str
    algorithm: str
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def dora(self) -> bool:
        """True when the module carries DoRA's magnitude vector."""
        return "dora_scale" in self.keys

    @property
    def changes_weight(self) -> bool:
        """True when the module has a delta for the layer's weight."""
        return any(p not in (*SHARED_PARAMETERS, *BIAS_PARAMETERS) for p in self.keys)

    @property
    def changes_bias(self) -> bool:
        """True when the module has a delta for the layer's bias."""
        return any(p in BIAS_PARAMETERS for p in self.keys)

    def rank(self, infos: Mapping[str, TensorInfo]) -> int | None:
        """The rank of a low-rank module (None for full and norm deltas, and a
        LoKr whose two halves are both stored whole)."""
        for parameter in (*LORA_DOWN, "lora_down.0.weight", "hada_w1_b", "lokr_w1_b"):
            if parameter in self.keys:
                return infos[self.keys[parameter]].shape[0]
        if "lokr_w2_b" in self.keys:
            return infos[self.keys["lokr_w2_b"]].shape[0]
        return None

    def weight_size(self, infos: Mapping[str, TensorInfo]) -> tuple[int, int, tuple[int, ...]]:
        """(rows, elements, kernel) of the weight delta, from the factors' shapes alone;
        kernel is the trailing spatial shape where the factors fix it, else ()."""
        shape = {parameter: infos[key].shape for parameter, key in self.keys.items()}
        if self.algorithm == "split_lora":
            ups = [shape[f"lora_up.{i}.weight"] for i in range(split_count(self.keys))]
            rows = sum(up[0] for up in ups)
            down = shape["lora_down.0.weight"]
            return rows, rows * prod(down[1:]), ()
        if self.algorithm == "lora":
            up = shape[first_of(LORA_UP, shape)]
            down = shape[first_of(LORA_DOWN, shape)]
            if "lora_mid.weight" in shape:
                kernel = shape["lora_mid.weight"][2:]
                return up[0], up[0] * down[1] * prod(kernel), kernel
            return up[0], up[0] * prod(down[1:]), down[2:]
        if self.algorithm == "loha":
            if "hada_t1" in shape:
                kernel = shape["hada_t1"][2:]
                rows = shape["hada_w1_a"][1]
                return rows, rows * shape["hada_w1_b"][1] * prod(kernel), kernel
            rows = shape["hada_w1_a"][0]
            return rows, rows * prod(shape["hada_w1_b"][1:]), shape["hada_w1_b"][2:]
        if self.algorithm == "lokr":
            first = shape.get("lokr_w1") or (shape["lokr_w1_a"][0], shape["lokr_w1_b"][1])
            second = _lokr_second_shape(shape)
            rows = first[0] * second[0]
            return rows, rows * first[1] * prod(second[1:]), second[2:]
        whole = shape.get("diff") or shape["w_norm"]
        return whole[0], prod(whole), whole[2:]


def check_factor_shapes(module: AdapterModule, infos: Mapping[str, TensorInfo]) -> None:
    """AdapterError unless `module`'s factors fit together, from the header alone:
    none empty, `alpha` one number, ranks and sides that agree, and each rank at
    most the rows plus the columns of the delta it makes (a rank above
    min(rows, columns) adds nothing; one far above it only promises work)."""
    factors = _Factors(module.stem, {p: infos[key].shape for p, key in module.keys.items()})
    factors.check_sizes()
    CHECKS[module.algorithm](factors)


class _Factors:
    """One module's factor shapes, and the checks that they fit together."""

    def __init__(self, stem: str, shapes: Mapping[str, tuple[int, ...]]):
        self.stem = stem
        self.shapes = shapes

    def fail(self, text: str) -> NoReturn:
        raise AdapterError(f"module {self.stem}: {text}")

    def check_sizes(self) -> None:
        """No empty factor; one number as alpha."""
        for parameter, shape in self.shapes.items():
            if parameter == "alpha" and prod(shape) != 1:
                self.fail(f"alpha has shape {list(shape)}; it must be one number")
            if parameter != "alpha" and 0 in shape:
                self.fail(f"{parameter} has shape {list(shape)}, which holds nothing (rank 0?)")

    def shape(self, parameter: str, dims: int, exact: bool = False) -> tuple[int, ...]:
        """The shape of `parameter`, which must have `dims` dimensions (or more unless `exact`)."""
        shape = self.shapes[parameter]
        if len(shape) < dims or (exact and len(shape) != dims):
            needed = f"{dims}" if exact else f"{dims} or more"
            self.fail(f"{parameter} has shape {list(shape)}; it needs {needed} dimensions")
        return shape

    def agree(self, first: str, first_size: object, second: str, second_size: object) -> None:
        """`first` and `second` must give the same size (of the rank, a side, a kernel)."""
        if first_size != second_size:
            self.fail(
                f"{first} (shape {list(self.shapes[first])}) and {second} (shape "
                f"{list(self.shapes[second])}) do not fit together: {first_size} against "
                f"{second_size}"
            )

    def bounded(self, parameter: str, rank: int, rows: int, columns: int) -> None:
        """A rank above rows + columns of the delta is refused before any data is read."""
        if rank > rows + columns:
            self.fail(
                f"{parameter} (shape {list(self.shapes[parameter])}) declares rank {rank} for "
                f"a {rows}x{columns} delta; sdrecipe refuses a rank above its rows plus its "
                f"columns ({rows + columns}; rank {min(rows, columns)} is already full)"
            )


def _check_lora(factors: _Factors) -> None:
    up_name = first_of(LORA_UP, factors.shapes)
    down_name = first_of(LORA_DOWN, factors.shapes)
    up, down = factors.shape(up_name, 2), factors.shape(down_name, 2)
    columns = prod(down[1:])
    if "lora_mid.weight" in factors.shapes:
        mid = factors.shape("lora_mid.weight", 2)
        factors.agree(up_name, prod(up[1:]), "lora_mid.weight", mid[0])
        factors.agree(down_name, down[0], "lora_mid.weight", mid[1])
        columns *= prod(mid[2:])
        factors.bounded("lora_mid.weight", mid[0], up[0], columns)
    else:
        factors.agree(up_name, prod(up[1:]), down_name, down[0])
    factors.bounded(down_name, down[0], up[0], columns)


def _check_split_lora(factors: _Factors) -> None:
    """Each part's pair fits together, every part of one rank and one input width."""
    first = factors.shape("lora_down.0.weight", 2, exact=True)
    rows = 0
    for index in range(split_count(factors.shapes)):
        up_name, down_name = f"lora_up.{index}.weight", f"lora_down.{index}.weight"
        up = factors.shape(up_name, 2, exact=True)
        down = factors.shape(down_name, 2, exact=True)
        factors.agree(up_name, up[1], down_name, down[0])
        factors.agree(down_name, down, "lora_down.0.weight", first)
        rows += up[0]
    factors.bounded("lora_down.0.weight", first[0], rows, first[1])


def _check_loha(factors: _Factors) -> None:
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


def _check_lokr(factors: _Factors) -> None:
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


def _check_whole(factors: _Factors) -> None:
    for parameter in ("diff", "w_norm", "diff_b", "b_norm"):
        if parameter in factors.shapes:
            factors.shape(parameter, 1)


CHECKS: dict[str, Callable[[_Factors], None]] = {
    "lora": _check_lora,
    "split_lora": _check_split_lora,
    "loha": _check_loha,
    "lokr": _check_lokr,
    "full": _check_whole,
    "norm": _check_whole,
}


def _lokr_second_shape(shape: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of LoKr's second Kronecker factor, stored whole, as a product, or in CP form."""
    if "lokr_w2" in shape:
        return shape["lokr_w2"]
    if "lokr_t2" in shape:
        return (shape["lokr_w2_a"][1], shape["lokr_w2_b"][1], *shape["lokr_t2"][2:])
    return (shape["lokr_w2_a"][0], *shape["lokr_w2_b"][1:])


def first_of(names: tuple[str, ...], found: Mapping[str, object]) -> str:
    """The first of `names` in `found` (the factor convention a module uses)."""
    return next(name for name in names if name in found)


def split_count(found: Mapping[str, object]) -> int:
    """How many parts a split LoRA module has (after `_missing_factors` found
    them numbered 0, 1, ... each with both factors: its pairs)."""
    return sum(1 for p in found if SPLIT_PARAMETER.fullmatch(p)) // 2


def algorithm_of(parameter: str) -> str | None:
    """The algorithm a factor belongs to (None for shared ones: alpha, DoRA)."""
    if SPLIT_PARAMETER.fullmatch(parameter):
        return "split_lora"
    return ALGORITHM_OF_PARAMETER.get(parameter)


def split_key(key: str) -> tuple[str, str] | None:
    """(stem, parameter) of an adapter key, or None if it is none."""
    stem, _, rest = key.rpartition(".lora_")
    if stem and SPLIT_PARAMETER.fullmatch("lora_" + rest):
        return stem, "lora_" + rest
    for parameter in _KNOWN:
        if key.endswith("." + parameter):
            return key[: -len(parameter) - 1], parameter
    return None


def is_adapter(keys: list[str]) -> bool:
    """True when the keys are an adapter's: no checkpoint prefix, and every key
    a known adapter parameter ((IA)^3's `weight` beside its `on_input`) or one
    that looks like a factor (`adapter_modules` then names it), a stray key or
    two tolerated only beside many."""
    if not keys or any(key.startswith(MODEL_PREFIXES) for key in keys):
        return False
    scaled = {
        key.removesuffix(".on_input") + ".weight" for key in keys if key.endswith(".on_input")
    }
    recognised = sum(1 for key in keys if split_key(key) is not None or key in scaled)
    lookalike = sum(1 for key in keys if _unknown_factor(key))
    return recognised > 0 and recognised + lookalike >= 0.9 * len(keys)


def _unknown_factor(key: str) -> bool:
    """A key named like an adapter's factor (`lora_`, `hada_`, `lokr_` in its last
    parts) that is none sdrecipe knows: PEFT's `lora_A.default.weight`, its
    `lora_B.bias`, a split part `lora_up.00.weight`."""
    return split_key(key) is None and bool(FACTOR_LIKE.search(key))


def adapter_modules(keys: list[str]) -> dict[str, AdapterModule]:
    """The modules of an adapter, by stem; AdapterError for unsupported algorithms,
    a module that mixes algorithms, or one missing a factor."""
    unknown = [key for key in keys if _unknown_factor(key)]
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise AdapterError(
            f"{len(unknown)} key(s) look like factors sdrecipe does not know ({shown}); "
            "it applies lora_up/lora_down (numbered parts 0, 1, ...), lora_A/lora_B weights, "
            "LyCORIS' hada_/lokr_ factors, alpha and dora_scale, and leaves no key unread"
        )
    parameters: dict[str, dict[str, str]] = {}
    for key in keys:
        split = split_key(key)
        if split is not None:
            parameters.setdefault(split[0], {})[split[1]] = key
    modules = {}
    unsupported: dict[str, str] = {}
    for stem, found in parameters.items():
        named = {UNSUPPORTED_PARAMETERS[p] for p in found if p in UNSUPPORTED_PARAMETERS}
        if named:
            unsupported.setdefault(stem, ", ".join(sorted(named)))
            continue
        algorithms = {a for p in found if (a := algorithm_of(p)) is not None}
        if len(algorithms) != 1:
            what = " and ".join(sorted(algorithms)) if algorithms else "only " + ", ".join(found)
            raise AdapterError(f"module {stem} has {what}, which is no single algorithm")
        algorithm = algorithms.pop()
        missing = _missing_factors(algorithm, found)
        if missing:
            raise AdapterError(f"module {stem} ({algorithm}) lacks {', '.join(missing)}")
        modules[stem] = AdapterModule(stem, algorithm, found)
    if unsupported:
        first = next(iter(unsupported.items()))
        raise AdapterError(
            f"{len(unsupported)} module(s) use an algorithm sdrecipe does not apply "
            f"(e.g. {first[0]}: {first[1]}); supported are LoRA/LoCon, LoHa, LoKr, full "
            "and norm deltas, each optionally with DoRA"
        )
    return modules


def _missing_factors(algorithm: str, found: Mapping[str, str]) -> list[str]:
    """The parameters `algorithm` needs that `found` lacks."""
    if algorithm == "lora":
        pairs = [{up, down} for up, down in zip(LORA_UP, LORA_DOWN, strict=True)]
        used = [pair for pair in pairs if pair & set(found)]
        if len(used) > 1:
            return [f"one convention: it has {', '.join(sorted(set().union(*used)))}"]
        if any(pair <= set(found) for pair in pairs):
            return []
        return sorted(next((p for p in pairs if p & set(found)), pairs[0]) - set(found))
    if algorithm == "split_lora":
        numbers = sorted({int(m[2]) for p in found if (m := SPLIT_PARAMETER.fullmatch(p))})
        # Parts are numbered 0, 1, ...: the first number out of that order is missing.
        gap = next((i for i, number in enumerate(numbers) if number != i), None)
        if gap is not None:
            return [f"lora_up.{gap}.weight and lora_down.{gap}.weight"]
        needed = [f"lora_{side}.{i}.weight" for i in numbers for side in ("up", "down")]
        return [p for p in needed if p not in found]
    if algorithm == "loha":
        needed = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if ("hada_t1" in found) != ("hada_t2" in found):
            needed += ["hada_t1", "hada_t2"]
        return [p for p in needed if p not in found]
    if algorithm == "lokr":
        missing = []
        if "lokr_w1" not in found and not {"lokr_w1_a", "lokr_w1_b"} <= set(found):
            missing.append("lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        if "lokr_w2" not in found and not {"lokr_w2_a", "lokr_w2_b"} <= set(found):
            missing.append("lokr_w2 (or lokr_w2_a and lokr_w2_b)")
        return missing
    if algorithm == "full":
        return [] if "diff" in found or "diff_b" in found else ["diff"]
    return [] if "w_norm" in found or "b_norm" in found else ["w_norm"]
