"""``vtok eval recon``: reconstruction quality of an exported tokenizer on image shards.

Reports mean PSNR, SSIM and (with VGG16 weights) LPIPS over the eval images, and each codebook's
usage and perplexity over all codes of the run; writes ``recon.json`` and a PNG grid of originals
(top row of each pair) above their reconstructions. rFID is not computed yet.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vtok.config import load_recipe
from vtok.data import build_loader
from vtok.data.writers import atomic_write_bytes
from vtok.eval.grid import save_grid
from vtok.eval.metrics import psnr, ssim
from vtok.models.quant.base import code_usage
from vtok.precompute.codes import load_tokenizer


@torch.no_grad()
def evaluate_recon(export_dir: str, data: str, out: str, *, data_format: str = "wds", resolution: int = 256,
                   batch_size: int = 32, max_samples: int = 0, lpips_vgg: str = "",
                   grid_images: int = 8) -> dict:
    """Evaluate; returns the report it also writes to ``<out>/recon.json``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_tokenizer(export_dir, device)
    lpips = None
    if lpips_vgg:
        from vtok.losses import LPIPS

        lpips = LPIPS(lpips_vgg).to(device)
    recipe = load_recipe(None, [f"data.format={data_format}", f"data.train_shards={data}",
                                f"data.resolution={resolution}", f"data.batch_size={batch_size}",
                                "data.fields=[image]", "data.num_workers=2", "data.shuffle=false",
                                "data.small_images=upscale"])
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    codes, count, grid, start = [], 0, [], time.perf_counter()
    for batch in build_loader(recipe.data, train=False):
        x = batch["image"].to(device)
        if max_samples:
            x = x[: max_samples - count]
        indices = model.encode(x)
        rec = model.decode(indices).clamp(-1, 1)
        sums["psnr"] += float(psnr(rec, x).sum())
        sums["ssim"] += float(ssim(rec, x).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips(rec, x).sum())
        codes.append(indices.cpu())
        if len(grid) < grid_images:
            grid.extend(zip(x.cpu(), rec.cpu()))
        count += len(x)
        if max_samples and count >= max_samples:
            break
    if not count:
        raise ValueError(f"no images read from {data}")
    all_codes = torch.cat(codes)  # (N, k, h, w)
    report = {"num_images": count, "resolution": resolution, "tokenizer": str(export_dir),
              "psnr": sums["psnr"] / count, "ssim": sums["ssim"] / count,
              "lpips": sums["lpips"] / count if lpips is not None else None,
              "seconds": time.perf_counter() - start, "codebooks": []}
    for i, size in enumerate(model.vocab_sizes):
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
