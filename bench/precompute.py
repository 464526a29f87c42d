#!/usr/bin/env python
"""The precompute runner's overhead: samples/s of a job through ``run_job`` vs a bare loop.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/precompute.py

The bare loop reads the same shards, prepares each sample with the job's own ``prepare`` (the same
decode + center crop for images, the caption for text), and calls the model on batches of the same
size (T5: tokenizer + encoder; VAE: ``encode``), discarding the output. The runner does that plus
worker threads, output numpy conversion, atomic shard writes, per-shard stats, the manifest and the
summary. Both use a model loaded once; each measurement is the median of ``--reps`` runs after one
warm-up run, alternating runner and loop. Models are random (T5 tiny d_model 32; T5 at a realistic
width, d_model 2048 / d_ff 5120 / 32 heads, 2 layers; a tiny AutoencoderKL), built and saved to a
temporary directory, so nothing is downloaded. The target is a ratio (runner / loop samples/s) >= 0.95.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from roofline import Roofline  # same directory

from vtok.data.shards import ShardSource
from vtok.data.synthetic import write_synthetic
from vtok.parallel.dist import DistInfo
from vtok.precompute.latents import LatentsJob, LatentsOptions
from vtok.precompute.runner import Job, RunnerOptions, run_job
from vtok.precompute.text_emb import TextEmbJob, TextEmbOptions, save_random_t5

WORDS = ("a an the red green blue yellow purple orange circle square triangle star shape small big on "
         "white background of with").split()


def save_t5(path: Path, d_model: int, d_ff: int, heads: int) -> None:
    """A random 2-layer T5 encoder of width ``d_model`` + a word-level tokenizer over WORDS, saved to ``path``."""
    save_random_t5(path, d_model, heads=heads, d_ff=d_ff, words=WORDS)


def save_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(path)


def bare_loop(job: Job, data: str, batch: int, call) -> int:
    """Read, prepare and run the model batch by batch (no output); returns the samples processed."""
    source, n = ShardSource.open(data), 0
    for i in range(len(source)):
        items = []
        for sample in source.read(i):
            items.append(job.prepare(sample))
            if len(items) == batch:
                call(items)
                n, items = n + len(items), []
        if items:
            call(items)
            n += len(items)
    return n


def flops_per_sample(job: Job, data: str, batch: int, call) -> float:
    """FLOPs of ``call`` on the first ``batch`` prepared samples, per sample (torch's counter)."""
    source = ShardSource.open(data)
    items = [job.prepare(sample) for _, sample in zip(range(batch), source.read(0))]
    with torch.no_grad():
        return Roofline.count(lambda: call(items)) / len(items)


def measure(job: Job, data: str, batch: int, call, reps: int, tmp: Path, workers: int) -> tuple[float, float]:
    """(runner samples/s, bare-loop samples/s): medians of ``reps`` after one warm-up each."""
    runner_s, loop_s = [], []
    for rep in range(reps + 1):
        out = tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        result = run_job(job, RunnerOptions(data, str(out), batch_size=batch, workers=workers, progress=False),
                         DistInfo())
        t1 = time.perf_counter()
        n = bare_loop(job, data, batch, call)
        t2 = time.perf_counter()
        assert n == result.samples, (n, result.samples)
        if rep:  # the first round warms caches and allocators
            runner_s.append(n / (t1 - t0))
            loop_s.append(n / (t2 - t1))
    return statistics.median(runner_s), statistics.median(loop_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512, help="samples for the tiny models")
    p.add_argument("--per-shard", type=int, default=128, help="samples per input shard")
    p.add_argument("--wide-samples", type=int, default=64, help="samples for the d_model 2048 T5")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="the runner's prepare threads")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: steadier on a shared machine; 0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="vtok-bench-precompute-"))
    try:
        write_synthetic(tmp / "data", "wds", args.samples, args.per_shard, args.resolution, progress=False)
        write_synthetic(tmp / "wide", "wds", args.wide_samples, args.wide_samples // 2, args.resolution,
                        progress=False)
        save_t5(tmp / "t5_tiny", 32, 64, 4)
        save_t5(tmp / "t5_wide", 2048, 5120, 32)
        save_vae(tmp / "vae")
        cases = [("T5 tiny (d_model 32)", TextEmbJob(TextEmbOptions(str(tmp / "t5_tiny"))), "data"),
                 ("T5 wide (d_model 2048, 2 layers)", TextEmbJob(TextEmbOptions(str(tmp / "t5_wide"))), "wide"),
                 ("VAE tiny (8, 16 ch)", LatentsJob(LatentsOptions(str(tmp / "vae"), resolution=args.resolution)),
                  "data")]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, runner workers {args.workers}, "
              f"{args.resolution} px, {args.samples} samples ({args.per_shard} per shard; T5 wide: "
              f"{args.wide_samples} in 2 shards), median of {args.reps}")
        print(f"{'job':34s} {'batch':>5s} {'runner/s':>10s} {'loop/s':>10s} {'ratio':>6s}")
        roof, lines = Roofline(), []
        for name, job, data in cases:
            job.load(torch.device("cpu"))
            job.load = lambda device: None  # loaded once: time the work, not the weights' loading
            call = (lambda items, j=job: j.encode(items)) if isinstance(job, TextEmbJob) else (
                lambda items, j=job: j.encode(torch.stack(items).permute(0, 3, 1, 2).float().div(127.5).sub(1)))
            for batch in (int(b) for b in args.batches.split(",")):
                runner, loop = measure(job, str(tmp / data), batch, call, args.reps, tmp, args.workers)
                print(f"{name:34s} {batch:5d} {runner:10.1f} {loop:10.1f} {runner / loop:6.3f}", flush=True)
                per = flops_per_sample(job, str(tmp / data), batch, call)
                lines.append(roof.line(f"{name}, batch {batch}, runner", per * batch, batch / runner))
        print("\n".join(lines))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
