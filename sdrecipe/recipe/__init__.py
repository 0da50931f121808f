"""Recipes: YAML with line numbers, pydantic schema, safe expression parser."""

from sdrecipe.recipe.loader import load_recipe, parse_recipe
from sdrecipe.recipe.model import Input, Node, Output, Recipe

__all__ = ["Input", "Node", "Output", "Recipe", "load_recipe", "parse_recipe"]
