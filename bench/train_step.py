#!/usr/bin/env python
"""Training-step cost of the vtok trainer on a tiny transformer LM, per strategy.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/train_step.py

Prints, with medians over the timed steps after --warmup steps:
  * step time and peak RSS for 1 process, and ddp / fsdp2 / deepspeed zero2 / zero3 at 2 ranks;
  * the trainer's overhead against a bare hand-written loop on the same model and batch
    (target <= 1.05x);
  * per-rank parameter + optimizer-state bytes of FSDP2 against DDP at 2 ranks (target <= 0.55x).
The 2-rank numbers come from this script re-run under torchrun in worker mode (--worker).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from roofline import Roofline  # same directory
import torch.nn.functional as F
from torch import nn

from vtok.config import load_recipe
from vtok.plan.measure import measured_state
from vtok.train import Trainer, TrainTask, register_task

VOCAB, SEQ = 1024, 128


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Causal transformer LM: tokens (B, T) -> logits (B, T, VOCAB)."""

    def __init__(self, width: int = 256, depth: int = 4, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.zeros(SEQ, width))
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, VOCAB, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((SEQ, SEQ), float("-inf")), 1), persistent=False)

    def blocks(self):
        return self.layers

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, self.mask[: tokens.shape[1], : tokens.shape[1]])
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


@register_task("bench-lm")
class BenchLMTask(TrainTask):
    @dataclass
    class Config:
        width: int = 256
        depth: int = 4

    def __init__(self, cfg, recipe):
        self.modules = {"lm": TinyLM(cfg.width, cfg.depth)}
        self.optimizers = {"main": ["lm"]}

    def loss(self, phase, batch, step):
        return lm_loss(self.modules["lm"], batch["tokens"]), {}

    def batch_size(self, batch):
        return batch["tokens"].shape[0]

    def tokens_per_sample(self):
        return SEQ


class MemoryBatches:
    """The same in-memory batch every step: the data loader is not what this bench measures."""

    def __init__(self, batch_size: int, steps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.batch = {"tokens": torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)}
        self.steps = steps

    def __iter__(self):
        for _ in range(self.steps):
            yield dict(self.batch)


def state_bytes(trainer: Trainer) -> int:
    """This rank's parameter + optimizer-state bytes (sharded tensors count their local shard)."""
    state = measured_state(trainer.strategy)
    return state["params"] + state["optimizer"]


def run_trainer(args, strategy: str, zero: int, run_dir: str) -> dict:
    overrides = [f"run_dir={run_dir}", "train.task=bench-lm", f"train.steps={args.steps}",
                 "train.log_every=1", f"ckpt.every_steps={10 ** 9}", "log.progress=false",
                 "log.tensorboard=false", "data.train_shards=unused", f"data.batch_size={args.batch}",
                 f"parallel.strategy={strategy}", f"parallel.deepspeed.zero_stage={zero}",
                 f"model.width={args.width}", f"model.depth={args.depth}",
                 "train.optim.main.schedule=constant"]
    recipe = load_recipe(None, overrides)
    loader = MemoryBatches(args.batch, args.steps + 1, seed=int(os.environ.get("RANK", 0)))
    trainer = Trainer(recipe, loader=loader)
    trainer.fit()
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    times = [x["step_time_s"] for x in lines[args.warmup:]]
    return {"step_ms": 1000 * statistics.median(times), "rss_mb": max(x["peak_memory_mb"] for x in lines),
            "state_bytes": state_bytes(trainer)}


def step_flops(args) -> float:
    """FLOPs of one forward + backward of the tiny LM at the bench's batch (torch's counter)."""
    torch.manual_seed(0)
    model = TinyLM(args.width, args.depth)
    batch = MemoryBatches(args.batch, 1, seed=0).batch["tokens"]
    return Roofline.count(lambda: lm_loss(model, batch).backward())


def bare_loop(args) -> float:
    """The same model, batch and optimizer in the shortest loop one would write by hand."""
    torch.manual_seed(0)
    model = TinyLM(args.width, args.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    batch = MemoryBatches(args.batch, 1, seed=0).batch["tokens"]
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer also reads the loss every step
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[args.warmup:])


def launch_two_ranks(args, strategy: str, zero: int, tmp: Path) -> dict:
    out = tmp / f"{strategy}{zero}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", strategy, "--zero", str(zero), "--out", str(out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--width", str(args.width),
           "--depth", str(args.depth), "--run-dir", str(tmp / f"run-{strategy}{zero}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:  # one rank of a torchrun launch
        result = run_trainer(args, args.worker, args.zero, args.run_dir)
        results = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(results, result)
        if torch.distributed.get_rank() == 0:
            merged = {"step_ms": max(r["step_ms"] for r in results), "rss_mb": max(r["rss_mb"] for r in results),
                      "state_bytes": max(r["state_bytes"] for r in results)}
            Path(args.out).write_text(json.dumps(merged))
        return

    torch.set_num_threads(1)
    params = sum(p.numel() for p in TinyLM(args.width, args.depth).parameters())
    print(f"tiny LM: width {args.width}, depth {args.depth}, {params / 1e6:.2f}M params, seq {SEQ}, "
          f"batch {args.batch}/rank, median of {args.steps - args.warmup} steps after {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bare = bare_loop(args)
        single = run_trainer(args, "ddp", 0, str(tmp / "single"))
        print(f"bare hand-written loop, 1 process : {bare:7.1f} ms/step")
        print(f"vtok trainer, 1 process           : {single['step_ms']:7.1f} ms/step   "
              f"overhead {single['step_ms'] / bare:.3f}x (target <= 1.05)   peak RSS {single['rss_mb']:.0f} MB")
        roof, flops = Roofline(), step_flops(args)
        print(roof.line("bare loop", flops, bare / 1000))
        print(roof.line("vtok trainer", flops, single["step_ms"] / 1000))
        rows = {}
        for label, strategy, zero in (("ddp", "ddp", 0), ("fsdp2", "fsdp2", 0),
                                      ("deepspeed zero2", "deepspeed", 2), ("deepspeed zero3", "deepspeed", 3)):
            rows[label] = r = launch_two_ranks(args, strategy, zero, tmp)
            if "error" in r:
                print(f"{label:16s} x2 ranks: failed: {r['error']}")
                continue
            print(f"{label:16s} x2 ranks: {r['step_ms']:7.1f} ms/step   {r['step_ms'] / single['step_ms']:.2f}x "
                  f"1-process   peak RSS/rank {r['rss_mb']:.0f} MB")
        ddp, fsdp = rows["ddp"].get("state_bytes"), rows["fsdp2"].get("state_bytes")
        if ddp and fsdp:
            print(f"params + optimizer state per rank: ddp {ddp / 2**20:.1f} MiB, fsdp2 {fsdp / 2**20:.1f} MiB "
                  f"= {fsdp / ddp:.2f}x (target <= 0.55)")


if __name__ == "__main__":
    main()
