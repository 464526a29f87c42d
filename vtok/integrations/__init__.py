"""Optional engines that run vtok recipes with another training loop.

    vtok train RECIPE --engine composer       # MosaicML Composer (vtok/integrations/composer.py)

    from vtok.integrations import composer_trainer
    trainer = composer_trainer(recipe)         # a composer.Trainer; trainer.fit()

Composer is imported only here, when asked for: vtok itself never needs it.
"""
from __future__ import annotations

from typing import Any

from vtok.config import Recipe, RecipeError

# Composer 0.32.1 (its last release) pins torch < 2.7.1; installed without its pins it runs beside
# vtok's torch. At import it needs torchmetrics, mosaicml-cli and coolname, which install normally
# (none caps torch: torchmetrics asks torch>=2.0 only). `pip show torch` stays 2.14.1 afterwards.
COMPOSER_INSTALL = ("pip install --no-deps mosaicml==0.32.1 && pip install 'torchmetrics>=1.0,<1.7.5' "
                    "'mosaicml-cli>=0.5.25,<0.8' 'coolname>=1.1,<3'")


class EngineError(RecipeError):
    """The chosen engine cannot run this recipe, or is not installed (a one-line user error)."""


def require_composer() -> Any:
    """The ``composer`` package, or a one-line EngineError saying how to install it."""
    try:
        import composer  # its __init__ imports the Trainer: torchmetrics, mosaicml-cli, coolname
    except ImportError as e:
        raise EngineError(f"--engine composer needs MosaicML Composer, which is not installed here ({e}); "
                          f"it pins an older torch, so install it beside vtok's torch with: {COMPOSER_INSTALL}"
                          ) from e
    return composer


def composer_trainer(recipe: Recipe, resume: str = "", **kwargs: Any) -> Any:
    """``recipe`` as a ``composer.Trainer`` (see :mod:`vtok.integrations.composer`)."""
    require_composer()
    from vtok.integrations.composer import composer_trainer as build

    return build(recipe, resume=resume, **kwargs)


def composer_fit(recipe: Recipe, resume: str = "") -> dict[str, Any]:
    """Train ``recipe`` under Composer to ``train.steps``; returns {"step", "status", "run_dir",
    "checkpoint", "metrics", "is_main"} for the command's summary."""
    require_composer()
    from vtok.integrations.composer import fit

    return fit(recipe, resume=resume)


__all__ = ["COMPOSER_INSTALL", "EngineError", "composer_fit", "composer_trainer", "require_composer"]
