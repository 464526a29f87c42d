"""``vtok eval recon``: reconstruction quality of an exported tokenizer on image shards.

Reports mean PSNR, SSIM, (with VGG16 weights) LPIPS and (with the FID Inception weights) rFID over
the eval images, and each codebook's usage and perplexity over all codes of the run; writes
``recon.json`` and a PNG grid of originals (top row of each pair) above their reconstructions.
rFID is the FID between the reconstructions and the originals of the same images; the originals'
statistics are cached (``vtok.eval.fid``), so later evaluations on the same set skip half the
Inception work.

An ordered tokenizer (``token_spec.ordered``: FlexTok) is evaluated by length instead
(``vtok.eval.by_length``): every metric at k = 1, 2, 4, ..., R tokens, a plot against k and a
coarse-to-fine grid; ``lengths`` and the decoding options (``steps``, ``guidance``, ``apg``,
``seed``) apply to it only.
"""
from __future__ import annotations

import json
import logging
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

log = logging.getLogger("vtok.eval")


def load_lpips(lpips_vgg: str, device: torch.device):
    """The LPIPS module on ``device`` from a torchvision VGG16 weights file, or None without one."""
    if not lpips_vgg:
        return None
    from vtok.losses import LPIPS

    return LPIPS(lpips_vgg).to(device)


class RFID:
    """rFID bookkeeping: reference statistics of the originals (cached on disk, computed on the first
    run) and one running ``FeatureStats`` per reconstruction set (``names``)."""

    def __init__(self, inception: str, device: torch.device, data: str, *, data_format: str, resolution: int,
                 max_samples: int, batch_size: int, cache_dir: str | None, names: tuple = ("rec",)):
        self.net = InceptionFeatures(inception).to(device)
        self.ref_path = ref_stats_path(cache_dir or default_cache_dir(), data, data_format=data_format,
                                       resolution=resolution, max_images=max_samples, batch_size=batch_size,
                                       weights=inception)
        self.ref = load_stats(self.ref_path) if self.ref_path.is_file() else FeatureStats()
        self.stats = {name: FeatureStats() for name in names}

    def update(self, originals: torch.Tensor, recs: dict) -> None:
        """originals (B, 3, H, W) and {name: reconstructions (B, 3, H, W)}, all in [-1, 1]."""
        for name, rec in recs.items():
            self.stats[name].update(self.net(rec)[0])
        if isinstance(self.ref, FeatureStats):
            self.ref.update(self.net(originals)[0])

    def result(self) -> dict:
        """{name: rFID}; saves the reference statistics when this run computed them."""
        if isinstance(self.ref, FeatureStats):
            mu, sigma = self.ref.result()
            save_stats(self.ref_path, mu, sigma, self.ref.n)
            self.ref = {"mu": mu, "sigma": sigma}
        return {name: frechet_distance(*st.result(), self.ref["mu"], self.ref["sigma"])
                for name, st in self.stats.items()}


@torch.no_grad()
def evaluate_recon(export_dir: str, data: str, out: str, *, data_format: str = "wds", resolution: int = 256,
                   batch_size: int = 32, max_samples: int = 0, lpips_vgg: str = "", inception: str = "",
                   cache_dir: str | None = None, grid_images: int = 8, lengths: list[int] | None = None,
                   steps: int | None = None, guidance: float | None = None, apg: bool | None = None,
                   seed: int = 0) -> dict:
    """Evaluate; returns the report it also writes to ``<out>/recon.json`` (``rfid`` is None without
    ``inception``, the FID Inception weights file). An ordered tokenizer is evaluated per length
    (``vtok.eval.by_length``; None options take its defaults); the rest ignore those options."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    export = load_export(export_dir, "tokenizer", device)
    model, spec = export.model, export.token_spec.at(resolution)  # one-line error for a wrong resolution
    if spec.ordered:
        from vtok.eval.by_length import DecodeOptions, evaluate_by_length

        options = DecodeOptions.resolve(steps=steps, guidance=guidance, apg=apg, seed=seed)
        return evaluate_by_length(export, export_dir, data, out, data_format=data_format, resolution=resolution,
                                  batch_size=batch_size, max_samples=max_samples, lpips_vgg=lpips_vgg,
                                  inception=inception, cache_dir=cache_dir, grid_images=grid_images,
                                  lengths=lengths, options=options, device=device)
    if lengths or any(v is not None for v in (steps, guidance, apg)):
        log.warning("--lengths / --steps / --guidance / --apg have no effect: %s is not an ordered tokenizer",
                    export.arch)
    lpips = load_lpips(lpips_vgg, device)
    fid = (RFID(inception, device, data, data_format=data_format, resolution=resolution, max_samples=max_samples,
                batch_size=batch_size, cache_dir=cache_dir) if inception else None)
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
        if fid is not None:
            fid.update(x, {"rec": rec})
        codes.append(indices.cpu())
        if len(grid) < grid_images:
            grid.extend(zip(x.cpu(), rec.cpu()))
        count += len(x)
    if not count:
        raise EvalError(f"no images read from {data}")
    rfid = fid.result()["rec"] if fid is not None else None
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
