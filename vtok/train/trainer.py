"""The one training loop, for every recipe: load checkpoint, loop ``train_step``, log, save, eval.

    trainer = Trainer(recipe)            # builds the task, strategy, data, checkpoints, logs
    result = trainer.fit()               # resumes from <run_dir>/checkpoints/latest by itself

Per step: ``grad_accum`` micro-batches are fetched once; then each optimizer phase (in the task's
order) runs forward + backward over them and takes one optimizer step. A non-finite loss on any rank
skips that phase's step on every rank; ``train.max_bad_steps`` of them in a row stop the run.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import resource
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from vtok.config import Recipe, RecipeError, recipe_to_yaml
from vtok.config.schema import OptimConfig
from vtok.data.transforms import normalize_batch
from vtok.parallel.dist import Progress, all_mean, any_rank_flags, barrier, init_distributed
from vtok.parallel.strategy import build_strategy, extra_state
from vtok.train.checkpoint import CheckpointManager, resolve_resume
from vtok.train.ema import EMA
from vtok.train.metrics import MetricLogger, to_floats
from vtok.train.optim import lr_at, set_lr
from vtok.train.preemption import PreemptionWatcher
from vtok.train.task import TrainTask, build_task

log = logging.getLogger("vtok.train")

COMPLETE = "COMPLETE"  # written to the run dir when all steps are done (Slurm scripts read it)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


def device_peak_tflops(device: torch.device, override: float) -> float:
    """Dense bf16 peak of one device for MFU: ``override`` or a known GPU name; 0 if unknown."""
    if override or device.type != "cuda":
        return override
    from vtok.plan.gpus import peak_tflops_of  # the table `vtok plan` reads (vtok/plan/gpus.yaml)

    return peak_tflops_of(torch.cuda.get_device_name(device))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def grad_accum_steps(recipe: Recipe, world_size: int) -> int:
    """Micro-batches per optimizer step: ``train.global_batch_size`` over ``data.batch_size`` x ranks
    (1 when no global batch is set); a one-line RecipeError when it does not divide."""
    micro = recipe.data.batch_size
    global_batch = recipe.train.global_batch_size or micro * world_size
    if global_batch % (micro * world_size):
        raise RecipeError(f"train.global_batch_size={global_batch} is not a multiple of "
                          f"data.batch_size x ranks = {micro} x {world_size}; adjust one of them")
    return global_batch // (micro * world_size)


def optim_configs(task: TrainTask, recipe: Recipe) -> dict[str, OptimConfig]:
    """``train.optim`` per optimizer the task declares, in the task's step order (defaults for the
    ones the recipe leaves out); a one-line RecipeError names an optimizer the task does not have."""
    declared, given = list(task.optimizers), recipe.train.optim
    for name in given:
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f"; did you mean 'train.optim.{close[0]}'?" if close else ""
            raise RecipeError(f"train.optim.{name}: task '{recipe.train.task}' has no optimizer "
                              f"'{name}' (it has {declared}){hint}")
    return {name: given.get(name, OptimConfig()) for name in declared}


def load_loader_state(loader: Any, states: list[dict[str, Any]], rank: int, same_world: bool) -> None:
    """Resume ``loader`` from the per-rank ``states`` a checkpoint saved (``loader.state_dict()`` of
    every saving rank): vtok loaders merge them into one position for any world size; another loader
    with ``load_state_dict`` takes this rank's state (rank 0's after a world-size change)."""
    if hasattr(loader, "merge_rank_states"):  # vtok loaders: one position for all ranks
        loader.load_state_dict(loader.merge_rank_states(states))
    elif hasattr(loader, "load_state_dict"):
        loader.load_state_dict(states[rank if same_world else 0])


class Batches:
    """Endless micro-batches from a loader, epoch after epoch, moved to the device."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self._it: Iterator | None = None

    def next(self) -> dict[str, Any]:
        for _ in range(2):  # at most one epoch boundary per call
            if self._it is None:
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:  # uint8 images cross to the device, then become float in [-1, 1]
                return normalize_batch({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                                        for k, v in batch.items()})
            self._it = None
        raise RuntimeError("the data loader yielded no batch in a whole epoch")


