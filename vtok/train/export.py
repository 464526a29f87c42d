"""``vtok export``: a training run's exportable module -> the one export format (vtok.models.export).

Two ways in, one writer:
- ``export_checkpoint(recipe, out)``: what ``vtok export`` runs. It builds only the module the task
  exports (``TrainTask.build_export``: no data loader, no teachers, no loss networks) and reads its
  weights from the checkpoint whichever strategy wrote it (``read_checkpoint_module``), in one process.
- ``Trainer.export(out)``: from a live trainer (every rank calls it; rank 0 writes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtok.config import Recipe, RecipeError, load_section
from vtok.models.export import save_export


class ExportUnsupported(RecipeError):
    """The task declares no exportable module (a user error: one line, exit 2)."""


def task_class(recipe: Recipe):
    """The TrainTask class ``recipe.train.task`` names and its checked ``model`` config."""
    from vtok.train.task import task_class as lookup

    cls = lookup(recipe.train.task)
    return cls, load_section(cls.Config, recipe.model, "model.", f"model section of task {recipe.train.task!r}")


def write_export(out: str | Path, task_cls, cfg: Any, recipe: Recipe, module: nn.Module,
                 state: dict[str, torch.Tensor], *, step: int, ema: bool) -> Path:
    """Write ``module`` with weights ``state`` and the task's export info; returns the weights path."""
    info = dict(task_cls.export_info(cfg, recipe))
    arch, spec = info.pop("arch"), info.pop("token_spec", None)
    meta = {"recipe": recipe.name, "task": recipe.train.task, "step": step, "ema": ema, **info}
    return save_export(out, module, arch, state=state, token_spec=spec, meta=meta)


def export_checkpoint(recipe: Recipe, out: str | Path, checkpoint: Path, use_ema: bool = False) -> tuple[Path, int]:
    """Export the task's module from ``checkpoint`` (a ``step_*`` dir); returns (weights path, step)."""
    import json

    from vtok.models.weights import load_state_dict_strict
    from vtok.parallel.strategy import read_checkpoint_module

    cls, cfg = task_class(recipe)
    if not cls.export_module:
        raise ExportUnsupported(f"task {recipe.train.task!r} declares no export module")
    module = cls.build_export(cfg, recipe)
    state = read_checkpoint_module(checkpoint, cls.export_module, module, ema=use_ema)
    load_state_dict_strict(module, state, str(checkpoint))  # checks names and shapes against the recipe
    step = int(json.loads((checkpoint / "meta.json").read_text())["step"])
    return write_export(out, cls, cfg, recipe, module, module.state_dict(), step=step, ema=use_ema), step
