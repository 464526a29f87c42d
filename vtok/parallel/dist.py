"""Process-group set-up from torchrun's environment (Slurm launches torchrun through srun)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_minutes: float = 30,
                     require_group: bool = False) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...); a plain
    ``python`` run is a world of one. ``backend="auto"`` picks nccl with CUDA, gloo otherwise.
    ``require_group``: create a one-process group when not launched by torchrun (FSDP2 and DeepSpeed
    need a process group even alone)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world == 1 and require_group and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if (world > 1 or require_group) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, local_world, device)


class Progress:
    """Where each rank is, kept in the process group's key-value store (a connection of its own, which
    outlives a collective that timed out): ``mark(...)`` before work that ends in collectives, and
    after a collective fails, ``laggards()`` names the ranks that never got as far as this one. The
    ranks mark in lockstep, so a mark count behind the most advanced rank's means "stuck before here".
    A world of one keeps nothing."""

    def __init__(self, info: DistInfo):
        self.rank, self.world, self.count = info.rank, info.world_size, 0
        self.store = None
        if info.world_size > 1 and dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, AttributeError):  # no store to share: nothing to diagnose with
                self.store = None

    def mark(self, stage: str, step: int, phase: str, micro: int) -> None:
        """This rank reached ``stage`` ("forward" / "backward") of ``step``, optimizer ``phase``,
        micro-batch ``micro`` (nothing is formatted or sent in a world of one)."""
        if self.store is not None:
            self.count += 1
            where = f"the {stage} of step {step} ({phase}, micro-batch {micro})"
            self.store.set(f"vtok/progress/{self.rank}", f"{self.count}|{where}")

    def laggards(self) -> list[tuple[int, str]]:
        """(rank, the last place it reported) of every rank behind this one ([] when none is, or the
        store cannot be read)."""
        if self.store is None:
            return []
        behind = []
        try:
            for r in range(self.world):
                key = f"vtok/progress/{r}"
                if not self.store.check([key]):
                    behind.append((r, "before its first step"))
                    continue
                count, where = self.store.get(key).decode().split("|", 1)
                if int(count) < self.count:
                    behind.append((r, where))
        except (RuntimeError, ValueError):
            return []
        return behind


def shutdown_distributed() -> None:
    """Destroy the default process group, if this process made one. Call it before the interpreter
    exits: otherwise Gloo's worker threads may still hold tensors during finalization and the process
    aborts (SIGABRT, "terminate called without an active exception") after its work is done, which
    torchrun reports as a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_rank_flags(flags: torch.Tensor) -> list[bool]:
    """Element-wise "true on any rank" of a small flag tensor kept on the device: one all-reduce
    (when distributed) and one device->host copy for all of them."""
    t = flags.detach().reshape(-1).float()
    if dist.is_initialized():
        t = t.to(_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar over ranks (for logging); one all-reduce for the whole dict."""
    if not dist.is_initialized() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
