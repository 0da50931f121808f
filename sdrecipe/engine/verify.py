"""`verify`: rebuild every locked output elsewhere, without the cache, and
compare it with the lock file."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdrecipe.engine import events
from sdrecipe.engine.builder import update_outputs
from sdrecipe.engine.devices import Placement, device_class
from sdrecipe.errors import RecipeError
from sdrecipe.io.atomic import remove_stale_temporaries
from sdrecipe.plan.graph import output_device
from sdrecipe.plan.prepare import prepare_recipe
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.lock import read_lock


@dataclass(frozen=True)
class VerifyResult:
    """One output rebuilt from scratch, against the lock."""

    name: str
    expected: str
    actual: str
    # The device class whose bytes were rebuilt, where the output's follow it
    # (see `sdrecipe.plan.graph.output_device`); `locked`, the lock's.
    device: str | None = None
    locked: str | None = None

    @property
    def reproducible(self) -> bool:
        """True when the rebuilt bytes are the locked bytes."""
        return self.expected == self.actual


def verify(
    recipe: Recipe,
    threads: int,
    on_event: events.Listener = events.ignore,
    placement: Placement | None = None,
) -> list[VerifyResult]:
    """Rebuild every locked output without the cache, elsewhere (on `placement`'s
    device, if any), and compare with the lock."""
    recipe_path = recipe.path
    lock = read_lock(recipe_path)
    if lock is None or not lock.outputs:
        raise RecipeError("there is no lock file to verify against; build first", recipe_path)
    if any(not entry.digest for entry in lock.outputs.values()):
        raise RecipeError(
            "the lock was written by an older sdrecipe and records no content digests; "
            "build to rewrite it, then verify",
            recipe_path,
        )
    names = [name for name in recipe.outputs if name in lock.outputs]
    if not names:
        raise RecipeError("the lock records none of the recipe's outputs; build first", recipe_path)
    first = recipe.outputs[names[0]].path
    first.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(first.parent)
    # Named like every temporary, so a verify that is killed is cleaned up later.
    with tempfile.TemporaryDirectory(
        prefix=".verify-", suffix=f".sdrecipe-{os.getpid()}.tmp", dir=first.parent
    ) as folder:
        moved = {
            name: dataclasses.replace(spec, path=Path(folder) / str(index) / spec.path.name)
            for index, (name, spec) in enumerate(recipe.outputs.items())
        }
        elsewhere = dataclasses.replace(recipe, outputs=moved)
        prepared = prepare_recipe(elsewhere, names, force=True)
        summary = update_outputs(
            prepared,
            threads,
            cache=None,
            force=True,
            update_lock=False,
            on_event=on_event,
            placement=placement,
        )
        rebuilt = {output.name: output.digest for output in summary.outputs}
        on = device_class(placement)
        return [
            VerifyResult(
                name,
                lock.outputs[name].digest,
                rebuilt[name],
                output_device(prepared.graph, name, on),
                lock.outputs[name].device,
            )
            for name in names
        ]
