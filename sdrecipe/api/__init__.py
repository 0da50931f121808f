"""sdrecipe as a library: every operation the CLI has, as a function.

    from sdrecipe import api

    report = api.build(["recipes/inpaint.yaml"], api.Options(threads=4), on_event=print)
    for output in report.outputs:
        print(output.name, output.result, output.path)

Targets are recipe files or folders, as on the command line, and after one
recipe file the names of its outputs to build alone. Reports are typed; each
one's `to_json()` is what the CLI prints with `--json`. Errors are
`sdrecipe.errors.SdrecipeError`s (`exit_code` 2: the recipe or its inputs are
invalid; 1: the build failed).

The operations live in `sdrecipe.api.operations`, loaded on first use, so
importing the API (and `sdrecipe --help`) loads no merge machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdrecipe.api.reports import (
    BuildReport,
    PlanReport,
    StatusReport,
    Transfer,
    ValidateReport,
    VerifyReport,
)
from sdrecipe.engine.options import Options

if TYPE_CHECKING:
    from sdrecipe.api.operations import (
        assess_statuses,
        build,
        cache_clear,
        cache_gc,
        cache_info,
        cache_limit,
        cache_transfer,
        graph,
        load_targets,
        plan,
        split_targets,
        status,
        validate,
        verify,
    )

__all__ = [
    "BuildReport",
    "Options",
    "PlanReport",
    "StatusReport",
    "Transfer",
    "ValidateReport",
    "VerifyReport",
    "assess_statuses",
    "build",
    "cache_clear",
    "cache_gc",
    "cache_info",
    "cache_limit",
    "cache_transfer",
    "graph",
    "load_targets",
    "plan",
    "split_targets",
    "status",
    "validate",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in __all__:  # an operation: the reports and options are imported above
        from sdrecipe.api import operations

        return getattr(operations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
