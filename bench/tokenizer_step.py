#!/usr/bin/env python
"""FQGAN-Dual step cost on CPU/GPU: eager vs channels-last vs torch.compile, and the codebook lookup.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/tokenizer_step.py

Each variant runs in its own process (so peak memory and compile caches do not mix) and reports the
median forward + backward time over --steps after --warmup, and the process's peak memory (peak
RSS on CPU, max allocated on CUDA). The lookup benchmark times the factorized quantizer's nearest-code
search (unit-norm inner product + argmax) against a naive ``torch.cdist + argmin`` on the same
vectors, at the paper's codebook size (16,384 x 8) and a 16x16 grid.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from roofline import Roofline, median_seconds  # same directory
import torch.nn.functional as F

from vtok.models.quant import L2VectorQuantizer
from vtok.models.registry import build_model


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_ms(fn, steps: int, warmup: int, device: torch.device) -> float:
    return 1000 * median_seconds(fn, steps, warmup, device)


def run_variant(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(args.arch, align={}).to(device)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    if args.variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.variant == "compile" else model

    def step():
        out = step_model(x)
        loss = F.mse_loss(out.reconstruction, x) + sum(out.quant.losses.values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    ms = median_ms(step, args.steps, args.warmup, device)
    flops = Roofline.count(step) if args.variant == "eager" else 0.0  # compiled graphs hide their ops
    return {"ms": ms, "peak_mb": peak_mb(device), "flops": flops}


def lookup(args) -> tuple[float, float]:
    torch.manual_seed(0)
    vq = L2VectorQuantizer(L2VectorQuantizer.Config(codebook_size=16384, dim=8))
    z = torch.randn(args.batch * 256, 8)
    codes = vq.codes()

    def ours():
        F.normalize(z, dim=-1).matmul(codes.t()).argmax(-1)

    def naive():
        torch.cdist(F.normalize(z, dim=-1), codes).argmin(-1)

    same = torch.equal(F.normalize(z, dim=-1).matmul(codes.t()).argmax(-1),
                       torch.cdist(F.normalize(z, dim=-1), codes).argmin(-1))
    assert same, "the two searches must pick the same codes"
    cpu = torch.device("cpu")
    return median_ms(ours, args.steps, args.warmup, cpu), median_ms(naive, args.steps, args.warmup, cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="fqgan-dual-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    torch.set_num_threads(2)
    print(f"{args.arch} at {args.resolution}px, batch {args.batch}: forward + backward, median of "
          f"{args.steps} steps after {args.warmup}")
    base, flops, lines, roof = None, 0.0, [], Roofline()
    for variant in ("eager", "channels_last", "compile"):
        cmd = [sys.executable, __file__, "--variant", variant, "--arch", args.arch, "--batch", str(args.batch),
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  {variant:14s} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = base or r["ms"]
        print(f"  {variant:14s} {r['ms']:8.1f} ms/step   {base / r['ms']:.2f}x eager speed   peak {r['peak_mb']:.0f} MB")
        flops = flops or r["flops"]
        lines.append(roof.line(f"{variant} step", flops, r["ms"] / 1000))
    print("\n".join(lines))
    ours, naive = lookup(args)
    print(f"codebook lookup, {args.batch * 256} vectors x 16,384 codes: inner-product argmax {ours:.2f} ms, "
          f"cdist + argmin {naive:.2f} ms = {naive / ours:.2f}x faster")


if __name__ == "__main__":
    main()
