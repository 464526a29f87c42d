"""Evaluation outputs: metrics, sample grids and reports used by ``vtok eval`` and ``vtok demo``."""


class EvalError(ValueError):
    """A wrong input to an evaluation (weights file, samples file, reference statistics, too few images)."""
