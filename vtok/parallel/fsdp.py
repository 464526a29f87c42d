"""FSDP2: ``fully_shard`` per block and per root module, sharded checkpoints with DCP.

Checkpoints go through ``torch.distributed.checkpoint`` with the ``get_*_state_dict`` helpers, so a
run saved at N ranks loads at M ranks (DCP reshards on load).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from vtok.parallel.strategy import Strategy, blocks_of


class FSDP2Strategy(Strategy):
    name = "fsdp2"

    def wrap_module(self, name: str, module: nn.Module, compile: bool) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        param_dtype = torch.bfloat16 if self.cfg.fsdp_param_dtype == "bf16" else None
        kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  "reshard_after_forward": self.cfg.fsdp_reshard_after_forward}
        if self.cfg.fsdp_cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        blocks = blocks_of(module)
        for block in blocks:  # one all-gather per block: memory is params of one block at a time
            if compile:
                block.compile()
            fully_shard(block, **kwargs)
        if compile and not blocks:
            module.compile()
        fully_shard(module, **kwargs)
        return module

    def _set_trainable(self, modules: set[str]) -> None:
        """No-op: FSDP2 builds each unsharded parameter once, so flipping ``requires_grad`` on the
        sharded one would not stop gradients. Other phases' modules get (reduce-scattered) grads,
        which ``begin_phase`` of their own phase zeroes before use."""

    @contextlib.contextmanager
    def micro_batch(self, name: str, last: bool) -> Iterator[None]:
        for m in self.phases[name]:  # reduce-scatter grads only on the last micro-batch
            self.raw[m].set_requires_gradient_sync(last)
        with self.autocast():
            yield

    def _group(self, name: str) -> nn.Module:
        modules = self.phase_modules(name)
        return modules[0] if len(modules) == 1 else nn.ModuleList(modules)

    def _state(self, extra: dict[str, dict[str, torch.Tensor]]) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {f"model.{n}": get_model_state_dict(m) for n, m in self.raw.items()}
        for name, opt in self.optimizers.items():
            state[f"optim.{name}"] = get_optimizer_state_dict(self._group(name), opt)
        state.update(extra)
        return state

    def save(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(extra), checkpoint_id=str(path / "dcp"))

    def load(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state(extra)
        dcp.load(state, checkpoint_id=str(path / "dcp"))  # in place, resharded to this world size
        for n, m in self.raw.items():
            set_model_state_dict(m, state[f"model.{n}"])
        for name, opt in self.optimizers.items():
            set_optimizer_state_dict(self._group(name), opt, state[f"optim.{name}"])

    def export_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.raw[name], options=opts)
