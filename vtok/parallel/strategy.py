"""Strategies: how a task's modules are wrapped, stepped and checkpointed. Model code never sees them.

The trainer talks to a strategy through this small interface, per optimizer *phase*::

    strategy.setup(task, optim_cfgs, ...)           # wrap modules, build optimizers
    strategy.begin_phase(name)                      # zero grads; freeze the other phases' modules
    with strategy.micro_batch(name, last):          # no grad sync except on the last micro-batch
        loss = task.loss(...)
    strategy.backward(loss, name, last)
    grad_norm, skipped = strategy.step(name, max_norm, bad)  # clip + optimizer step (or not)
    strategy.end_phase(name)

``DDPStrategy`` (this file; also the single-process path) keeps full replicas; ``FSDP2Strategy``
(fsdp.py) shards parameters and optimizer state per block; ``DeepSpeedStrategy`` (deepspeed.py)
hands each optimizer's module to a ZeRO engine.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vtok.config.schema import OptimConfig, ParallelConfig
from vtok.parallel.dist import DistInfo, any_rank_flags, barrier


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks a model exposes through ``blocks()`` (the unit of FSDP sharding and
    activation checkpointing); empty when it has none."""
    return list(module.blocks()) if hasattr(module, "blocks") else []


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Wrap each block of ``module`` in non-reentrant activation checkpointing; returns the count."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac)

    targets = set(map(id, blocks_of(module)))
    if targets:
        apply_ac(module, check_fn=lambda m: id(m) in targets)
    return len(targets)


def zero_loss(modules: list[nn.Module]) -> torch.Tensor:
    """A loss of exactly 0 whose gradient touches every trainable parameter (keeps per-parameter
    gradient hooks and engines' micro-step counters in step when a micro-batch is skipped)."""
    terms = [p.sum() * 0.0 for m in modules for p in m.parameters() if p.requires_grad]
    return torch.stack(terms).sum()


def for_double_backward(module: nn.Module) -> nn.Module:
    """The module to call for a forward whose outputs are differentiated twice: first by
    ``autograd.grad(..., create_graph=True)`` w.r.t. the *inputs* only (an R1 penalty), then by the
    strategy's backward of a loss that holds that gradient. A DeepSpeed engine runs its gradient
    reduction epilogue after *any* backward through its outputs (the inputs-only one has no
    gradients to reduce: IndexError in ZeRO's average_tensor), so the forward goes through the engine's
    module; its parameters' gradients still reach the engine in ``engine.backward(loss)``. FSDP2 keeps
    the gathered parameters through the first backward (see ``fsdp.hold_for_double_backward``).
    DDP and plain modules are returned as they are."""
    ds = sys.modules.get("deepspeed")
    if ds is not None and isinstance(module, ds.DeepSpeedEngine):
        return module.module
    if hasattr(module, "set_reshard_after_backward"):  # FSDP2
        from vtok.parallel.fsdp import hold_for_double_backward

        hold_for_double_backward(module)
    return module


