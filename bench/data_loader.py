#!/usr/bin/env python
"""Images/s of the vtok loader against a plain decode + crop loop over the same JPEG files.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/data_loader.py

(a) baseline: one process reads each file, decodes with PIL, resizes the short side, center-crops
    and makes a [-1, 1] tensor -- what a hand-written loop does; (a') the same loop calling vtok's
    own transform, so (b)/(a') shows the loader's overhead alone; (a'') loop (a') in 2 processes at
    once, one per core: the decode ceiling the 2-worker loaders are held against;
(b) vtok loader over WebDataset shards of the same images, at 0, 1 and 2 DataLoader workers;
(c) vtok loader over MDS shards of the same images, at 0, 1 and 2 workers.
Each loader row gives the rate of a whole pass (an epoch: it starts its workers, and MDS its
partition) and the rate once running, from two datasets of n/2 and n images: (n - n/2) / (t_n -
t_n/2), which cancels the start-up exactly; start-up = t_n - n / running rate.
Also: single-image decode + crop with PIL vs simplejpeg (vs PyTurboJPEG when libturbojpeg loads).
Every figure is the median of --repeats timed passes after one warm-up pass.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vtok.config import load_recipe
from vtok.data import build_loader
from vtok.data.synthetic import render_sample
from vtok.data.transforms import ImageTransform, collate, decode_image
from vtok.data.writers import write_shards


def photo_like_jpeg(i: int, width: int = 500, height: int = 375) -> bytes:
    """A 500x375 JPEG (ImageNet's typical size) with photo-like texture, so decode cost is realistic."""
    img = render_sample(i, resolution=width)[0].crop((0, 0, width, height))
    noise = np.random.default_rng(i).normal(0, 18, (height, width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def median_seconds(fn, count: int, repeats: int) -> float:
    fn()  # warm-up (page cache, worker start-up code paths, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
        assert n == count, f"expected {count} images, got {n}"
    return statistics.median(times)


def median_rate(fn, count: int, repeats: int) -> float:
    return count / median_seconds(fn, count, repeats)


def plain_loop(files: list[Path], res: int) -> int:
    for path in files:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = res / min(w, h)
        img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - res) // 2, (h - res) // 2
        arr = np.asarray(img)[top:top + res, left:left + res]
        torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return len(files)


def plain_vtok_transform(files: list[Path], res: int) -> int:
    """Same loop, with vtok's own decode + crop (uint8, as the loader's workers make them): the
    decode ceiling of one core, which isolates the loader's overhead."""
    transform, rng = ImageTransform(res), random.Random(0)
    for path in files:
        collate([{"image": transform(path.read_bytes(), rng)}])
    return len(files)


def _transform_worker(files: list[Path], res: int, go, done) -> None:
    torch.set_num_threads(1)
    go.wait()
    plain_vtok_transform(files, res)
    done.put(time.perf_counter())


def two_core_ceiling(files: list[Path], res: int, repeats: int) -> float:
    """(a'') the loop (a') in 2 processes at once, one per core, over half the files each: img/s from
    the start signal to the last finish (median of ``repeats`` after a warm-up). This is the decode
    ceiling of 2 cores as they really run together (shared caches and memory, the VM's scheduling),
    which 2 x (a') overstates by a few per cent."""
    ctx = multiprocessing.get_context("fork")

    def once() -> float:
        go, done = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_transform_worker, args=(files[i::2], res, go, done)) for i in range(2)]
        for proc in procs:
            proc.start()
        time.sleep(0.3)  # both started and waiting
        t0 = time.perf_counter()
        go.set()
        end = max(done.get() for _ in procs)
        for proc in procs:
            proc.join()
        return len(files) / (end - t0)

    once()
    return statistics.median(once() for _ in range(repeats))


def loader_pass(fmt: str, path: str, res: int, workers: int) -> int:
    recipe = load_recipe(None, [f"data.format={fmt}", f"data.train_shards={path}", f"data.resolution={res}",
                                f"data.num_workers={workers}", "data.batch_size=32", "data.fields=[image]"])
    return sum(len(b["__key__"]) for b in build_loader(recipe.data))


