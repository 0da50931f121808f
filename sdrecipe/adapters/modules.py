"""The modules of an adapter file, found from its keys (never its file name).

An adapter key is `<stem>.<parameter>`: the stem names the patched layer
(`lora_unet_down_blocks_0_attentions_0_proj_in`, `unet.down_blocks.0...to_q`),
the parameter says which factor of which algorithm it is (each registered
algorithm, `sdrecipe.adapters.algorithms`, names its factors). Imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sdrecipe.adapters.algorithms import Algorithm, algorithm_of, registered_algorithms
from sdrecipe.adapters.factor_shapes import AdapterError, FactorShapes
from sdrecipe.io.tensor_info import TensorInfo

# Parameters that go with any algorithm.
SHARED_PARAMETERS = ("alpha", "dora_scale")
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
_ALGORITHMS = registered_algorithms()
# A key ending in a numbered factor (sd-scripts' `lora_up.0.weight`): stem, parameter.
_NUMBERED = re.compile(
    r"(.+)\.(" + "|".join(a.numbered.pattern for a in _ALGORITHMS if a.numbered) + ")", re.S
)
# A key named like the factors of some algorithm (`lora_`, `hada_`, `lokr_`...).
FACTOR_LIKE = re.compile(
    r"\.(" + "|".join(sorted({re.escape(a.prefix) for a in _ALGORITHMS if a.prefix})) + ")"
    r"[^.]*(\.[^.]+){0,2}$"
)
_KNOWN = sorted(
    [*(p for a in _ALGORITHMS for p in a.factors), *SHARED_PARAMETERS, *UNSUPPORTED_PARAMETERS],
    key=len,
    reverse=True,
)
# Checkpoint prefixes: a file with any of these keys is a model, not an adapter.
MODEL_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.",
)


@dataclass(frozen=True)
class AdapterModule:
    """One patched layer: its stem, algorithm, and the file key of each parameter."""

    stem: str
    algorithm: Algorithm
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def dora(self) -> bool:
        """True when the module carries DoRA's magnitude vector."""
        return "dora_scale" in self.keys

    @property
    def changes_weight(self) -> bool:
        """True when the module has a delta for the layer's weight."""
        return any(p not in SHARED_PARAMETERS and p != self.algorithm.bias for p in self.keys)

    @property
    def bias_key(self) -> str | None:
        """The file key of the module's delta for the layer's bias, if it has one."""
        bias = self.algorithm.bias
        return None if bias is None else self.keys.get(bias)

    @property
    def changes_bias(self) -> bool:
        """True when the module has a delta for the layer's bias."""
        return self.bias_key is not None

    def shapes(self, infos: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape, from the file's header."""
        return {parameter: infos[key].shape for parameter, key in self.keys.items()}

    def rank(self, infos: Mapping[str, TensorInfo]) -> int | None:
        """The rank of a low-rank module (None for full and norm deltas, and a
        LoKr whose two halves are both stored whole)."""
        return self.algorithm.rank(self.shapes(infos))

    def weight_size(self, infos: Mapping[str, TensorInfo]) -> tuple[int, int, tuple[int, ...]]:
        """(rows, elements, kernel) of the weight delta, from the factors' shapes alone;
        kernel is the trailing spatial shape where the factors fix it, else ()."""
        return self.algorithm.weight_size(self.shapes(infos))

    def bias_size(self, infos: Mapping[str, TensorInfo]) -> tuple[int, int, tuple[int, ...]]:
        """(rows, elements, kernel) of the bias delta: one row per element, no kernel."""
        key = self.bias_key
        assert key is not None, f"module {self.stem} changes no bias"
        return infos[key].shape[0], infos[key].numel, ()


def check_factor_shapes(module: AdapterModule, infos: Mapping[str, TensorInfo]) -> None:
    """AdapterError unless `module`'s factors fit together, from the header alone:
    none empty, `alpha` one number, ranks and sides that agree, and each rank at
    most the rows plus the columns of the delta it makes (a rank above
    min(rows, columns) adds nothing; one far above it only promises work)."""
    factors = FactorShapes(module.stem, module.shapes(infos))
    factors.check_sizes()
    module.algorithm.check(factors)


def split_key(key: str) -> tuple[str, str] | None:
    """(stem, parameter) of an adapter key, or None if it is none."""
    numbered = _NUMBERED.fullmatch(key)
    if numbered:
        return numbered[1], numbered[2]
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
            names = sorted(a.name for a in algorithms)
            what = " and ".join(names) if algorithms else "only " + ", ".join(found)
            raise AdapterError(f"module {stem} has {what}, which is no single algorithm")
        algorithm = algorithms.pop()
        missing = algorithm.missing(found)
        if missing:
            raise AdapterError(f"module {stem} ({algorithm.name}) lacks {', '.join(missing)}")
        modules[stem] = AdapterModule(stem, algorithm, found)
    if unsupported:
        first = next(iter(unsupported.items()))
        raise AdapterError(
            f"{len(unsupported)} module(s) use an algorithm sdrecipe does not apply "
            f"(e.g. {first[0]}: {first[1]}); supported are LoRA/LoCon, LoHa, LoKr, full "
            "and norm deltas, each optionally with DoRA"
        )
    return modules