class Strategy:
    """Base class and the shared bookkeeping; subclasses override wrapping, sync and checkpoints."""

    name = "ddp"  # the base class is also the DDP / single-process strategy
    # True: the trainer backpropagates every micro-batch, checks the losses on the device and passes
    # the flag to step(), which drops the whole phase (no host sync per micro-batch). False: the
    # trainer checks each loss on the host and calls skip_micro_batch instead of a NaN backward.
    lazy_skip = True

    def __init__(self, cfg: ParallelConfig, info: DistInfo, precision: str):
        self.cfg, self.info, self.precision = cfg, info, precision
        self.raw: dict[str, nn.Module] = {}  # unwrapped modules by task name
        self.wrapped: dict[str, nn.Module] = {}
        self.phases: dict[str, list[str]] = {}  # optimizer name -> module names
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._trainable: set[int] = set()  # ids of parameters that train at all

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self, task, optim_cfgs: dict[str, OptimConfig], *, micro_batch_size: int,
              grad_accum: int, grad_clip: float, compile: bool, activation_checkpointing: bool) -> None:
        """Move, wrap and (re)place ``task.modules``; build one optimizer per phase."""
        from vtok.train.optim import build_adamw

        self.phases = {k: list(v) for k, v in task.optimizers.items()}
        self.raw = dict(task.modules)
        for name, module in self.raw.items():
            module.to(self.info.device)
            if activation_checkpointing and not apply_activation_checkpointing(module):
                print(f"warning: train.activation_checkpointing has no effect on '{name}' "
                      "(it exposes no blocks())")
            self.wrapped[name] = self.wrap_module(name, module, compile)
        # After wrapping: FSDP2 replaces parameters with sharded ones.
        self._trainable = {id(p) for m in self.raw.values() for p in m.parameters() if p.requires_grad}
        for frozen in getattr(task, "frozen", {}).values():
            frozen.to(self.info.device).eval().requires_grad_(False)
        for opt_name, modules in self.phases.items():
            self.optimizers[opt_name] = build_adamw([self.raw[m] for m in modules], optim_cfgs[opt_name])
        task.modules = dict(self.wrapped)
        task.strategy = self

    def wrap_module(self, name: str, module: nn.Module, compile: bool) -> nn.Module:
        if compile:
            module.compile()
        if not self.info.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward + loss when ``train.precision=bf16`` (params stay fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, name: str) -> torch.optim.Optimizer:
        return self.optimizers[name]

    # ---- access for tasks (through TrainTask.unwrapped / TrainTask.gathered) --------------------
    def unwrap(self, name: str) -> nn.Module:
        """Module ``name`` without its DDP / engine wrapper (for attributes and methods other than
        ``forward``; its forward does not sync gradients)."""
        return self.raw[name]

    @contextlib.contextmanager
    def gathered(self, name: str) -> Iterator[nn.Module]:
        """Module ``name`` with every parameter usable outside ``forward`` (e.g. ``generate``) for the
        duration; collective under sharding strategies, so every rank enters it together. Replicated
        parameters (DDP, single process) need nothing."""
        yield self.raw[name]

    def phase_modules(self, name: str) -> list[nn.Module]:
        return [self.raw[m] for m in self.phases[name]]

    # ---- one phase ----------------------------------------------------------------------------
    def begin_phase(self, name: str) -> None:
        """Zero this phase's grads (another phase's backward may have written them) and stop grads
        to modules that belong to other phases (e.g. the discriminator in the generator phase)."""
        self.optimizers[name].zero_grad(set_to_none=True)
        self._set_trainable(set(self.phases[name]))

    def end_phase(self, name: str) -> None:
        self._set_trainable(set(self.raw))

    def _set_trainable(self, modules: set[str]) -> None:
        for m, module in self.raw.items():
            for p in module.parameters():
                p.requires_grad_(m in modules and id(p) in self._trainable)

    @contextlib.contextmanager
    def micro_batch(self, name: str, last: bool) -> Iterator[None]:
        """Forward + backward of one micro-batch; gradients are all-reduced only on the last."""
        with contextlib.ExitStack() as stack:
            for m, module in self.wrapped.items():
                # Other phases' modules never sync here (they get no grads); ours only when `last`.
                if hasattr(module, "no_sync") and (not last or m not in self.phases[name]):
                    stack.enter_context(module.no_sync())
            stack.enter_context(self.autocast())
            yield

    def backward(self, loss: torch.Tensor, name: str, last: bool, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    def skip_micro_batch(self, name: str, last: bool, grad_accum: int) -> None:
        """Only when ``lazy_skip`` is False: a micro-batch whose loss was non-finite on some rank
        gets no backward (the step is skipped)."""

    def step(self, name: str, max_norm: float,
             skip: bool | torch.Tensor = False) -> tuple[torch.Tensor | float, bool]:
        """Clip and step the phase's optimizer; returns (pre-clip grad norm, skipped).

        ``skip`` means "a loss of this phase was non-finite": a bool every rank agrees on, or this
        rank's 0-dim flag tensor on the device, OR-reduced over ranks here (its non-finite gradients
        were computed and are dropped). ``skipped`` is that reduced flag; the norm is NaN then. A
        non-finite grad norm also leaves the step out (not counted as skipped). One host sync for
        the decision; the norm stays on the device."""
        opt = self.optimizers[name]
        if not torch.is_tensor(skip) and skip:
            opt.zero_grad(set_to_none=True)
            return float("nan"), True
        params = [p for m in self.phase_modules(name) for p in m.parameters() if p.grad is not None]
        norm = self.clip(params, max_norm)
        flag = skip.reshape(()) if torch.is_tensor(skip) else torch.zeros((), device=norm.device)
        flags = torch.stack([flag.to(norm.device).float(), (~torch.isfinite(norm)).float()])
        bad, bad_norm = any_rank_flags(flags)
        if not (bad or bad_norm):
            opt.step()
        opt.zero_grad(set_to_none=True)  # also drops the NaN gradients of a skipped phase
        return (float("nan") if bad else norm), bad

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip ``params``' gradients in place; the pre-clip total norm, a 0-dim tensor on the device."""
        if not params:
            return torch.zeros((), device=self.info.device)
        total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return total.full_tensor() if hasattr(total, "full_tensor") else total

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write model, optimizer and ``extra`` tensor dicts (EMA) under ``path`` (rank 0 writes)."""
        from safetensors.torch import save_model

        if self.info.is_main:
            for name, module in self.raw.items():
                save_model(module, str(path / f"model-{name}.safetensors"))
            for name, opt in self.optimizers.items():
                torch.save(opt.state_dict(), path / f"optim-{name}.pt")
        self.save_extra(path, extra)

    def load(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of ``save``: every rank reads the same files (safetensors / weights_only)."""
        from safetensors.torch import load_model

        from vtok.train.optim import keep_kernel

        for name, module in self.raw.items():
            load_model(module, str(path / f"model-{name}.safetensors"), device=str(self.info.device))
        for name, opt in self.optimizers.items():
            file, device = path / f"optim-{name}.pt", self.info.device
            opt.load_state_dict(torch.load(file, map_location=device, weights_only=True))
            keep_kernel(opt)
        self.load_extra(path, extra)

    def save_extra(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replicated tensor dicts (EMA of unsharded modules) as safetensors from rank 0."""
        from safetensors.torch import save_file

        if self.info.is_main:
            for name, tensors in extra.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          str(path / f"{name}.safetensors"))
        barrier()

    def load_extra(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        from safetensors.torch import load_file

        for name, tensors in extra.items():
            saved = load_file(str(path / f"{name}.safetensors"), device=str(self.info.device))
            for k, t in tensors.items():
                t.copy_(saved[k])

    def export_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The full (unsharded) weights of module ``name`` on CPU; called on every rank."""
        return {k: v.detach().cpu() for k, v in self.raw[name].state_dict().items()}


def build_strategy(cfg: ParallelConfig, info: DistInfo, precision: str) -> Strategy:
    """The strategy named by ``parallel.strategy``."""
    if cfg.strategy == "fsdp2":
        from vtok.parallel.fsdp import FSDP2Strategy

        return FSDP2Strategy(cfg, info, precision)
    if cfg.strategy == "deepspeed":
        from vtok.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, info, precision)
    return Strategy(cfg, info, precision)


def read_checkpoint_module(path: Path, name: str, template: nn.Module, ema: bool = False
                           ) -> dict[str, torch.Tensor]:
    """Full float weights of module ``name`` from the vtok checkpoint directory ``path``, read in this
    process without wrapping anything, whichever strategy wrote it (``meta.json`` says): replicated
    safetensors (DDP), DCP shards (FSDP2, resharded to full tensors) or DeepSpeed's ZeRO files.
    ``template``: a plain module of the same structure (gives names and shapes). ``ema``: the EMA
    shadow replaces the parameters it covers (an error when the checkpoint has none)."""
    import json

    from safetensors.torch import load_file

    meta = json.loads((path / "meta.json").read_text())
    strategy = meta.get("strategy", "ddp")
    if strategy == "fsdp2":
        from vtok.parallel.fsdp import read_dcp_module

        return read_dcp_module(path, name, template, ema)
    if strategy == "deepspeed":
        from vtok.parallel.deepspeed import read_zero_module

        state = read_zero_module(path, name, template, meta)
    else:
        state = load_file(str(path / f"model-{name}.safetensors"))
    if ema:
        file = path / f"ema-{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no EMA of '{name}' (train.ema.decay was 0); export without --ema")
        state.update(load_file(str(file)))
    return state


def extra_state(ema: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """EMA objects -> {'ema-<module>': shadow tensors} for ``Strategy.save/load``."""
    return {f"ema-{name}": e.shadow for name, e in ema.items()}
