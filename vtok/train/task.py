"""TrainTask: what a model family gives the trainer, and the registry of tasks by name.

A task owns its modules and losses; the trainer owns the loop, the strategy, checkpoints and logs::

    @register_task("lm")
    class LMTask(TrainTask):
        @dataclass
        class Config:                    # the recipe's `model:` section, checked strictly
            width: int = 256

        def __init__(self, cfg, recipe):
            self.modules = {"model": TinyLM(cfg.width)}
            self.optimizers = {"main": ["model"]}     # optimizer -> modules; order = step order

        def loss(self, phase, batch, step):
            logits = self.modules["model"](batch["codes"])   # always call through self.modules
            return F.cross_entropy(...), {"acc": ...}

``self.modules`` is replaced by the strategy's wrapped modules (DDP / FSDP2 / DeepSpeed engines),
so a task never imports ``vtok.parallel``. A GAN tokenizer declares two optimizers
(``{"generator": ["tokenizer"], "discriminator": ["disc"]}``): per step the trainer runs the
generator phase, then the discriminator phase, each with its own backward and optimizer step.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable

import torch
from torch import nn

from vtok.config import Recipe, RecipeError, load_section


class TrainTask:
    """Base class; see the module docstring. Subclasses set ``modules`` and ``optimizers``."""

    Config: type
    modules: dict[str, nn.Module]
    optimizers: dict[str, list[str]]
    frozen: dict[str, nn.Module] = {}  # teachers etc.: moved to the device, never optimized/sharded
    ema_modules: tuple[str, ...] = ()  # default EMA targets when train.ema.modules is empty
    export_module: str = ""  # the module `vtok export` writes (a Tokenizer or Generator); "" = none
    strategy: Any = None  # set by the strategy's setup(); tasks use unwrapped() / gathered()
    # set by the trainer before each step: whether its metrics will be logged (metrics that cost a
    # pass over large tensors, e.g. an accuracy argmax over the logits, can be skipped otherwise)
    log_step: bool = True

    def unwrapped(self, name: str) -> nn.Module:
        """Module ``name`` without its parallel wrapper, for attributes and non-forward methods."""
        return self.strategy.unwrap(name) if self.strategy is not None else self.modules[name]

    def gathered(self, name: str) -> contextlib.AbstractContextManager[nn.Module]:
        """Context giving module ``name`` with all parameters usable outside ``forward`` (sharded
        strategies gather them; collective: every rank enters together)."""
        if self.strategy is None:
            return contextlib.nullcontext(self.modules[name])
        return self.strategy.gathered(name)

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Scalar loss of optimizer ``phase`` on one micro-batch, and metrics to log."""
        raise NotImplementedError

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Samples in a micro-batch (for throughput)."""
        return len(batch["__key__"]) if "__key__" in batch else next(iter(batch.values())).shape[0]

    def tokens_per_sample(self) -> int:
        """Tokens per sample for tokens/s; 0 when the notion does not apply."""
        return 0

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per sample for MFU; 0 when unknown."""
        return 0.0

    def evaluate(self, step: int, run_dir: str) -> dict[str, float]:
        """Optional eval hook, called every ``train.eval_every`` steps on every rank."""
        return {}

    @classmethod
    def build_export(cls, cfg: Any, recipe: Recipe) -> nn.Module:
        """Just the module ``vtok export`` writes (``export_module``), built from the recipe without
        data, teachers or loss networks; ``__init__`` builds it through here too."""
        raise NotImplementedError(f"task {cls.__name__} exports nothing")

    @classmethod
    def export_info(cls, cfg: Any, recipe: Recipe) -> dict[str, Any]:
        """What the export records besides the model's own config: at least ``arch`` (the registry
        name), optionally ``token_spec`` (the tokens' TokenSpec, for generators) and provenance."""
        return {}


TASKS: dict[str, type[TrainTask]] = {}


def register_task(name: str) -> Callable[[type[TrainTask]], type[TrainTask]]:
    """Class decorator: make a TrainTask available to recipes as ``train.task: <name>``."""
    def deco(cls: type[TrainTask]) -> type[TrainTask]:
        if name in TASKS and TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is registered twice ({TASKS[name]} and {cls})")
        TASKS[name] = cls
        return cls
    return deco


def task_class(name: str) -> type[TrainTask]:
    """The registered TrainTask ``name`` (one-line RecipeError with a hint when unknown)."""
    import vtok.tasks  # noqa: F401  (registers the built-in tasks)

    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        known = ", ".join(sorted(TASKS)) or "none registered"
        raise RecipeError(f"train.task={name!r} is not a registered task{hint}; known: {known}")
    return TASKS[name]


def validate_model_section(recipe: Recipe) -> Any:
    """``recipe.model`` checked strictly against its task's Config, without building anything;
    returns the Config (None when the recipe names no task). Raises a one-line RecipeError."""
    name = recipe.train.task
    if not name:
        return None
    return load_section(task_class(name).Config, recipe.model, "model.", f"model section of task {name!r}")


def build_task(recipe: Recipe) -> TrainTask:
    """Instantiate ``recipe.train.task`` with ``recipe.model`` checked against the task's Config."""
    name = recipe.train.task
    cls = task_class(name)
    cfg = validate_model_section(recipe)
    task = cls(cfg, recipe)
    unknown = {m for mods in task.optimizers.values() for m in mods} - set(task.modules)
    if unknown:
        raise ValueError(f"task {name!r}: optimizers name modules it does not have: {sorted(unknown)}")
    return task
