"""A vtok recipe as a MosaicML Composer ``Trainer`` (``vtok train RECIPE --engine composer``).

    trainer = composer_trainer(recipe)   # the task, its data, optimizer and schedule, checkpoints
    trainer.fit()                        # resumes from <run_dir>/checkpoints-composer by itself

What maps to what (everything else is vtok's own code, called from here):

    train.task (one optimizer)   TaskModel, a ComposerModel: forward = task.loss(phase, batch, step)
    data + global_batch_size     StepBatches: one Composer batch = the step's grad_accum micro-batches
                                 from vtok's loader (vtok's Batches: device, uint8 -> [-1, 1]); Composer
                                 runs them as its micro-batches (device_train_microbatch_size)
    train.steps                  max_duration "<steps>ba"
    train.optim.<phase>          vtok's build_adamw; the lr schedule is LrAt, a torch LRScheduler that
                                 returns lr_at(cfg, step, steps) itself (stepped every batch)
    train.grad_clip              VtokState clips as vtok does after the last backward, and leaves the
                                 optimizer step out (grads dropped) when a loss or the norm is not finite
    train.precision=bf16         Composer "amp_bf16" on GPU; on CPU, where Composer allows fp32 only,
                                 vtok's CPU bf16 autocast around task.loss (fp32 weights either way)
    train.ema, eval_every,       VtokState: vtok's EMA, task.evaluate and MetricLogger (metrics.jsonl,
    log.*                        TensorBoard, W&B, progress bar) as in vtok's Trainer
    ckpt.every_steps, keep_last  save_interval "<n>ba", save_num_checkpoints_to_keep
    ckpt.dir                     save_folder <ckpt.dir or run_dir/checkpoints>-composer; Composer's
                                 autoresume takes its latest, or ckpt.resume / --resume (a file) loads
    seed                         init under seed (as vtok), then Composer's seed + rank per rank
    parallel.strategy=ddp        Composer's DDP (gloo on CPU, nccl on GPU; torchrun's environment)
    parallel.strategy=fsdp2      Composer's FSDP2 (fully_shard per block, then per module, as vtok;
                                 reshard_after_forward, fsdp_param_dtype; sharded DCP checkpoints).
                                 Runs on CPU with gloo; Composer's FSDP1 needs CUDA and is not used

The data position and each rank's RNG state travel in Composer's checkpoint as VtokState's state:
a resume continues the data stream where the run stopped and draws the same random numbers (vtok's
loader starts its epochs without drawing from the global RNG). Refused with a one-line EngineError (``check_recipe``,
``composer_trainer``): tasks with several optimizers (the GAN tokenizers), ``start_step`` > 0,
``parallel.strategy=deepspeed``, ``fsdp_cpu_offload`` and ``fsdp_shard_size``. Not mapped: SIGTERM/SIGUSR1 preemption
(Composer resumes from its last interval checkpoint). ``vtok export`` reads vtok checkpoints only.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from composer import Callback, DataSpec, State, Trainer
from composer.loggers import Logger
from composer.models import ComposerModel

from vtok.config import Recipe, recipe_to_yaml
from vtok.config.schema import OptimConfig
from vtok.integrations import EngineError
from vtok.parallel.dist import DistInfo, all_mean, any_rank_flags, init_distributed
from vtok.parallel.strategy import Strategy, apply_activation_checkpointing, blocks_of, build_strategy
from vtok.train.checkpoint import rng_state, set_rng_state
from vtok.train.ema import EMA
from vtok.train.metrics import MetricLogger, to_floats
from vtok.train.optim import build_adamw, lr_at
from vtok.train.task import TrainTask, build_task
from vtok.train.trainer import (COMPLETE, Batches, TrainingError, grad_accum_steps, load_loader_state,
                                optim_configs, peak_memory_mb)

CHECKPOINT_FILE = "ba{batch}-rank{rank}.pt"  # Composer's name pattern; "latest-rank0.pt" links the newest


def check_recipe(recipe: Recipe) -> None:
    """One-line EngineError for what this engine does not run (before anything is built)."""
    par = recipe.parallel
    if par.strategy == "deepspeed":
        raise EngineError("--engine composer runs parallel.strategy=ddp or fsdp2; Composer 0.32 has no "
                          "DeepSpeed: use --engine vtok for parallel.strategy=deepspeed")
    if par.strategy == "fsdp2" and par.fsdp_cpu_offload:
        raise EngineError("parallel.fsdp_cpu_offload=true: Composer's FSDP2 has no CPU offload; set it to "
                          "false or use --engine vtok")
    if par.strategy == "fsdp2" and par.fsdp_shard_size:
        raise EngineError(f"parallel.fsdp_shard_size={par.fsdp_shard_size}: hybrid sharding is not mapped to "
                          "Composer; set it to 0 (full sharding) or use --engine vtok")


def fsdp2_config(recipe: Recipe, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Composer's ``parallelism_config`` for ``parallel.strategy=fsdp2``, sharded as vtok shards:
    each module's ``blocks()`` one unit, the module itself (the rest) another; fp32 gradient
    reduction, parameters in ``parallel.fsdp_param_dtype`` for compute."""
    from composer.utils.parallelism import FSDP2Config

    for module in modules.values():  # Composer wraps the ComposerModel's children and asks this of the rest
        blocks = set(map(id, blocks_of(module)))
        module.fsdp_wrap_fn = lambda m, blocks=blocks: id(m) in blocks
    par = recipe.parallel
    mixed = {"param_dtype": "bf16" if par.fsdp_param_dtype == "bf16" else "fp32", "reduce_dtype": "fp32"}
    return {"fsdp": FSDP2Config(reshard_after_forward=par.fsdp_reshard_after_forward, mixed_precision=mixed)}


