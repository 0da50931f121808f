"""Which node values the cache keeps: an intermediate is stored when reading it
back costs less than recomputing it.

An element-wise node (`B - C`, `weighted_sum`) recomputes at the speed its
operands are read, and its float32 value is larger than an fp16 input: storing
it only adds writes. A node that calls a whole-tensor method (`ties`, `slerp`,
`rotate`, ...) does a selection, a decomposition or several passes per key, so
its value is worth keeping. `cache: true|false` on a node overrides the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrecipe.methods import get_method
from sdrecipe.plan.graph import MergeGraph
from sdrecipe.recipe.expr import method_calls


@dataclass(frozen=True)
class CacheChoice:
    """Whether a node's values are stored in the cache, and why."""

    store: bool
    why: str

    def describe(self) -> str:
        return f"{'cached' if self.store else 'not cached'}: {self.why}"


def cache_choice(graph: MergeGraph, node: str) -> CacheChoice:
    """The choice for `node`'s values; outputs are cached whole, as packs."""
    if graph.dag.out_degree(node) == 0:
        return CacheChoice(False, "an output, cached whole as a file")
    spec = graph.recipe.nodes[node]
    if spec.cache is not None:
        return CacheChoice(spec.cache, f"cache: {str(spec.cache).lower()}")
    costly = sorted({name for name in method_calls(spec.expr) if not get_method(name).elementwise})
    if costly:
        names = ", ".join(f"{name}()" for name in costly)
        return CacheChoice(True, f"whole-tensor {names}: cheaper to read back than to recompute")
    return CacheChoice(False, "element-wise: cheaper to recompute than to read back")
