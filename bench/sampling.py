#!/usr/bin/env python
"""Autoregressive sampling and training throughput of the GPT generator.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/sampling.py

1. Generation of a 16x16 = 256-token grid at batch 1 and 16: the KV cache (prefill + one token per
   step) against the baseline that recomputes the whole prefix at every step; tokens/s and the ratio.
2. Training tokens/s (forward + backward + AdamW step, teacher forcing) eager against torch.compile.

The default model is a GPT-B-shaped block stack scaled down to run on a CPU (--dim/--depth/--heads);
on a GPU pass the real sizes (e.g. --dim 768 --depth 12 --heads 12 --vocab 16384).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from roofline import Roofline
from tokenizer_step import median_ms  # same directory: one timing helper for every bench
from vtok.models.api import Condition
from vtok.models.generators import GPT, GPTConfig


def build(args) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(dim=args.dim, depth=args.depth, heads=args.heads, vocab_sizes=(args.vocab,) * args.k,
                    head_layers=1 if args.k > 1 else 0, token_shape=(args.grid, args.grid), num_classes=1000,
                    dropout=0.0, token_dropout=0.0)
    return GPT(cfg).to(args.device)


def generation(args, model: GPT, batch: int, use_cache: bool) -> float:
    """Tokens/s (median of --repeats after one warm-up)."""
    labels = torch.arange(batch, device=args.device) % 1000
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        model.generate(Condition(labels=labels), guidance=1.0, generator=torch.Generator(args.device).manual_seed(i),
                       use_cache=use_cache)
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return batch * model.seq_len / statistics.median(times)


def training(args, compiled: bool, roof: Roofline | None = None) -> float:
    model = build(args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    codes = torch.randint(0, args.vocab, (args.train_batch, args.k, args.grid, args.grid), device=args.device)
    labels = torch.randint(0, 1000, (args.train_batch,), device=args.device)

    def step():
        loss, _ = model.loss_from_logits(forward(codes, Condition(labels=labels)), codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = median_ms(step, args.steps, args.warmup, args.device)
    if roof is not None:
        print(roof.line(f"training step{' (compiled)' if compiled else ''}", roof.count(step), ms / 1000))
    return args.train_batch * model.seq_len / (ms / 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--k", type=int, default=1, help="sub-codebooks (2: FAR head)")
    p.add_argument("--grid", type=int, default=16, help="token grid side (16: 256 tokens)")
    p.add_argument("--batches", default="1,16", help="generation batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"GPT dim {args.dim} depth {args.depth} k {args.k}: {n / 1e6:.1f}M params, {model.seq_len} tokens, "
          f"{args.device}, {torch.get_num_threads()} threads")
    roof = Roofline(args.device)
    print("generation (tokens/s): batch | recompute prefix | KV cache | ratio")
    lines = []
    for batch in map(int, args.batches.split(",")):
        base = generation(args, model, batch, use_cache=False)
        cached = generation(args, model, batch, use_cache=True)
        print(f"  {batch:>5} | {base:>16,.0f} | {cached:>8,.0f} | {cached / base:.2f}x")
        labels = torch.arange(batch, device=args.device) % 1000
        flops = roof.count(lambda: model.generate(Condition(labels=labels), guidance=1.0))
        lines.append(roof.line(f"generation, batch {batch}, KV cache", flops, batch * model.seq_len / cached))
    print("\n".join(lines))
    eager = training(args, compiled=False, roof=roof)
    print(f"training (tokens/s): eager {eager:,.0f}", end="", flush=True)
    if not args.skip_compile:
        compiled = training(args, compiled=True, roof=roof)
        print(f" | torch.compile {compiled:,.0f} | ratio {compiled / eager:.2f}x")
    else:
        print()


if __name__ == "__main__":
    main()
