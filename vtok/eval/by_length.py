"""``vtok eval recon`` on an ordered tokenizer (FlexTok): reconstruction quality by token count.

Every eval image is encoded once; its first k tokens are decoded for each k in ``lengths``
(default 1, 2, 4, ..., R) and PSNR / SSIM / (with VGG16 weights) LPIPS / (with the FID Inception
weights) rFID are measured at each k. Writes ``recon.json`` (the usual keys at the largest k, plus
``by_length``: one row per k, and ``decode``: the sampling settings), ``by_length.png`` (each
metric against k on a log2 axis, drawn with PIL) and ``coarse_to_fine.png`` (one row per image:
the original, then the decodes at each k).

FlexTok decodes to VAE latents: the export's ``vae`` maps images to latents and back as the
flextok task does (``identity``: the pixels are the latents; a diffusers AutoencoderKL directory:
its posterior mean, scaled, and its decoder). Decoding is a seeded ODE: the i-th image read starts
from the noise of ``seed + i`` (the same for every k), so a rerun gives identical numbers (the read
order is fixed for a given data set and batch size).
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw, ImageFont

from vtok.data.writers import atomic_write_bytes
from vtok.eval import EvalError
from vtok.eval.fid import eval_images
from vtok.eval.grid import save_grid
from vtok.eval.metrics import psnr, ssim
from vtok.models.diffusion import Guidance
from vtok.models.quant.base import code_usage

Codec = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class DecodeOptions:
    """How each prefix is decoded: ``steps`` Euler steps, CFG ``guidance`` against the null condition
    (1 = none), ``apg`` adaptive projected guidance (momentum -0.5, threshold 2.5, eta 0), ``seed``.
    The defaults are the official README's setting (20 steps, guidance 7.5, APG)."""

    steps: int = 20
    guidance: float = 7.5
    apg: bool = True
    seed: int = 0

    @classmethod
    def resolve(cls, *, steps: int | None = None, guidance: float | None = None, apg: bool | None = None,
                seed: int = 0) -> "DecodeOptions":
        """The defaults with the given (not None) values; one-line EvalErrors for bad ones."""
        d = cls()
        out = cls(steps=d.steps if steps is None else int(steps),
                  guidance=d.guidance if guidance is None else float(guidance),
                  apg=d.apg if apg is None else bool(apg), seed=int(seed))
        if out.steps < 1:
            raise EvalError(f"--steps {out.steps}: expected at least 1 decoding step")
        if out.guidance < 0:
            raise EvalError(f"--guidance {out.guidance}: expected a scale >= 0 (1 = no guidance)")
        return out

    def guidance_spec(self) -> Guidance | None:
        if self.guidance == 1.0 and not self.apg:
            return None
        return Guidance(scale=self.guidance, apg=self.apg)


def parse_lengths(text: str) -> list[int] | None:
    """``--lengths`` "1,4,16" -> [1, 4, 16]; "" -> None (the default lengths)."""
    if not text.strip():
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--lengths {text!r}: expected comma-separated token counts, e.g. 1,4,16") from None


def check_lengths(lengths: list[int] | None, num_tokens: int) -> list[int]:
    """Sorted unique token counts in 1..R (default: powers of two up to R, and R)."""
    from vtok.models.tokenizers.flextok import powers_of_two

    if not lengths:
        return powers_of_two(num_tokens)
    bad = [k for k in lengths if not 1 <= int(k) <= num_tokens]
    if bad:
        raise EvalError(f"--lengths {','.join(map(str, lengths))}: {bad[0]} is outside 1..{num_tokens} "
                        f"(the tokenizer's token count)")
    return sorted({int(k) for k in lengths})


def latent_codec(meta: dict[str, Any], device: torch.device) -> Codec:
    """(images (B, 3, H, W) in [-1, 1] -> latents, latents -> images) from a tokenizer export's
    metadata, the way the flextok task encodes and decodes (``vae``: ``identity`` or a diffusers dir)."""
    from vtok.tasks.flextok import IDENTITY, FrozenVAEEncoder, latents_to_images

    vae = meta.get("vae", "")
    if vae == IDENTITY:
        return (lambda x: x.float()), (lambda z: z.float())
    if not vae or not (Path(vae) / "config.json").is_file():
        where = f"names the VAE {vae!r}, which is not there" if vae else "names no VAE"
        raise EvalError(f"the tokenizer export {where}: its tokens decode to latents; import it with "
                        "`vtok import flextok CKPT --vae VAE_DIR` (a local diffusers AutoencoderKL)")
    encoder = FrozenVAEEncoder(vae).to(device)
    decoder = latents_to_images(meta, device)
    return (lambda x: encoder(x.to(device))), decoder


