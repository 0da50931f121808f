"""Merge methods: one registry, each method a small pure function on tensors."""

from sdrecipe.methods import classic as _classic  # noqa: F401  (registers the methods)
from sdrecipe.methods.registry import MergeMethod, get_method, merge_method

__all__ = ["MergeMethod", "get_method", "merge_method"]
