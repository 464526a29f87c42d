"""Parallelism from the outside: process groups and DDP / FSDP2 / DeepSpeed strategies.

Model code never imports this package; the trainer wraps a task's modules with a strategy.
"""
from vtok.parallel.dist import DistInfo, init_distributed
from vtok.parallel.strategy import Strategy, build_strategy

__all__ = ["DistInfo", "Strategy", "build_strategy", "init_distributed"]
