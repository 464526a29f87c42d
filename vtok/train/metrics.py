"""Metric sinks for rank 0: a JSONL file (always), TensorBoard, W&B (offline allowed), progress bar."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from vtok.config.schema import LogConfig

log = logging.getLogger("vtok.train")


class MetricLogger:
    """Fan one ``log(step, metrics)`` out to every configured sink; a no-op off rank 0."""

    def __init__(self, run_dir: Path, cfg: LogConfig, *, enabled: bool, total_steps: int,
                 start_step: int, run_name: str, config: dict[str, Any]):
        self.enabled = enabled
        self.jsonl = self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
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
            shown = {k.split("/")[-1] if k.endswith("loss") else k: v for k, v in metrics.items()
                     if k.endswith("loss") or k in ("samples_per_s",)}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        for sink in (self.bar, self.tb):
            if sink is not None:
                sink.close()
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
