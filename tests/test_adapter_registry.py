"""Adapter algorithms are registered classes (issue 30): the registry is the one
place that names an algorithm's factors, and key parsing, shape checks, deltas
and low-rank deltas ask the registered object."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdrecipe.adapters.algorithms import Algorithm, algorithm_of, registered_algorithms
from sdrecipe.adapters.modules import AdapterError, adapter_modules, is_adapter, split_key
from sdrecipe.synthetic import AdapterSpec, adapter_tensors

SHRINK = 32
REGISTERED = {
    "lora": (
        "lora_up.weight",
        "lora_B.weight",
        "up.weight",
        "lora_down.weight",
        "lora_A.weight",
        "down.weight",
        "lora_mid.weight",
    ),
    "split_lora": (),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
}
# Adapters of every algorithm and naming the synthetic writer makes.
SPECS = [
    AdapterSpec("sd1", SHRINK, algorithm, convs=True, tucker=tucker, dora=dora)
    for algorithm in ("lora", "loha", "lokr", "full")
    for tucker in (False, True)
    for dora in (False, True)
] + [
    AdapterSpec("sd1", SHRINK, "lora", naming="peft", alpha=None),
    AdapterSpec("flux1", SHRINK, "lora", naming="split"),
    AdapterSpec("flux1", SHRINK, "lora", naming="xlabs", alpha=None),
]


def test_the_registry_lists_each_algorithm_with_its_factors() -> None:
    algorithms = registered_algorithms()
    assert {a.name: a.factors for a in algorithms} == REGISTERED
    assert all(isinstance(a, Algorithm) for a in algorithms)
    split = next(a for a in algorithms if a.name == "split_lora")
    assert split.owns("lora_up.0.weight") and split.owns("lora_down.12.weight")
    assert not split.owns("lora_up.00.weight")
    assert {a.name: a.bias for a in algorithms if a.bias} == {"full": "diff_b", "norm": "b_norm"}


def test_each_factor_belongs_to_one_algorithm_and_names_its_key() -> None:
    for algorithm in registered_algorithms():
        for factor in algorithm.factors:
            assert algorithm_of(factor) is algorithm
            assert split_key(f"lora_unet_x.{factor}") == ("lora_unet_x", factor)
    assert algorithm_of("alpha") is None and algorithm_of("dora_scale") is None
    assert split_key("lora_unet_x.lora_up.1.weight") == ("lora_unet_x", "lora_up.1.weight")


def test_only_lora_and_split_lora_give_low_rank_deltas() -> None:
    algorithms = registered_algorithms()
    factored = [a.name for a in algorithms if type(a).low_rank is not Algorithm.low_rank]
    assert factored == ["lora", "split_lora"]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.family}-{s.algorithm}-{s.naming}")
def test_every_module_the_reader_parses_holds_a_registered_algorithm(spec: AdapterSpec) -> None:
    keys = list(adapter_tensors(spec))
    assert is_adapter(keys)
    modules = adapter_modules(keys)
    registered = registered_algorithms()
    assert modules
    for module in modules.values():
        assert any(module.algorithm is a for a in registered)
        factors = [p for p in module.keys if p not in ("alpha", "dora_scale")]
        assert factors and all(module.algorithm.owns(p) for p in factors)


@pytest.mark.parametrize("prefix", sorted({a.prefix for a in registered_algorithms() if a.prefix}))
def test_an_unknown_factor_like_key_is_refused_by_name(prefix: str) -> None:
    keys = ["lora_unet_x.lora_up.weight", "lora_unet_x.lora_down.weight", f"lora_unet_y.{prefix}w9"]
    named = rf"1 key\(s\) look like factors sdrecipe does not know \(lora_unet_y\.{prefix}w9\)"
    with pytest.raises(AdapterError, match=named):
        adapter_modules(keys)


def test_mixed_and_incomplete_modules_are_named_by_algorithm() -> None:
    with pytest.raises(AdapterError, match="module m has loha and lora, which is no single"):
        adapter_modules(["m.lora_up.weight", "m.lora_down.weight", "m.hada_w1_a"])
    with pytest.raises(AdapterError, match=r"module m \(lokr\) lacks lokr_w2 \(or lokr_w2_a"):
        adapter_modules(["m.lokr_w1"])


def test_reading_an_adapters_keys_imports_no_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from sdrecipe.adapters.modules import adapter_modules\n"
        "print(adapter_modules(['m.hada_w1_a', 'm.hada_w1_b', 'm.hada_w2_a', 'm.hada_w2_b'])"
        "['m'].algorithm.name)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loha"
