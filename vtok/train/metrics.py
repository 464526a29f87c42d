"""Metric sinks for rank 0: a JSONL file (always), TensorBoard, W&B (offline allowed), progress bar."""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm import tqdm

from vtok.config.schema import LogConfig

log = logging.getLogger("vtok.train")


def phase_abbreviations(phases: Sequence[str]) -> dict[str, str]:
    """Short bar names of optimizer phases: none for a single phase (its loss shows as ``loss``),
    else the first letter when the letters are distinct (generator/discriminator: ``g``/``d``),
    else the phase names."""
    if len(phases) <= 1:
        return {p: "" for p in phases}
    if len({p[:1] for p in phases}) == len(phases):
        return {p: p[:1] for p in phases}
    return {p: p for p in phases}


def bar_postfix(metrics: Mapping[str, float], phases: Sequence[str] = ()) -> dict[str, str]:
    """The progress bar's postfix: every ``*loss`` metric, named per phase so that two phases'
    losses never share a name (``generator/loss`` -> ``g_loss``, ``discriminator/loss`` ->
    ``d_loss``; a lone phase's ``main/loss`` -> ``loss``), and the throughput."""
    short = phase_abbreviations(phases or sorted({k.split("/")[0] for k in metrics if "/" in k}))
    out: dict[str, str] = {}
    for key, value in metrics.items():
        if not (key.endswith("loss") or key == "samples_per_s"):
            continue
        phase, _, name = key.rpartition("/")
        prefix = short.get(phase, phase.replace("/", "_"))
        label = f"{prefix}_{name}" if prefix else name
        out[label if label not in out else key] = f"{value:.4g}" if isinstance(value, float) else str(value)
    return out


class MetricLogger:
    """Fan one ``log(step, metrics)`` out to every configured sink; a no-op off rank 0. ``phases``:
    the task's optimizer phases, for the loss names on the progress bar."""

    def __init__(self, run_dir: Path, cfg: LogConfig, *, enabled: bool, total_steps: int,
                 start_step: int, run_name: str, config: dict[str, Any], phases: Sequence[str] = ()):
        self.enabled, self.run_name, self.phases = enabled, run_name, tuple(phases)
        self.jsonl = self.tb = self.wandb = self.bar = None
        self.path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.path, "a", buffering=1)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
            except ImportError:
                log.warning("log.tensorboard=true but tensorboard is not installed; skipping it")
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(run_dir),
                                    mode=cfg.wandb_mode, config=config, resume="allow",
                                    id=_wandb_id(run_dir))
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = bar_postfix({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, self.phases)
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    @contextmanager
    def status(self, text: str, log_without_bar: bool = True) -> Iterator[None]:
        """Say what the run is doing between steps (a sample pass, a checkpoint save): on the bar's
        description while it lasts, or, with no bar, as one log line (``log_without_bar``)."""
        if self.bar is None:
            if self.enabled and log_without_bar:
                log.info("%s...", text)
            yield
            return
        self.bar.set_description(f"{self.run_name} [{text}...]", refresh=True)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.set_description(self.run_name, refresh=True)

    def close_bar(self) -> None:
        """Draw the bar a last time and end its line (once; later calls do nothing)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


def to_floats(metrics: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Python floats for a dict of numbers and one-element tensors, with one device->host copy per
    device (the trainer keeps step metrics on the device and converts them only to log)."""
    out = {k: float(v) for k, v in metrics.items() if not torch.is_tensor(v)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        values = torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}


def _wandb_id(run_dir: Path) -> str:
    """A run id stored in the run dir, so a resumed job appends to the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        path.write_text(os.urandom(6).hex())
    return path.read_text().strip()