def decoder_rates(blobs: list[bytes], res: int, repeats: int) -> dict[str, float]:
    def run(decoder):
        def fn():
            for b in blobs:
                decode_image(b, res, decoder)
            return len(blobs)
        return fn

    rates = {"pil": median_rate(run("pil"), len(blobs), repeats),
             "simplejpeg": median_rate(run("simplejpeg"), len(blobs), repeats)}
    try:
        from turbojpeg import TurboJPEG

        tj = TurboJPEG()

        def turbo():
            for b in blobs:
                tj.decode(b)
            return len(blobs)
        rates["pyturbojpeg"] = median_rate(turbo, len(blobs), repeats)
    except Exception as e:  # pip's PyTurboJPEG needs the system libturbojpeg, often absent
        print(f"  (PyTurboJPEG not measured: {type(e).__name__}: {str(e).splitlines()[0]})")
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        blobs = [photo_like_jpeg(i) for i in range(args.num_images)]
        files = []
        for i, b in enumerate(blobs):
            files.append(root / "files" / f"{i:06d}.jpg")
            files[-1].parent.mkdir(exist_ok=True)
            files[-1].write_bytes(b)
        half = args.num_images // 2
        for fmt in ("wds", "mds"):
            for name, count in ((fmt, args.num_images), (f"{fmt}-half", half)):
                write_shards(root / name, fmt, -(-count // args.per_shard),
                             lambda s, count=count: ({"__key__": f"{i:08d}", "image": blobs[i]} for i in
                                                     range(s * args.per_shard, min((s + 1) * args.per_shard, count))),
                             progress=False)

        n, res, reps = args.num_images, args.resolution, args.repeats
        print(f"{n} JPEGs of 500x375 -> {res}x{res} crops, median of {reps} passes after a warm-up")
        print("decoder (decode + scale, one core):")
        dec = decoder_rates(blobs[:128], res, reps)
        for name, rate in dec.items():
            print(f"  {name:12s} {rate:8.0f} img/s   {rate / dec['pil']:.2f}x PIL")
        base = median_rate(lambda: plain_loop(files, res), n, reps)
        print(f"(a) plain PIL loop, 1 process: {base:8.0f} img/s")
        own = median_rate(lambda: plain_vtok_transform(files, res), n, reps)
        print(f"(a') plain loop with vtok's transform: {own:8.0f} img/s   ratio {own / base:.2f}")
        ceiling = two_core_ceiling(files, res, reps)  # the same files, vtok's transform, a tight loop on each core
        print(f"(a'') the same loop in 2 processes at once: {ceiling:8.0f} img/s = {ceiling / (2 * own):.2f}x 2 (a')")
        lines = []
        for fmt, label in (("wds", "(b) vtok WebDataset"), ("mds", "(c) vtok MDS")):
            for workers in (0, 1, 2):
                full = median_seconds(lambda: loader_pass(fmt, str(root / fmt), res, workers), n, reps)
                part = median_seconds(lambda: loader_pass(fmt, str(root / f"{fmt}-half"), res, workers), half, reps)
                running = (n - half) / max(full - part, 1e-9)
                start = full - n / running
                print(f"{label:20s} workers={workers}: pass {n / full:6.0f} img/s (ratio {n / full / base:.2f}), "
                      f"running {running:6.0f} img/s, start-up {start:5.2f} s")
            lines.append(f"roofline {fmt} loader, 2 workers: running {running:.0f} img/s = {running / ceiling:.2f}x the "
                         f"decode ceiling ({ceiling:.0f} img/s: (a''), the decode + crop loop on each of 2 cores at "
                         f"once; target >= 0.9x; {running / (2 * own):.2f}x of 2 (a')); a whole {n}-image pass with "
                         f"its {start:.2f} s start-up: {n / full / ceiling:.2f}x")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
