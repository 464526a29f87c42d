#!/usr/bin/env python
"""Images/s of the vtok loader against a plain decode + crop loop over the same JPEG files.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/data_loader.py

(a) baseline: one process reads each file, decodes with PIL, resizes the short side, center-crops
    and makes a [-1, 1] tensor -- what a hand-written loop does; (a') the same loop calling vtok's
    own transform, so (b)/(a') shows the loader's overhead alone;
(b) vtok loader over WebDataset shards of the same images, at 0, 1 and 2 DataLoader workers;
(c) vtok loader over MDS shards of the same images, at 0, 1 and 2 workers.
Also: single-image decode + crop with PIL vs simplejpeg (vs PyTurboJPEG when libturbojpeg loads).
Every figure is the median of --repeats timed passes after one warm-up pass.
"""
from __future__ import annotations

import argparse
import io
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


def median_rate(fn, count: int, repeats: int) -> float:
    fn()  # warm-up (page cache, worker start-up code paths, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
        assert n == count, f"expected {count} images, got {n}"
    return count / statistics.median(times)


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
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
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
        shards = -(-args.num_images // args.per_shard)
        for fmt in ("wds", "mds"):
            write_shards(root / fmt, fmt, shards, lambda s: ({"__key__": f"{i:08d}", "image": blobs[i]}
                         for i in range(s * args.per_shard, min((s + 1) * args.per_shard, len(blobs)))),
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
        ceiling = 2 * own  # the same files decoded + cropped by vtok's transform in a tight loop, on each of 2 cores
        lines = []
        for fmt, label in (("wds", "(b) vtok WebDataset"), ("mds", "(c) vtok MDS")):
            for workers in (0, 1, 2):
                rate = median_rate(lambda: loader_pass(fmt, str(root / fmt), res, workers), n, reps)
                print(f"{label:20s} workers={workers}: {rate:8.0f} img/s   ratio {rate / base:.2f}")
            lines.append(f"roofline {fmt} loader, 2 workers: {rate:.0f} img/s = {rate / ceiling:.2f}x the decode "
                         f"ceiling ({ceiling:.0f} img/s: the decode + crop loop (a') on each of 2 cores; target >= 0.9x)")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
