"""Structured recipe configs: dataclass schemas merged by omegaconf, strict keys, YAML includes."""
from vtok.config.recipe import RecipeError, load_recipe, load_section, recipe_to_yaml
from vtok.config.schema import DataConfig, Recipe

__all__ = ["DataConfig", "Recipe", "RecipeError", "load_recipe", "load_section", "recipe_to_yaml"]
