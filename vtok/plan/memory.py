"""Per-GPU memory and step time of a profiled recipe under each parallel strategy vtok runs.

The state a rank holds, in bytes, for P trainable parameters on N ranks (S: the FSDP2 shard group):

| strategy | parameters | gradients | optimizer (fp32 master + Adam moments) | working buffers |
|---|---|---|---|---|
| ddp | 4P | 4P | 8P | 4P (DDP's gradient buckets) |
| fsdp2 | 4P/N | 4P/N | 8P/N | the unsharded root + 2 blocks (all-gather prefetch) + 1 block's grads |
| hsdp | 4P/S | 4P/S | 8P/S | as fsdp2 (S = GPUs per node: shard in a node, replicate across) |
| zero1 | wP | wP + 4P/N | 4P/N (master, fp32 runs: a copy) + 8P/N | |
| zero2 | wP | 4P/N + a reduce bucket | 4P/N + 8P/N | |
| zero3 | wP/N | 4P/N | 4P/N + 8P/N | 2 blocks + the root, gathered |

w = 2 with ``train.precision=bf16`` (DeepSpeed then keeps bf16 weights and an fp32 master copy), 4
otherwise. vtok's DDP and FSDP2 keep fp32 weights and autocast (FSDP2 gathers them in
``parallel.fsdp_param_dtype``). Activations come from the meta-device profile (profile.py), frozen
modules (teachers, VAEs, T5) are replicated on every rank. Step time = FLOPs per rank / (peak x MFU),
with activation checkpointing adding one more forward of the blocks; communication is not modelled.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vtok.plan.gpus import GPU
from vtok.plan.profile import TaskProfile

GIB = 2**30
HEADROOM = 0.9  # of a GPU's memory usable for tensors (CUDA context, NCCL buffers, fragmentation)
DS_REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size, elements
# less communication first: DDP and ZeRO-1/2 move 2P per step, FSDP2 / ZeRO-3 3P (+ re-gathers); HSDP's
# gathers stay inside a node
COMM_ORDER = ("ddp", "zero1", "zero2", "hsdp", "fsdp2", "zero3")


@dataclass
class Cluster:
    """Where the recipe would run: ``gpus`` of ``gpu``, ``gpus_per_node`` per node, at ``mfu``."""

    gpu: GPU
    gpus: int
    gpus_per_node: int = 8
    mfu: float = 0.4


@dataclass
class Option:
    """One strategy (with or without activation checkpointing): bytes per rank and time per step."""

    strategy: str
    checkpointing: bool
    params: float
    grads: float
    optimizer: float
    activations: float
    working: float
    frozen: float
    fits: bool = False
    step_s: float = 0.0
    samples_per_s: float = 0.0
    days: float = 0.0
    gpu_hours: float = 0.0
    cost: float = 0.0
    overrides: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.working + self.frozen

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def state_bytes(strategy: str, prof: TaskProfile, world: int, *, bf16: bool,
                fsdp_param_bytes: int = 4, shard_size: int = 8) -> dict[str, float]:
    """Parameter, gradient, optimizer-state and working-buffer bytes per rank (see the module table);
    ``shard_size``: the hsdp shard group (GPUs per node)."""
    p = float(prof.params)
    block = float(max((m.largest_block for m in prof.modules.values()), default=0))
    root = float(sum(m.root_params for m in prof.modules.values() if m.blocks))
    n = float(world)
    if strategy == "ddp":
        return {"params": 4 * p, "grads": 4 * p, "optimizer": 8 * p, "working": 4 * p if world > 1 else 0.0}
    if strategy in ("fsdp2", "hsdp"):
        n = float(min(shard_size, world)) if strategy == "hsdp" else n
        gathered = (root + 2 * block) * fsdp_param_bytes + block * 4 if world > 1 else 0.0
        return {"params": 4 * p / n, "grads": 4 * p / n, "optimizer": 8 * p / n, "working": gathered}
    if strategy.startswith("zero"):
        stage, w = int(strategy[-1]), (2 if bf16 else 4)
        optimizer = 12 * p / n  # fp32 master partition + Adam moments
        if stage == 1:
            return {"params": w * p, "grads": w * p + 4 * p / n, "optimizer": optimizer, "working": 0.0}
        if stage == 2:
            return {"params": w * p, "grads": 4 * p / n, "optimizer": optimizer,
                    "working": min(DS_REDUCE_BUCKET, p) * w}
        return {"params": w * p / n, "grads": 4 * p / n, "optimizer": optimizer, "working": (root + 2 * block) * w}
    raise ValueError(f"unknown strategy {strategy!r}; known: {COMM_ORDER}")


def overrides_for(strategy: str, checkpointing: bool, shard_size: int = 8) -> list[str]:
    """The recipe overrides that select ``strategy`` (and activation checkpointing)."""
    out = (["parallel.strategy=deepspeed", f"parallel.deepspeed.zero_stage={strategy[-1]}"]
           if strategy.startswith("zero") else
           ["parallel.strategy=fsdp2", f"parallel.fsdp_shard_size={shard_size}"] if strategy == "hsdp" else
           [f"parallel.strategy={strategy}"])
    return out + (["train.activation_checkpointing=true"] if checkpointing else [])


def plan_options(prof: TaskProfile, cluster: Cluster, *, steps: int, global_batch: int,
                 fsdp_param_bytes: int = 4) -> list[Option]:
    """Every strategy with and without activation checkpointing, those that fit first, then the
    fastest, then the least communication."""
    n = cluster.gpus
    rate = cluster.gpu.bf16_tflops * 1e12 * cluster.mfu
    options = []
    hybrid = n > cluster.gpus_per_node and n % cluster.gpus_per_node == 0  # several nodes to replicate over
    for strategy in COMM_ORDER:
        if strategy == "hsdp" and not hybrid:
            continue
        for ckpt in (False, True):
            if ckpt and not any(m.blocks for m in prof.modules.values()):
                continue  # nothing to checkpoint
            state = state_bytes(strategy, prof, n, bf16=prof.precision == "bf16", fsdp_param_bytes=fsdp_param_bytes,
                                shard_size=cluster.gpus_per_node)
            opt = Option(strategy, ckpt, activations=float(prof.activation_bytes(ckpt)), frozen=float(prof.frozen_bytes),
                         overrides=overrides_for(strategy, ckpt, cluster.gpus_per_node), **state)
            flops = prof.flops_per_sample + (prof.forward_flops_per_sample if ckpt else 0.0)
            opt.step_s = flops * global_batch / n / rate if rate else 0.0
            opt.samples_per_s = global_batch / opt.step_s if opt.step_s else 0.0
            opt.days = steps * opt.step_s / 86400
            opt.gpu_hours = steps * opt.step_s * n / 3600
            opt.cost = opt.gpu_hours * cluster.gpu.price_per_hour
            opt.fits = opt.total <= HEADROOM * cluster.gpu.memory_bytes
            options.append(opt)
    return sorted(options, key=lambda o: (not o.fits, round(o.step_s, 9), COMM_ORDER.index(o.strategy), o.total))