class TaskModel(ComposerModel):
    """One optimizer phase of a vtok task as a ComposerModel: ``forward(micro_batch)`` is the task's
    loss; the step's metrics are averaged over its micro-batches (as vtok's trainer logs them)."""

    def __init__(self, task: TrainTask, phase: str, grad_accum: int, cpu_bf16: bool):
        super().__init__()
        self.task, self.phase, self.grad_accum, self.cpu_bf16 = task, phase, grad_accum, cpu_bf16
        self.trained = {name: task.modules[name] for name in task.optimizers[phase]}
        for name, module in self.trained.items():  # direct children: Composer's DDP / FSDP units
            self.add_module(name, module)
        self.step = 0  # optimizer steps done: the step vtok passes to task.loss
        self.sums: dict[str, torch.Tensor | float] = {}
        self.nonfinite: torch.Tensor | None = None  # this rank's "a loss of this step was not finite"

    def begin_step(self, step: int) -> None:
        self.step, self.sums, self.nonfinite = step, {}, None

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_bf16 else contextlib.nullcontext())
        with autocast:
            loss, extra = self.task.loss(self.phase, batch, self.step)
        flag = ~torch.isfinite(loss.detach()).all()
        self.nonfinite = flag if self.nonfinite is None else self.nonfinite | flag
        for k, v in {"loss": loss, **extra}.items():
            value = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + value / self.grad_accum
        return loss

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return outputs


class StepBatches:
    """Endless Composer batches: each the list of one step's ``grad_accum`` micro-batches, on the
    device and normalized by vtok's ``Batches`` (epoch after epoch, exactly as vtok's trainer)."""

    def __init__(self, loader: Any, device: torch.device, grad_accum: int):
        self.loader, self.device, self.grad_accum = loader, device, grad_accum

    def __iter__(self):
        batches = Batches(self.loader, self.device)
        while True:
            yield [batches.next() for _ in range(self.grad_accum)]


