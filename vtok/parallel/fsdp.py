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
        mesh = self.mesh()
        if mesh is not None:
            kwargs["mesh"] = mesh
        blocks = blocks_of(module)
        for block in blocks:  # one all-gather per block: memory is params of one block at a time
            if compile:
                block.compile()
            fully_shard(block, **kwargs)
        if compile and not blocks:
            module.compile()
        fully_shard(module, **kwargs)
        return module

    def mesh(self):
        """The device mesh: None (shard over every rank) unless ``parallel.fsdp_shard_size`` is set
        below the world size; then a 2D (replicate, shard) mesh: hybrid sharding (HSDP), parameters
        sharded within groups of that many ranks (a node) and replicated across the groups."""
        size, world = self.cfg.fsdp_shard_size, self.info.world_size
        if not size or size >= world:
            return None
        if world % size:
            from vtok.config import RecipeError

            raise RecipeError(f"parallel.fsdp_shard_size={size} does not divide the {world} ranks; use a "
                              "divisor (e.g. the GPUs per node) or 0 to shard over all ranks")
        if getattr(self, "_mesh", None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.info.device.type, (world // size, size),
                                          mesh_dim_names=("replicate", "shard"))
        return self._mesh

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

    @contextlib.contextmanager
    def gathered(self, name: str) -> Iterator[nn.Module]:
        """FSDP2 gathers a root module's own parameters (embeddings, final norm, output heads) only in
        its forward; unshard them here. Blocks gather theirs in their own forwards."""
        module = self.raw[name]
        module.unshard()
        try:
            yield module
        finally:
            module.reshard()

    def backward(self, loss: torch.Tensor, name: str, last: bool, grad_accum: int) -> None:
        super().backward(loss, name, last, grad_accum)
        for m in self.raw.values():  # a double backward's hold ends with the loss's backward
            release_after_double_backward(m)

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

        from vtok.train.optim import keep_kernel

        state = self._state(extra)
        dcp.load(state, checkpoint_id=str(path / "dcp"))  # in place, resharded to this world size
        for n, m in self.raw.items():
            set_model_state_dict(m, state[f"model.{n}"])
        for name, opt in self.optimizers.items():
            set_optimizer_state_dict(self._group(name), opt, state[f"optim.{name}"])
            keep_kernel(opt)

    def export_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.raw[name], options=opts)


_HELD = "_vtok_unsharded_through_backward"


def hold_for_double_backward(module: nn.Module) -> None:
    """Keep FSDP2 ``module``'s gathered parameters after the backward in progress (a no-op for an
    unwrapped module). A double backward (``autograd.grad(create_graph=True)``, e.g. an R1 penalty)
    saves the *unsharded* parameters in the graph of the gradient it returns; FSDP2 frees them when
    that first backward ends, so the loss's backward through that graph would read freed storage
    ("data is not allocated yet"). Call before the first backward; ``FSDP2Strategy.backward``
    restores resharding and frees them after the loss's backward (``release_after_double_backward``),
    which also registers the sharded parameters (and their reduced grads) on the module again."""
    if hasattr(module, "set_reshard_after_backward"):  # an FSDPModule (the root of its sub-wraps)
        module.set_reshard_after_backward(False)
        setattr(module, _HELD, True)


def release_after_double_backward(module: nn.Module) -> None:
    """Undo ``hold_for_double_backward`` on ``module``: reshard after backward again, free now."""
    if not getattr(module, _HELD, False):
        return
    module.set_reshard_after_backward(True)
    for sub in module.modules():
        if hasattr(sub, "reshard"):
            sub.reshard()
    setattr(module, _HELD, False)


def read_dcp_module(path: Path, name: str, template: nn.Module, ema: bool) -> dict[str, torch.Tensor]:
    """Module ``name`` (and its EMA with ``ema``) from an FSDP2 DCP checkpoint, as full tensors, in
    one process (DCP reshards to the plain template's shapes; no process group needed)."""
    import torch.distributed.checkpoint as dcp

    model = {k: torch.empty_like(v, device="cpu") for k, v in template.state_dict().items()}
    wanted: dict[str, dict[str, torch.Tensor]] = {f"model.{name}": model}
    if ema:
        wanted[f"ema-{name}"] = {k: torch.empty(p.shape, dtype=torch.float32)
                                 for k, p in template.named_parameters()}
    no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        dcp.load(wanted, checkpoint_id=str(path / "dcp"), no_dist=no_dist)
    except Exception as e:  # DCP reports missing keys as a generic CheckpointException
        what = f"an EMA of '{name}'" if ema else f"module '{name}'"
        raise FileNotFoundError(f"{path}/dcp holds no {what} ({type(e).__name__}); "
                                f"{'export without --ema' if ema else 'check the recipe'}") from None
    return {**model, **wanted.get(f"ema-{name}", {})}
