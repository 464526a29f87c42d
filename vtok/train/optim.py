"""AdamW with weight-decay groups, and the learning-rate schedule as a pure function of the step.

The schedule has no state of its own: the lr at step ``s`` is ``lr_at(cfg, s, total)``, so resuming
from a checkpoint's step restores it exactly.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from vtok.config.schema import OptimConfig

NO_DECAY_TYPES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (matrices, conv kernels) and not decayed (biases, norms, embeddings,
    and any parameter with fewer than 2 dims, e.g. learned scales and positional tables' biases)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(sub, NO_DECAY_TYPES) or p.ndim < 2 or "norm" in name or name.endswith("bias"):
                    no_decay.append(p)
                else:
                    decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """True when torch's fused AdamW kernel takes every parameter: plain (not DTensor / sharded)
    floating tensors on CPU or CUDA."""
    return all(type(p) in (nn.Parameter, torch.Tensor) and p.is_floating_point()
               and p.device.type in ("cpu", "cuda") for p in params)


def build_adamw(modules: Iterable[nn.Module], cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``modules`` (fp32 master weights: the parameters themselves stay fp32).

    ``fused``: torch's fused kernel (one pass over all tensors; the DiT-S/2 CPU step 0.96x -> 0.76x
    of the official code's in bench/dit_step.py); None = wherever :func:`can_fuse` allows, else the
    multi-tensor (foreach) path. Same update to fp32 rounding."""
    groups = param_groups(modules, cfg.weight_decay)
    if not groups:
        raise ValueError("optimizer has no trainable parameters")
    if fused is None:
        fused = can_fuse(p for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def keep_kernel(optimizer: torch.optim.Optimizer) -> None:
    """After loading a state dict (perhaps saved by another strategy, fused or not): every group keeps
    the kernel this optimizer was built with (``fused`` / ``foreach`` from its defaults)."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based, counted from ``cfg.start_step``).

    Linear warmup over ``warmup_steps``, then constant or cosine down to ``min_lr_ratio * lr`` at
    ``total_steps``.
    """
    step -= cfg.start_step
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.start_step - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