class LrAt(torch.optim.lr_scheduler.LRScheduler):
    """vtok's schedule as a torch scheduler: the lr of step ``s`` is ``lr_at(cfg, s, total_steps)``
    exactly (no multiplier on a base lr); its state is the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.cfg, self.last_epoch, self.total_steps)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in ("cfg", "total_steps")}


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (collective; [obj] in a world of one)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class VtokState(Callback):
    """What vtok's trainer does around each step, as a Composer callback; its ``state_dict`` (the
    data position and RNG of every rank, EMA, the run of non-finite steps) is saved in Composer's
    checkpoints and given back on resume. ``strategy``: vtok's strategy object for this
    ``parallel.strategy``, not set up (Composer wraps the modules): it gives the task ``unwrapped``
    and ``gathered`` (FSDP2: unshard for sampling) and clips gradients as vtok does."""

    def __init__(self, recipe: Recipe, info: DistInfo, model: TaskModel, loader: Any, strategy: Strategy):
        self.recipe, self.info, self.model, self.loader, self.strategy = recipe, info, model, loader, strategy
        self.task = model.task
        self.cfg = optim_configs(self.task, recipe)[model.phase]
        self.ema: dict[str, EMA] = {}  # built at BEFORE_LOAD, once Composer has sharded the modules
        self.step, self.bad_in_a_row = 0, 0
        self.grad_norm: torch.Tensor | float = float("nan")
        self.skipped = False
        self.metric_logger: MetricLogger | None = None
        self._rng: dict[str, Any] | None = None  # restored just before the first step after a resume
        self._t0 = 0.0

    # ---- checkpointed state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """EMA shadows as tensors (sharded ones as DTensors), the rest as one blob that is the same on
        every rank (a fixed key set, as a sharded DCP checkpoint needs: the loader's lists vary)."""
        loader = self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}
        ranks = _gather({"loader": loader, "rng": rng_state()})
        blob = io.BytesIO()
        torch.save({"ranks": ranks, "world_size": self.info.world_size, "bad_in_a_row": self.bad_in_a_row}, blob)
        return {"vtok": blob.getvalue(), "ema": {name: e.state_dict() for name, e in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        blob = state["vtok"]
        saved = torch.load(blob if isinstance(blob, io.BytesIO) else io.BytesIO(blob), weights_only=True)
        ranks, same_world = saved["ranks"], saved["world_size"] == self.info.world_size
        load_loader_state(self.loader, [r["loader"] for r in ranks], self.info.rank, same_world)
        self._rng = ranks[self.info.rank]["rng"] if same_world else None
        self.bad_in_a_row = int(saved["bad_in_a_row"])
        for name, e in self.ema.items():
            e.load_state_dict(state["ema"][name])

    # ---- events -----------------------------------------------------------------------------------
    def before_load(self, state: State, logger: Logger) -> None:
        """EMA of the modules as Composer left them (FSDP2: shadows sharded like the parameters)."""
        cfg = self.recipe.train.ema
        if cfg.decay > 0:
            names = cfg.modules or list(self.task.ema_modules) or list(self.model.trained)
            self.ema = {n: EMA(self.task.modules[n], cfg.decay) for n in names}

    def fit_start(self, state: State, logger: Logger) -> None:
        self.step = int(state.timestamp.batch)
        tc, run_dir = self.recipe.train, Path(self.recipe.run_dir)
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(recipe_to_yaml(self.recipe))
        config = json.loads(json.dumps(asdict(self.recipe), default=str))
        self.metric_logger = MetricLogger(run_dir, self.recipe.log, enabled=self.info.is_main,
                                          total_steps=tc.steps, start_step=self.step, run_name=self.recipe.name,
                                          config=config, phases=[self.model.phase])

    def batch_start(self, state: State, logger: Logger) -> None:
        if self._rng is not None:  # at the first resumed step, after Composer's own start-up draws
            set_rng_state(self._rng)
            self._rng = None
        self.step = int(state.timestamp.batch)
        tc = self.recipe.train
        self.task.log_step = (self.step + 1) % tc.log_every == 0 or self.step + 1 == tc.steps
        self.model.begin_step(self.step)
        self._t0 = time.perf_counter()

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """After the last backward, before the optimizer step: clip, and drop the gradients (AdamW then
        leaves every parameter and its moments alone) when a loss or the norm is not finite."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = self.strategy.clip(params, self.recipe.train.grad_clip)
        flag = self.model.nonfinite if self.model.nonfinite is not None else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([flag.to(norm.device).float(), (~torch.isfinite(norm)).float()])
        bad, bad_norm = any_rank_flags(flags)
        if bad or bad_norm:
            for p in params:
                p.grad = None
        self.grad_norm, self.skipped = (float("nan") if bad else norm), bad

    def batch_end(self, state: State, logger: Logger) -> None:
        tc, phase = self.recipe.train, self.model.phase
        self.step += 1
        self.bad_in_a_row = self.bad_in_a_row + 1 if self.skipped else 0
        if self.bad_in_a_row >= tc.max_bad_steps:
            raise TrainingError(f"{self.bad_in_a_row} steps in a row had a non-finite loss (last at step "
                                f"{self.step}); lower the learning rate or check the data, then resume from "
                                "the last Composer checkpoint")
        if self.step % tc.ema.every_steps == 0:
            for name, e in self.ema.items():
                e.update(self.task.modules[name])
        if self.step % tc.log_every == 0 or self.step == tc.steps:
            metrics = {f"{phase}/{k}": v for k, v in self.model.sums.items()}
            metrics.update({f"{phase}/lr": lr_at(self.cfg, self.step - 1, tc.steps),
                            f"{phase}/grad_norm": self.grad_norm, f"{phase}/skipped": float(self.skipped)})
            out = to_floats(metrics)  # also waits for the step to finish
            seconds = time.perf_counter() - self._t0
            out["samples_per_s"] = sum(map(self.task.batch_size, state.batch)) * self.info.world_size / seconds
            out.update(step_time_s=seconds, peak_memory_mb=peak_memory_mb(self.info.device))
            out = all_mean(out)
            out["bad_steps_in_a_row"] = self.bad_in_a_row
            self.metric_logger.log(self.step, out)
        self.metric_logger.advance()
        if tc.eval_every and self.step % tc.eval_every == 0:
            evaluated = self.task.evaluate(self.step, self.recipe.run_dir)
            self.metric_logger.log(self.step, {f"eval/{k}": v for k, v in evaluated.items()})

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close_bar()
        if self.info.is_main and self.step >= self.recipe.train.steps:
            (Path(self.recipe.run_dir) / COMPLETE).write_text(str(self.step))

    def close_logger(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
            self.metric_logger = None


def checkpoint_folder(recipe: Recipe) -> Path:
    """Where Composer's checkpoints go: beside vtok's, ``<ckpt.dir or run_dir/checkpoints>-composer``."""
    return Path((recipe.ckpt.dir or f"{recipe.run_dir}/checkpoints").rstrip("/") + "-composer")


def prepare_modules(task: TrainTask, recipe: Recipe, device: torch.device) -> None:
    """What vtok's strategies do before wrapping: move to the device, activation checkpointing and
    torch.compile as the recipe says (FSDP2 compiles each block, DDP the whole module), frozen
    modules (teachers) in eval mode without gradients."""
    tc, fsdp = recipe.train, recipe.parallel.strategy == "fsdp2"
    for name, module in task.modules.items():
        module.to(device)
        if tc.activation_checkpointing and not apply_activation_checkpointing(module):
            print(f"warning: train.activation_checkpointing has no effect on '{name}' (it exposes no blocks())")
        if tc.compile:
            for part in (blocks_of(module) or [module]) if fsdp else [module]:
                part.compile()
    for frozen in getattr(task, "frozen", {}).values():
        frozen.to(device).eval().requires_grad_(False)


def composer_device(info: DistInfo) -> Any:
    """Composer's device for this rank. On a GPU, torch's TF32 settings stay as vtok runs with them
    (Composer's GPU device would turn TF32 matmuls on, changing fp32 numerics)."""
    if info.device.type != "cuda":
        return "cpu"
    from composer.devices import DeviceGPU

    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    device = DeviceGPU(info.device.index, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32  # DeviceGPU sets both flags to one value
    return device


def check_resume(path: str) -> None:
    """A one-line error for a local ``--resume`` / ``ckpt.resume`` that Composer cannot load."""
    if not path or "://" in path:
        return
    if not Path(path).exists():
        raise FileNotFoundError(f"--resume {path}: no such Composer checkpoint (they are under "
                                "<run_dir>/checkpoints-composer)")
    if (Path(path) / "meta.json").is_file():
        raise EngineError(f"--resume {path} is a vtok checkpoint; --engine composer resumes from Composer's "
                          "(<run_dir>/checkpoints-composer); use --engine vtok to continue this one")


def composer_trainer(recipe: Recipe, resume: str = "", task: TrainTask | None = None,
                     loader: Any = None, **overrides: Any) -> Trainer:
    """``recipe`` as a ``composer.Trainer`` (module docstring: the mapping). ``resume``: a Composer
    checkpoint file to start from (default: ``ckpt.resume``, else the newest in the save folder).
    ``task`` / ``loader`` default to what the recipe names; ``overrides`` go to ``Trainer``."""
    check_recipe(recipe)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # its INFO lines only with `vtok -v`
        logging.getLogger("composer").setLevel(logging.WARNING)
    tc, fsdp = recipe.train, recipe.parallel.strategy == "fsdp2"
    info = init_distributed(recipe.parallel.backend, timeout_minutes=recipe.parallel.timeout_minutes,
                            require_group=fsdp)
    if info.distributed:  # Composer reads the node's rank from NODE_RANK; torchrun calls it GROUP_RANK
        os.environ.setdefault("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    torch.manual_seed(recipe.seed)  # identical initial weights on every rank (as vtok's trainer)
    task = task or build_task(recipe)
    if len(task.optimizers) != 1:
        raise EngineError(f"--engine composer runs tasks with one optimizer; task {tc.task!r} steps "
                          f"{len(task.optimizers)} in turn ({', '.join(task.optimizers)}); use --engine vtok")
    (phase, cfg), = optim_configs(task, recipe).items()
    if cfg.start_step:
        raise EngineError(f"train.optim.{phase}.start_step={cfg.start_step}: --engine composer steps from "
                          "step 0; set it to 0 or use --engine vtok")
    resume = resume or recipe.ckpt.resume
    check_resume(resume)
    grad_accum = grad_accum_steps(recipe, info.world_size)
    prepare_modules(task, recipe, info.device)
    cpu_bf16 = tc.precision == "bf16" and info.device.type == "cpu"
    model = TaskModel(task, phase, grad_accum, cpu_bf16)
    optimizer = build_adamw(list(model.trained.values()), cfg)
    strategy = build_strategy(recipe.parallel, info, tc.precision)
    strategy.raw, strategy.phases = dict(task.modules), {k: list(v) for k, v in task.optimizers.items()}
    task.strategy = strategy
    if loader is None:
        from vtok.data import build_loader

        loader = build_loader(recipe.data, rank=info.rank, world_size=info.world_size, seed=recipe.seed)
    callback = VtokState(recipe, info, model, loader, strategy)
    data = DataSpec(StepBatches(loader, info.device, grad_accum), split_batch=lambda batch, size: batch,
                    get_num_samples_in_batch=lambda b: sum(map(task.batch_size, b)) if isinstance(b, list)
                    else task.batch_size(b), get_num_tokens_in_batch=lambda b: 0)
    kwargs: dict[str, Any] = dict(
        model=model, train_dataloader=data, max_duration=f"{tc.steps}ba", optimizers=optimizer,
        schedulers=LrAt(optimizer, cfg, tc.steps), step_schedulers_every_batch=True,
        device=composer_device(info),
        precision="amp_bf16" if tc.precision == "bf16" and not cpu_bf16 else "fp32",
        device_train_microbatch_size=recipe.data.batch_size, callbacks=[callback], loggers=[],
        progress_bar=False, log_to_console=False, run_name=recipe.name, seed=recipe.seed,
        spin_dataloaders=False,  # vtok's loader resumes itself (VtokState); spinning would skip batches
        save_folder=str(checkpoint_folder(recipe)), save_filename=CHECKPOINT_FILE,
        save_interval=f"{recipe.ckpt.every_steps}ba", save_num_checkpoints_to_keep=recipe.ckpt.keep_last,
        autoresume=not resume, load_path=resume or None, dist_timeout=recipe.parallel.timeout_minutes * 60,
        parallelism_config=fsdp2_config(recipe, model.trained) if fsdp else None)
    kwargs.update(overrides)
    trainer = Trainer(**kwargs)
    trainer.vtok_state = callback  # type: ignore[attr-defined]  (fit() closes its metric logger)
    return trainer


def fit(recipe: Recipe, resume: str = "") -> dict[str, Any]:
    """Build the Composer trainer, train to ``train.steps``, close; the run's summary. A run that a
    checkpoint shows complete is left as it is (Composer's fit would refuse: nothing to train)."""
    trainer = composer_trainer(recipe, resume=resume)
    state: VtokState = trainer.vtok_state  # type: ignore[attr-defined]
    try:
        if int(trainer.state.timestamp.batch) < recipe.train.steps:
            trainer.fit()
    finally:
        state.close_logger()
        trainer.close()
    folder = checkpoint_folder(recipe)
    latest = folder / "latest-rank0.pt"
    step = int(trainer.state.timestamp.batch)
    return {"step": step, "status": "complete" if step >= recipe.train.steps else "stopped",
            "run_dir": recipe.run_dir, "checkpoint": latest.resolve() if latest.exists() else None,
            "metrics": Path(recipe.run_dir) / "metrics.jsonl", "is_main": state.info.is_main}


__all__ = ["LrAt", "StepBatches", "TaskModel", "VtokState", "check_recipe", "check_resume", "checkpoint_folder",
           "composer_device", "composer_trainer", "fit", "fsdp2_config", "prepare_modules"]