def image_noise(shape: tuple[int, ...], seed: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """(count, *shape) standard normal noise, row j drawn from a generator seeded ``seed + first + j``."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + j)) for j in range(count)]
    return torch.stack(rows).to(device)


@torch.no_grad()
def evaluate_by_length(export, export_dir: str, data: str, out: str, *, data_format: str = "wds",
                       resolution: int = 256, batch_size: int = 32, max_samples: int = 0, lpips_vgg: str = "",
                       inception: str = "", cache_dir: str | None = None, grid_images: int = 8,
                       lengths: list[int] | None = None, options: DecodeOptions | None = None,
                       device: torch.device | str = "cpu") -> dict:
    """Metrics of ``export`` (an ordered tokenizer, loaded on ``device``) at each token count; writes
    and returns the report (see the module docstring)."""
    from vtok.eval.recon import RFID, load_lpips

    device = torch.device(device)
    options = options or DecodeOptions()
    model, spec = export.model.eval(), export.token_spec
    ks = check_lengths(lengths, int(spec.shape[-1]))
    encode_latents, decode_latents = latent_codec(export.meta, device)
    lpips = load_lpips(lpips_vgg, device)
    fid = (RFID(inception, device, data, data_format=data_format, resolution=resolution, max_samples=max_samples,
                batch_size=batch_size, cache_dir=cache_dir, names=tuple(ks)) if inception else None)
    sums = {k: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for k in ks}
    codes, grid, count, start = [], [], 0, time.perf_counter()
    guidance = options.guidance_spec()
    for x in eval_images(data, data_format=data_format, resolution=resolution, batch_size=batch_size,
                         max_images=max_samples):
        x = x.to(device)
        z = encode_latents(x)
        ids = model.encode(z)
        noise = image_noise(tuple(z.shape[1:]), options.seed, count, len(x), device)
        recs = {}
        for k in ks:
            lat = model.decode(ids, num_tokens=k, steps=options.steps, guidance=guidance, noise=noise)
            rec = decode_latents(lat).float().clamp(-1, 1)
            recs[k] = rec
            sums[k]["psnr"] += float(psnr(rec, x).sum())
            sums[k]["ssim"] += float(ssim(rec, x).sum())
            if lpips is not None:
                sums[k]["lpips"] += float(lpips(rec, x).sum())
        if fid is not None:
            fid.update(x, recs)
        codes.append(ids.cpu())
        for i in range(min(len(x), grid_images - len(grid))):
            grid.append(torch.stack([x[i].cpu(), *(recs[k][i].cpu() for k in ks)]))
        count += len(x)
    if not count:
        raise EvalError(f"no images read from {data}")
    rfid = fid.result() if fid is not None else {}
    table = [{"k": k, "psnr": sums[k]["psnr"] / count, "ssim": sums[k]["ssim"] / count,
              "lpips": sums[k]["lpips"] / count if lpips is not None else None, "rfid": rfid.get(k)} for k in ks]
    full = table[-1]
    all_codes = torch.cat(codes)
    report = {"num_images": count, "resolution": resolution, "tokenizer": str(export_dir),
              "psnr": full["psnr"], "ssim": full["ssim"], "lpips": full["lpips"], "rfid": full["rfid"],
              "num_tokens": full["k"], "by_length": table, "decode": asdict(options),
              "seconds": time.perf_counter() - start,
              "codebooks": [{n: float(v) for n, v in code_usage(all_codes[:, i], size).items()}
                            for i, size in enumerate(spec.vocab_sizes)]}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(grid), out_dir / "coarse_to_fine.png", nrow=1 + len(ks))
    plot_by_length(table, out_dir / "by_length.png")
    atomic_write_bytes(out_dir / "recon.json", json.dumps(report, indent=1).encode())
    return report


# -- the plot ----------------------------------------------------------------------------------
PANEL_W, PANEL_H, MARGIN = 320, 220, 44
LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID"}


def _panel(draw: ImageDraw.ImageDraw, left: int, title: str, ks: list[int], values: list[float],
           font: ImageFont.ImageFont) -> None:
    """One line plot of ``values`` against log2(k) in the panel whose left edge is ``left``."""
    x0, x1, y0, y1 = left + MARGIN, left + PANEL_W - 12, 28, PANEL_H - 30
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((left + MARGIN, 8), f"{title} vs tokens k", fill=(0, 0, 0), font=font)
    lo, hi = min(values), max(values)
    span = (hi - lo) or max(abs(hi), 1.0) * 0.1
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    lk = [math.log2(k) for k in ks]
    kmin, kmax = lk[0], lk[-1] if lk[-1] > lk[0] else lk[0] + 1

    def xy(k: float, v: float) -> tuple[float, float]:
        return x0 + (k - kmin) / (kmax - kmin) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)

    for k, logk in zip(ks, lk):  # x ticks at every evaluated k
        x = xy(logk, lo)[0]
        draw.line([x, y1, x, y1 + 4], fill=(0, 0, 0))
        draw.text((x - 3 * len(str(k)), y1 + 6), str(k), fill=(0, 0, 0), font=font)
    for v in (lo, (lo + hi) / 2, hi):  # three y ticks
        y = xy(kmin, v)[1]
        draw.line([x0 - 4, y, x0, y], fill=(0, 0, 0))
        draw.text((left + 2, y - 5), f"{v:.3g}", fill=(0, 0, 0), font=font)
    points = [xy(logk, v) for logk, v in zip(lk, values)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))


def plot_by_length(table: list[dict[str, Any]], path: str | Path) -> Path:
    """A PNG with one panel per metric present in ``table`` (rows {"k", "psnr", ...}), each metric
    against k on a log2 axis; written atomically."""
    metrics = [m for m in LABELS if all(row.get(m) is not None for row in table)]
    ks = [int(row["k"]) for row in table]
    image = Image.new("RGB", (PANEL_W * max(len(metrics), 1), PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, m in enumerate(metrics):
        _panel(draw, i * PANEL_W, LABELS[m], ks, [float(row[m]) for row in table], font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


__all__ = ["DecodeOptions", "check_lengths", "parse_lengths", "evaluate_by_length", "latent_codec", "plot_by_length"]
