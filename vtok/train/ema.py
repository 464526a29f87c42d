"""Exponential moving average of module parameters, kept in fp32 beside the trained weights."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of ``module``'s parameters: ``shadow = decay * shadow + (1 - decay) * param``.

    Works on plain, DDP-unwrapped and FSDP2-sharded parameters alike (the shadow of a sharded
    DTensor is a DTensor with the same sharding, so each rank keeps only its shard).
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        names = list(self.shadow)
        params = dict(module.named_parameters())
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [params[n].detach().float() for n in names], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for n, t in self.shadow.items():
            t.copy_(state[n])
