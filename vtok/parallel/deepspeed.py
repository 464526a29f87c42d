"""DeepSpeed ZeRO 1/2/3: one engine per optimizer; the recipe's ``parallel.deepspeed`` section
becomes the engine config (``extra`` is merged in last for anything vtok does not set)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from vtok.config.schema import OptimConfig
from vtok.parallel.dist import any_rank_flags
from vtok.parallel.strategy import Strategy, apply_activation_checkpointing, zero_loss


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    # The engine owns the gradient buffers and a "skipped" step still updates Adam's moments (lr 0),
    # so a NaN backward would poison them: losses are checked per micro-batch (one host sync each).
    lazy_skip = False

    def ds_config(self, micro_batch_size: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
        cfg = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": self.cfg.deepspeed.zero_stage},
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        return merge(cfg, dict(self.cfg.deepspeed.extra))

    def setup(self, task, optim_cfgs: dict[str, OptimConfig], *, micro_batch_size: int,
              grad_accum: int, grad_clip: float, compile: bool, activation_checkpointing: bool) -> None:
        import deepspeed

        from vtok.train.optim import build_adamw

        self.phases = {k: list(v) for k, v in task.optimizers.items()}
        self.raw = dict(task.modules)
        for name, modules in self.phases.items():
            if len(modules) != 1:
                raise ValueError(f"deepspeed: optimizer '{name}' updates {modules}; each DeepSpeed "
                                 "engine owns one module, so give each optimizer exactly one module")
        self.engines = {}
        config = self.ds_config(micro_batch_size, grad_accum, grad_clip)
        for opt_name, (mod_name,) in self.phases.items():
            module = self.raw[mod_name].to(self.info.device)
            if activation_checkpointing:
                apply_activation_checkpointing(module)
            if compile:
                module.compile()
            opt = build_adamw([module], optim_cfgs[opt_name], fused=False)  # DeepSpeed steps its own partitions
            engine, ds_opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=config,
                                                        dist_init_required=False)
            self.engines[opt_name] = engine
            self.optimizers[opt_name] = ds_opt
            self.wrapped[mod_name] = engine
        self._trainable = {id(p) for m in self.raw.values() for p in m.parameters() if p.requires_grad}
        for frozen in getattr(task, "frozen", {}).values():
            frozen.to(self.info.device).eval().requires_grad_(False)
        task.modules = dict(self.wrapped)
        task.strategy = self
        self.task = task

    @contextlib.contextmanager
    def gathered(self, name: str):
        """ZeRO-3 partitions every parameter: gather them all for the duration (collective)."""
        module = self.raw[name]
        if self.cfg.deepspeed.zero_stage != 3:
            yield module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield module

    def begin_phase(self, name: str) -> None:
        """Freeze other phases' modules and let the task call them *unwrapped*: an engine whose
        outputs receive gradients runs its backward epilogue (gradient reduction) even when its
        own parameters are frozen, which breaks its accumulation state. The engine owns zeroing."""
        mine = set(self.phases[name])
        self._set_trainable(mine)
        for m in self.raw:
            self.task.modules[m] = self.wrapped[m] if m in mine else self.raw[m]

    def end_phase(self, name: str) -> None:
        super().end_phase(name)
        self.task.modules.update(self.wrapped)

    @contextlib.contextmanager
    def micro_batch(self, name: str, last: bool):
        with self.autocast():  # the engine itself decides when to reduce (at the GAS boundary)
            yield

    def backward(self, loss: torch.Tensor, name: str, last: bool, grad_accum: int) -> None:
        engine = self.engines[name]
        engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not last:
            engine.step()  # a no-op for the weights until the accumulation boundary

    def skip_micro_batch(self, name: str, last: bool, grad_accum: int) -> None:
        # The engine counts micro-steps to find the accumulation boundary: feed it a zero loss.
        with self.autocast():
            loss = zero_loss(self.phase_modules(name))
        self.backward(loss, name, last, grad_accum)

    def step(self, name: str, max_norm: float,
             skip: bool | torch.Tensor = False) -> tuple[torch.Tensor | float, bool]:
        """The engine's step (the weights change only at the accumulation boundary); returns
        (grad norm, skipped). ``skip`` may be a device flag tensor: reduced over ranks here."""
        engine = self.engines[name]
        if torch.is_tensor(skip):
            skip = any_rank_flags(skip)[0]
        if skip:  # lr 0 leaves the weights as they are; Adam's moments still see this step
            saved = [g["lr"] for g in engine.optimizer.param_groups]
            for g in engine.optimizer.param_groups:
                g["lr"] = 0.0
        engine.step()
        if skip:
            for g, lr in zip(engine.optimizer.param_groups, saved):
                g["lr"] = lr
        norm = engine.get_global_grad_norm()  # a float or a device tensor: converted when logged
        return (norm if norm is not None else float("nan")), bool(skip)

    def save(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(path), tag=name)
        self.save_extra(path, extra)

    def load(self, path: Path, extra: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, engine in self.engines.items():
            engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        self.load_extra(path, extra)

    def export_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        module = self.raw[name]
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


def read_zero_module(path: Path, name: str, template: torch.nn.Module, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Module ``name``'s fp32 weights from the ZeRO files of its engine (tagged with the optimizer
    that owns it, from ``meta['phases']``), merged over ``template``'s buffers. DeepSpeed's reader
    unpickles its own files: only read checkpoints vtok wrote (see the README's security note)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    phases = meta.get("phases") or {name: [name]}
    tag = next((opt for opt, mods in phases.items() if name in mods), None)
    if tag is None:
        raise FileNotFoundError(f"{path}: no optimizer of this checkpoint owns module '{name}'")
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    buffers = {k: v for k, v in template.state_dict().items() if k not in state}
    return {**buffers, **{k: v.float() for k, v in state.items()}}
