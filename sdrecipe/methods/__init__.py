"""Merge methods: one registry, each method a small pure function on tensors."""

# Imported for their registrations; none imports torch until a method runs.
from sdrecipe.methods import classic as _classic  # noqa: F401
from sdrecipe.methods import device_paths as _device_paths  # noqa: F401
from sdrecipe.methods import geometry as _geometry  # noqa: F401
from sdrecipe.methods import sparse as _sparse  # noqa: F401
from sdrecipe.methods import spherical as _spherical  # noqa: F401
from sdrecipe.methods import subspace as _subspace  # noqa: F401
from sdrecipe.methods import task_vectors as _task_vectors  # noqa: F401
from sdrecipe.methods import three_model as _three_model  # noqa: F401
from sdrecipe.methods.registry import MergeMethod, get_method, merge_method

__all__ = ["MergeMethod", "get_method", "merge_method"]