class Trainer:
    """Runs one recipe. ``task`` and ``loader`` default to what the recipe names."""

    def __init__(self, recipe: Recipe, task: TrainTask | None = None, loader: Iterable | None = None):
        self.recipe, tc = recipe, recipe.train
        self.info = init_distributed(recipe.parallel.backend, timeout_minutes=recipe.parallel.timeout_minutes,
                                     require_group=recipe.parallel.strategy in ("fsdp2", "deepspeed"))
        self.progress = Progress(self.info)  # where each rank is, to name a hung one after a timeout
        torch.manual_seed(recipe.seed)  # identical initial weights on every rank
        self.task = task or build_task(recipe)
        world, micro = self.info.world_size, recipe.data.batch_size
        self.grad_accum = grad_accum_steps(recipe, world)
        self.optim_cfgs = optim_configs(self.task, recipe)
        self.strategy = build_strategy(recipe.parallel, self.info, tc.precision)
        self.strategy.setup(self.task, self.optim_cfgs, micro_batch_size=micro, grad_accum=self.grad_accum,
                            grad_clip=tc.grad_clip, compile=tc.compile,
                            activation_checkpointing=tc.activation_checkpointing)
        torch.manual_seed(recipe.seed + self.info.rank)  # per-rank streams (dropout, noise)
        self.ema = self._build_ema()
        if loader is None:
            from vtok.data import build_loader

            loader = build_loader(recipe.data, rank=self.info.rank, world_size=world, seed=recipe.seed)
        self.loader = loader
        self.run_dir = Path(recipe.run_dir)
        self.ckpt = CheckpointManager(recipe.ckpt.dir or self.run_dir / "checkpoints",
                                      recipe.ckpt.keep_last, self.info, trust=recipe.ckpt.trust)
        self.step = 0
        self.metrics_path: Path | None = None  # <run_dir>/metrics.jsonl once fit() has opened it

    def _build_ema(self) -> dict[str, EMA]:
        cfg = self.recipe.train.ema
        if cfg.decay <= 0:
            return {}
        if self.recipe.parallel.strategy == "deepspeed" and self.recipe.parallel.deepspeed.zero_stage == 3:
            raise RecipeError("train.ema with DeepSpeed ZeRO-3 is not supported (parameters are "
                              "partitioned); use zero_stage 1/2 or parallel.strategy=fsdp2")
        names = cfg.modules or list(self.task.ema_modules) or list(self.strategy.raw)
        return {n: EMA(self.strategy.raw[n], cfg.decay) for n in names}

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}}
        meta = {"strategy": self.strategy.name, "recipe": self.recipe.name, "git_commit": git_commit(),
                "grad_accum": self.grad_accum, "phases": self.strategy.phases}
        return self.ckpt.save(self.step, self.strategy, extra_state(self.ema), state, meta)

    def load(self, path: Path) -> None:
        meta, states = self.ckpt.load(path, self.strategy, extra_state(self.ema))
        self.step = int(meta["step"])
        load_loader_state(self.loader, [s["loader"] for s in states], self.info.rank,
                          same_world=meta["world_size"] == self.info.world_size)
        log.info("resumed from %s at step %d", path, self.step)

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: str = "") -> dict[str, Any]:
        """Train to ``train.steps``; returns {"step", "status": "complete" | "preempted", "last"}."""
        tc = self.recipe.train
        path = resolve_resume(self.ckpt, resume or self.recipe.ckpt.resume)
        if path is not None:
            self.load(path)
        self._write_run_info()
        logger = MetricLogger(self.run_dir, self.recipe.log, enabled=self.info.is_main,
                              total_steps=tc.steps, start_step=self.step, run_name=self.recipe.name,
                              config=json.loads(json.dumps(asdict(self.recipe), default=str)),
                              phases=list(self.optim_cfgs))
        self.metrics_path = logger.path
        watcher, batches = PreemptionWatcher(), Batches(self.loader, self.info.device)
        peak = device_peak_tflops(self.info.device, tc.peak_tflops)
        bad_in_a_row, last, status = 0, {}, "complete"
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                micro = [batches.next() for _ in range(self.grad_accum)]
                t_data = time.perf_counter() - t0
                self.task.log_step = (self.step + 1) % tc.log_every == 0 or self.step + 1 == tc.steps
                try:
                    metrics, bad = self.train_step(micro)
                except RuntimeError as e:
                    raise self._collective_failure(e) from e
                self.step += 1
                bad_in_a_row = bad_in_a_row + 1 if bad else 0
                if bad_in_a_row >= tc.max_bad_steps:
                    raise TrainingError(
                        f"{bad_in_a_row} steps in a row had a non-finite loss (last at step {self.step}); "
                        f"the last good checkpoint is {self.ckpt.latest()}; lower the learning rate or "
                        "check the data, then resume from it")
                for ema in self.ema.values() if self.step % tc.ema.every_steps == 0 else ():
                    ema.update(self.strategy.raw[self._ema_name(ema)])
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    samples = sum(self.task.batch_size(b) for b in micro) * self.info.world_size
                    last = self._throughput(metrics, samples, t0, t_data, peak)  # syncs the device
                    last = all_mean(last)
                    last["bad_steps_in_a_row"] = bad_in_a_row
                    logger.log(self.step, last)  # before the bar moves: it shows this step's losses
                logger.advance()
                if tc.eval_every and self.step % tc.eval_every == 0:
                    with logger.status(f"evaluating at step {self.step}"):  # sample passes take a while
                        evaluated = self.task.evaluate(self.step, str(self.run_dir))
                    logger.log(self.step, {f"eval/{k}": v for k, v in evaluated.items()})
                if self.step % self.recipe.ckpt.every_steps == 0 and self.step < tc.steps:
                    with logger.status("saving checkpoint", log_without_bar=False):
                        self.save()
                if watcher.should_stop():
                    status = "preempted"
                    break
            with logger.status("saving checkpoint", log_without_bar=False):
                self.save()
            logger.close_bar()  # the final bar, drawn once, before anything else is printed
            if status == "complete" and self.info.is_main:
                (self.run_dir / COMPLETE).write_text(str(self.step))
            barrier()
        finally:
            watcher.close()
            logger.close()
        return {"step": self.step, "status": status, "last": last}

    def _ema_name(self, ema: EMA) -> str:
        return next(n for n, e in self.ema.items() if e is ema)

    def train_step(self, micro: list[dict[str, Any]]) -> tuple[dict[str, float | torch.Tensor], bool]:
        """All optimizer phases on one global batch; returns (metrics, whether a phase was skipped).

        The metrics stay on the device (``_throughput`` makes them floats on log steps). The only
        host sync is each phase's skip decision in ``strategy.step``: every micro-batch is
        backpropagated, and a non-finite loss on any rank drops the phase's gradients and step.
        Strategies with ``lazy_skip`` False check each loss instead and skip the rest of the phase.
        """
        metrics: dict[str, float | torch.Tensor] = {}
        any_bad, lazy = False, self.strategy.lazy_skip
        for phase, cfg in self.optim_cfgs.items():
            if self.step < cfg.start_step:
                continue
            lr = lr_at(cfg, self.step, self.recipe.train.steps)
            set_lr(self.strategy.optimizer(phase), lr)
            self.strategy.begin_phase(phase)
            sums: dict[str, float | torch.Tensor] = {}
            nonfinite: torch.Tensor | None = None  # this rank's flag, on the device
            bad = False
            for i, batch in enumerate(micro):
                last = i == len(micro) - 1
                if not bad:
                    self.progress.mark("forward", self.step + 1, phase, i + 1)
                    with self.strategy.micro_batch(phase, last):
                        loss, extra = self.task.loss(phase, batch, self.step)
                    flag = ~torch.isfinite(loss.detach()).all()
                    if lazy:
                        nonfinite = flag if nonfinite is None else nonfinite | flag
                    else:
                        bad = any_rank_flags(flag)[0]
                if bad:
                    self.strategy.skip_micro_batch(phase, last, self.grad_accum)
                    continue
                self.progress.mark("backward", self.step + 1, phase, i + 1)
                self.strategy.backward(loss, phase, last, self.grad_accum)
                for k, v in {"loss": loss, **extra}.items():
                    value = v.detach().float() if torch.is_tensor(v) else float(v)
                    sums[k] = sums.get(k, 0.0) + value / len(micro)
            skip = (nonfinite if nonfinite is not None else False) if lazy else bad
            norm, bad = self.strategy.step(phase, self.recipe.train.grad_clip, skip=skip)
            self.strategy.end_phase(phase)
            any_bad = any_bad or bad
            metrics.update({f"{phase}/{k}": v for k, v in sums.items()})
            metrics.update({f"{phase}/lr": lr, f"{phase}/grad_norm": norm, f"{phase}/skipped": float(bad)})
        return metrics, any_bad

    def _collective_failure(self, error: RuntimeError) -> Exception:
        """A failed collective as a one-line TrainingError naming the ranks that never reached it
        (read from ``Progress``); any other error, or a world of one, is returned unchanged."""
        text = str(error)
        if self.info.world_size == 1 or not re.search(r"[Tt]imed out|[Tt]imeout|Connection (closed|reset)", text):
            return error
        minutes = self.recipe.parallel.timeout_minutes
        where = f"step {self.step + 1}: a collective did not complete"
        behind = self.progress.laggards()
        if behind:
            named = "; ".join(f"rank {r} stopped in {place}" for r, place in behind)
            cause = f"within parallel.timeout_minutes={minutes:g} ({minutes * 60:.0f} s): {named}"
            fix = "look at those ranks' logs and nodes (a hang, a dead process, a stuck data read)"
        else:
            first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
            cause = f"({first[:160]}): another rank failed first; its error names the cause"
            fix = "fix that rank's error"
        return TrainingError(f"{where} {cause}; the last good checkpoint is {self.ckpt.latest()}; {fix}, "
                             "then resume (vtok train resumes from it)")

    def _throughput(self, metrics: dict[str, float | torch.Tensor], samples: int, started: float,
                    t_data: float, peak_tflops: float) -> dict[str, float]:
        """The step's metrics as floats (one device->host copy, which also waits for the step to
        finish) plus throughput since ``started`` (the step's ``perf_counter`` start)."""
        out = to_floats(metrics)
        seconds = time.perf_counter() - started
        out["samples_per_s"] = samples / seconds
        out["step_time_s"] = seconds
        out["data_time_s"] = t_data
        tokens = self.task.tokens_per_sample()
        if tokens:
            out["tokens_per_s"] = out["samples_per_s"] * tokens
        flops = self.task.flops_per_sample()
        if flops and peak_tflops:
            out["mfu"] = flops * out["samples_per_s"] / (peak_tflops * 1e12 * self.info.world_size)
        out["peak_memory_mb"] = peak_memory_mb(self.info.device)
        return out

    def _write_run_info(self) -> None:
        if not self.info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(recipe_to_yaml(self.recipe))
        info = {"git_commit": git_commit(), "world_size": self.info.world_size,
                "strategy": self.strategy.name, "grad_accum": self.grad_accum,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "started_at": time.time()}
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=1))

    def export(self, out_dir: str | Path, use_ema: bool = False) -> Path:
        """Write the task's export module in the export format (call on every rank; rank 0 writes).
        ``use_ema``: the EMA weights where the module has an EMA."""
        from vtok.train.export import ExportUnsupported, write_export

        name = self.task.export_module
        if not name:
            raise ExportUnsupported(f"task {self.recipe.train.task!r} declares no export module")
        state = self.strategy.export_state_dict(name)
        if use_ema and name in self.ema:
            shadow = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                      for k, v in self.ema[name].state_dict().items()}
            state = {**state, **{k: v.detach().float().cpu() for k, v in shadow.items()}}
        path = Path(out_dir) / "model.safetensors"
        if self.info.is_main:
            path = write_export(out_dir, type(self.task), self.task.cfg, self.recipe, self.strategy.raw[name],
                                state, step=self.step, ema=use_ema and name in self.ema)
        barrier()
        return path
