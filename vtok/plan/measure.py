"""What a rank really holds, to check ``vtok plan`` against: parameter and optimizer-state bytes of a
set-up strategy, and the activation bytes a forward leaves for backward (torch's memory profiler).

    trainer = Trainer(recipe); trainer.fit()
    measured_state(trainer.strategy)     # {"params": ..., "optimizer": ...} bytes on this rank
    loss, kept = kept_by_forward(lambda: task.loss("main", batch, 0)[0])
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` on this rank (a DTensor counts its local shard; a storage counts once)."""
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _adam_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]


def measured_state(strategy: Any) -> dict[str, int]:
    """This rank's parameter bytes and optimizer-state bytes (fp32 master copies + Adam moments) under a
    set-up vtok strategy (DDP, FSDP2 or DeepSpeed ZeRO 1-3)."""
    params = [getattr(p, "ds_tensor", p) for m in strategy.raw.values() for p in m.parameters()]
    if strategy.name != "deepspeed":
        return {"params": local_bytes(params),
                "optimizer": local_bytes(t for o in strategy.optimizers.values() for t in _adam_state(o))}
    optimizer: list[torch.Tensor] = []
    for engine in strategy.engines.values():
        zero = engine.optimizer
        optimizer += list(getattr(zero, "single_partition_of_fp32_groups", []))  # ZeRO-1/2 master
        optimizer += list(getattr(zero, "fp32_partitioned_groups_flat", []))  # ZeRO-3 master
        optimizer += _adam_state(zero.optimizer)
    return {"params": local_bytes(params), "optimizer": local_bytes(optimizer)}


def kept_by_forward(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the bytes it allocated that are still alive when it returns (what the
    forward keeps for backward), read from torch's memory profiler timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        out = fn()
    alive: dict[Any, int] = {}
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            alive[key] = size
        elif action == Action.DESTROY:
            alive.pop(key, None)
    return out, sum(alive.values())
