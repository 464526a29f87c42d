"""Load a recipe: YAML files (with ``include``) + dotlist overrides, merged onto the dataclass schema.

Every source is checked on its own before it is merged, so an error names the file (or the command
line) it came from, the full dotted key, and the closest valid key::

    recipes/smoke/x.yaml: unknown key 'data.resolutoin' (did you mean 'data.resolution'?)
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vtok.config.schema import Recipe

INCLUDE_KEY = "include"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the key, the source and a fix."""


def _schema_fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, f in _schema_fields(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(f.type):
            keys.extend(_all_keys(f.type, f"{prefix}{name}."))
    return keys


def _suggest(bad_key: str, prefix: str, cls: type) -> str:
    local = difflib.get_close_matches(bad_key[len(prefix):], list(_schema_fields(cls)), n=1, cutoff=0.6)
    if local:  # a typo within the right section
        return f" (did you mean '{prefix}{local[0]}'?)"
    valid = _all_keys(Recipe)
    match = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.6)
    if not match:  # a right name in the wrong section: compare leaf names only
        leaf = bad_key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        match = [leaves[close[0]]] if close else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_keys(node: Any, cls: type, prefix: str, source: str) -> None:
    """Raise RecipeError for the first key of ``node`` that ``cls`` does not declare."""
    if not isinstance(node, (dict, DictConfig)):
        raise RecipeError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                          f"got {type(node).__name__}")
    fields = _schema_fields(cls)
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise RecipeError(f"{source}: unknown key '{full}'{_suggest(full, prefix, cls)}")
        ftype = fields[key].type
        if dataclasses.is_dataclass(ftype) and value is not None:
            _check_keys(value, ftype, full + ".", source)
        elif typing.get_origin(ftype) is dict and isinstance(value, (dict, DictConfig)):
            item_type = typing.get_args(ftype)[1]
            if dataclasses.is_dataclass(item_type):  # e.g. train.optim.<name>.lr
                for name, item in value.items():
                    _check_keys(item, item_type, f"{full}.{name}.", source)


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif isinstance(value, dict):
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    _check_choices(item, f"{prefix}{f.name}.{name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise RecipeError(f"{prefix}{f.name}={value!r} is not one of "
                              f"{', '.join(map(repr, f.metadata['choices']))}")


def _load_yaml(path: Path, seen: tuple[Path, ...]) -> list[tuple[str, DictConfig]]:
    """Return [(source, config)] for ``path`` and its includes, bases first."""
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: include cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (check the path; recipes live under recipes/)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: keep the first line only
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if cfg is None or isinstance(cfg, ListConfig):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    includes = cfg.pop(INCLUDE_KEY, None)
    if includes is None:
        includes = []
    elif isinstance(includes, str):
        includes = [includes]
    out: list[tuple[str, DictConfig]] = []
    for inc in includes:
        out.extend(_load_yaml(path.parent / str(inc), seen + (path,)))
    out.append((str(path), cfg))
    return out


def _merge(merged: DictConfig, cfg: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise RecipeError(f"{source}: {key}: {str(e).splitlines()[0]}") from None


def _normalize_override(item: str) -> str:
    """``key=value`` with list indices as path parts: ``a.b[0].c=v`` -> ``a.b.0.c=v``."""
    if "=" not in item:
        raise RecipeError(f"command line: override '{item}' must look like key=value "
                          f"(e.g. data.resolution=128)")
    key, value = item.split("=", 1)
    return re.sub(r"\[(-?\d+)\]", r".\1", key.strip()) + "=" + value


def _list_in_path(merged: DictConfig, key: str) -> bool:
    """Whether ``key`` goes through a list of ``merged`` (e.g. ``model.teachers.0.weights``);
    raises RecipeError for an index that is not a number or out of range."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        parent = OmegaConf.select(merged, ".".join(parts[:i]), default=None, throw_on_missing=False)
        if isinstance(parent, DictConfig):
            continue
        if not isinstance(parent, ListConfig):
            return False  # a new or scalar node: the override creates / replaces it
        where, index = ".".join(parts[:i]), parts[i]
        size = f"'{where}' has {len(parent)} item{'s' if len(parent) != 1 else ''}"
        if not index.isdigit():
            example = ".".join([where, "0", *parts[i + 1:]])
            raise RecipeError(f"command line: {key}: '{index}' is not a list index; {size}, e.g. {example}")
        if int(index) >= len(parent):
            valid = f" (valid: 0..{len(parent) - 1})" if len(parent) else ""
            raise RecipeError(f"command line: {key}: index {index} is out of range, {size}{valid}")
        return True
    return False


def _apply_override(merged: DictConfig, item: str) -> DictConfig:
    """One dotlist ``key=value`` onto the merged recipe, checked like a file source."""
    key = item.split("=", 1)[0]
    try:
        parsed = OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as e:
        raise RecipeError(f"command line: {str(e).splitlines()[0]}") from None
    _check_keys(parsed, Recipe, "", "command line")
    if not _list_in_path(merged, key):
        return _merge(merged, parsed, "command line")
    try:  # set the item in place: a merge would meet a list with a mapping {0: ...}
        merged.merge_with_dotlist([item])
    except OmegaConfBaseException as e:
        full = getattr(e, "full_key", "") or key
        raise RecipeError(f"command line: {full}: {str(e).splitlines()[0]}") from None
    return merged


def load_recipe(path: str | Path | None, overrides: Iterable[str] = ()) -> Recipe:
    """Resolve a recipe: schema defaults <- included files <- ``path`` <- dotlist ``overrides``.

    Args:
        path: a recipe YAML file, or None for the defaults alone.
        overrides: ``key=value`` strings, e.g. ``["data.resolution=128"]``.
    Returns:
        A fully resolved, type-checked :class:`Recipe`.
    Raises:
        RecipeError: unknown key, wrong type, invalid choice, missing required value or file.
    """
    sources = _load_yaml(Path(path), ()) if path is not None else []
    overrides = [_normalize_override(item) for item in overrides]
    merged = OmegaConf.structured(Recipe)
    for source, cfg in sources:
        _check_keys(cfg, Recipe, "", source)
        merged = _merge(merged, cfg, source)
    for item in overrides:
        merged = _apply_override(merged, item)
    try:
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        msg = str(e).splitlines()[0]
        if "missing mandatory value" in msg.lower():
            msg = f"required value is not set; give it in the recipe or as {key}=..."
        raise RecipeError(f"{key}: {msg}") from None
    _check_choices(recipe)
    return recipe


def load_section(cls: type, values: dict[str, Any], prefix: str, source: str = "recipe"):
    """``values`` merged onto dataclass ``cls`` with the same strict checks as a recipe.

    Used for sections whose schema depends on another setting, e.g. ``model`` (the task's Config).
    """
    _check_keys(values, cls, prefix, source)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise RecipeError(f"{source}: {prefix}{key}: {str(e).splitlines()[0]}") from None
    _check_choices(obj, prefix)
    return obj


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``vtok info`` prints and the run dir keeps)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
