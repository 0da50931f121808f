"""Every recipe in recipes/ is valid, and every demo recipe builds and verifies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import invoke
from sdrecipe import api
from sdrecipe.recipe import load_recipe
from sdrecipe.synthetic import DEMO_MODELS, EXTRA_DEMO_MODELS, write_model_set

RECIPES = Path(__file__).parent.parent / "recipes"
DEMOS = sorted(RECIPES.glob("demo_*.yaml"))
USER_TEMPLATES = sorted(set(RECIPES.glob("*.yaml")) - set(DEMOS))


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    """A copy of recipes/ beside build/demo/ with small synthetic models."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(RECIPES, root / "recipes", ignore=shutil.ignore_patterns("*.lock"))
    write_model_set(root / "build" / "demo", {**DEMO_MODELS, **EXTRA_DEMO_MODELS}, shrink=32)
    return root


def test_there_are_demo_twins_for_every_user_template():
    assert {p.name for p in USER_TEMPLATES} == {
        "mymodel_inpaint.yaml",
        "mymodel_pix2pix.yaml",
        "blend.yaml",
        "lora.yaml",
        "flux_fill.yaml",
    }
    assert len(DEMOS) == 5


@pytest.mark.parametrize("recipe", DEMOS, ids=lambda p: p.name)
def test_demo_recipe_builds_and_verifies(demo_tree, recipe, isolated_cache):
    path = demo_tree / "recipes" / recipe.name
    options = api.Options(cache_dir=isolated_cache)
    built = api.build(path, options)
    assert built.ok and {o.result for o in built.outputs} == {"built"}
    verified = api.verify(path, options)
    assert verified.reproducible and len(verified.outputs) == len(built.outputs)


@pytest.mark.parametrize("recipe", USER_TEMPLATES, ids=lambda p: p.name)
def test_user_templates_are_valid_recipes_waiting_for_model_files(recipe, tmp_path):
    # A copy, so that model files a checkout may hold in models/ are not found.
    copy = tmp_path / "recipes" / recipe.name
    copy.parent.mkdir()
    shutil.copyfile(recipe, copy)
    parsed = load_recipe(copy)
    assert parsed.outputs
    result = invoke("validate", str(copy))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    first_input = next(iter(parsed.inputs.values()))
    assert f"{copy}:{first_input.line}:" in result.stderr
