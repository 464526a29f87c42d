"""Evaluation outputs: metrics, sample grids and reports used by ``vtok eval`` and ``vtok demo``."""
