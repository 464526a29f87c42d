import subprocess
import sys

import pytest

from vtok.config import RecipeError, load_recipe, recipe_to_yaml


def write(path, text):
    path.write_text(text)
    return path


def test_include_then_file_then_command_line(tmp_path):
    write(tmp_path / "base.yaml", "data:\n  train_shards: base\n  resolution: 128\n  batch_size: 4\n")
    recipe = write(tmp_path / "r.yaml", "include: base.yaml\nname: exp\ndata:\n  resolution: 64\n")
    r = load_recipe(recipe, ["data.batch_size=16"])
    assert (r.data.train_shards, r.data.resolution, r.data.batch_size) == ("base", 64, 16)
    assert r.run_dir == "runs/exp"  # interpolation resolved after the merge
    assert "resolution: 64" in recipe_to_yaml(r)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data:\n  train_shards: x\n  resolutoin: 64\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(recipe) in msg and "'data.resolutoin'" in msg and "did you mean 'data.resolution'" in msg


def test_unknown_key_in_included_file_names_that_file(tmp_path):
    base = write(tmp_path / "base.yaml", "data:\n  batch_sise: 4\n")
    recipe = write(tmp_path / "r.yaml", "include: base.yaml\n")
    with pytest.raises(RecipeError, match=f"{base}: unknown key 'data.batch_sise'.*'data.batch_size'"):
        load_recipe(recipe)


def test_key_in_wrong_section_suggests_full_path():
    with pytest.raises(RecipeError, match=r"command line: unknown key 'resolution' \(did you mean 'data.resolution'\?\)"):
        load_recipe(None, ["resolution=3"])


def test_wrong_type_is_one_line(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data:\n  train_shards: x\n  resolution: big\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert "\n" not in str(e.value)
    assert str(recipe) in str(e.value) and "data.resolution" in str(e.value) and "'big'" in str(e.value)


def test_invalid_choice_and_missing_required():
    with pytest.raises(RecipeError, match="data.format='zip' is not one of 'wds', 'mds'"):
        load_recipe(None, ["data.train_shards=x", "data.format=zip"])
    with pytest.raises(RecipeError, match="data.train_shards: required value is not set"):
        load_recipe(None, [])


def test_include_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(RecipeError, match="include cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_info_error_is_one_line_exit_2(tmp_path):
    recipe = write(tmp_path / "r.yaml", "data:\n  train_shards: x\n  shufle: true\n")
    proc = subprocess.run([sys.executable, "-m", "vtok.cli", "info", str(recipe)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "did you mean 'data.shuffle'" in proc.stderr


def test_every_shipped_recipe_resolves():
    """Every recipe loads, and its `model` section passes its task's strict Config check."""
    from pathlib import Path

    import vtok.tasks  # noqa: F401
    from vtok.config import load_section
    from vtok.train.task import TASKS

    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").rglob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        recipe = load_recipe(path)
        if recipe.train.task:
            load_section(TASKS[recipe.train.task].Config, recipe.model, "model.", str(path))
