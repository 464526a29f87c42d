"""``vtok eval recon``: reconstruction quality of an exported tokenizer on image shards.

Reports mean PSNR, SSIM, (with VGG16 weights) LPIPS and (with the FID Inception weights) rFID over
the eval images, and each codebook's usage and perplexity over all codes of the run; writes
``recon.json`` and a PNG grid of originals (top row of each pair) above their reconstructions.
rFID is the FID between the reconstructions and the originals of the same images; the originals'
statistics are cached (``vtok.eval.fid``), so later evaluations on the same set skip half the
Inception work.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vtok.data.writers import atomic_write_bytes
from vtok.eval import EvalError
from vtok.eval.fid import (FeatureStats, default_cache_dir, eval_images, frechet_distance, load_stats,
                           ref_stats_path, save_stats)
from vtok.eval.grid import save_grid
from vtok.eval.inception import InceptionFeatures
from vtok.eval.metrics import psnr, ssim
from vtok.models.quant.base import code_usage
from vtok.models.export import load_export


@torch.no_grad()
def evaluate_recon(export_dir: str, data: str, out: str, *, data_format: str = "wds", resolution: int = 256,
                   batch_size: int = 32, max_samples: int = 0, lpips_vgg: str = "", inception: str = "",
                   cache_dir: str | None = None, grid_images: int = 8) -> dict:
    """Evaluate; returns the report it also writes to ``<out>/recon.json`` (``rfid`` is None without
    ``inception``, the FID Inception weights file)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    export = load_export(export_dir, "tokenizer", device)
    model, spec = export.model, export.token_spec.at(resolution)  # one-line error for a wrong resolution
    lpips = None
    if lpips_vgg:
        from vtok.losses import LPIPS

        lpips = LPIPS(lpips_vgg).to(device)
    fid_net = ref_path = ref = rec_stats = None
    if inception:
        fid_net = InceptionFeatures(inception).to(device)
        ref_path = ref_stats_path(cache_dir or default_cache_dir(), data, data_format=data_format,
                                  resolution=resolution, max_images=max_samples, batch_size=batch_size,
                                  weights=inception)
        ref = load_stats(ref_path) if ref_path.is_file() else FeatureStats()
        rec_stats = FeatureStats()
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    codes, count, grid, start = [], 0, [], time.perf_counter()
    for x in eval_images(data, data_format=data_format, resolution=resolution, batch_size=batch_size,
                         max_images=max_samples):
        x = x.to(device)
        indices = model.encode(x)
        rec = model.decode(indices).clamp(-1, 1)
        sums["psnr"] += float(psnr(rec, x).sum())
        sums["ssim"] += float(ssim(rec, x).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips(rec, x).sum())
        if fid_net is not None:
            rec_stats.update(fid_net(rec)[0])
            if isinstance(ref, FeatureStats):
                ref.update(fid_net(x)[0])
        codes.append(indices.cpu())
        if len(grid) < grid_images:
            grid.extend(zip(x.cpu(), rec.cpu()))
        count += len(x)
    if not count:
        raise EvalError(f"no images read from {data}")
    rfid = None
    if fid_net is not None:
        if isinstance(ref, FeatureStats):
            mu, sigma = ref.result()
            save_stats(ref_path, mu, sigma, ref.n)
            ref = {"mu": mu, "sigma": sigma}
        rfid = frechet_distance(*rec_stats.result(), ref["mu"], ref["sigma"])
    all_codes = torch.cat(codes)  # (N, k, h, w)
    report = {"num_images": count, "resolution": resolution, "tokenizer": str(export_dir),
              "psnr": sums["psnr"] / count, "ssim": sums["ssim"] / count,
              "lpips": sums["lpips"] / count if lpips is not None else None, "rfid": rfid,
              "seconds": time.perf_counter() - start, "codebooks": []}
    for i, size in enumerate(spec.vocab_sizes):
        usage = code_usage(all_codes[:, i], size)
        report["codebooks"].append({k: float(v) for k, v in usage.items()})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = grid[:grid_images]
    images = torch.stack([img for pair in pairs for img in pair])  # original, reconstruction, ...
    order = [2 * i for i in range(len(pairs))] + [2 * i + 1 for i in range(len(pairs))]
    save_grid(images[order], out_dir / "recon_grid.png", nrow=len(pairs))
    atomic_write_bytes(out_dir / "recon.json", json.dumps(report, indent=1).encode())
    return report
