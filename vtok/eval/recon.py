"""``vtok eval recon``: reconstruction quality of an exported tokenizer on image shards.

Reports mean PSNR, SSIM, (with VGG16 weights) LPIPS and (with the FID Inception weights) rFID over
the eval images, and each codebook's usage and perplexity over all codes of the run; writes
``recon.json`` and a PNG grid of originals (top row) above their reconstructions (one row per
variant below). rFID is the FID between the reconstructions and the originals of the same images;
the originals' statistics are cached (``vtok.eval.fid``), so later evaluations on the same set skip
half the Inception work.

A tokenizer that reads captions (``token_spec.condition == "text"``: TexTok) reads ``text_emb`` /
``text_mask`` from the eval shards (``vtok precompute text-emb``, with the T5 it was trained with) and
passes them to encode and decode; the report's metrics are WITH the captions, and a second block
``without_text`` holds the same metrics for the same model with an empty caption (every text position
masked out of attention on both sides; ``without_text.meaning`` says so in the JSON). ``compare``: a
second tokenizer export (e.g. the ``-notext`` twin) evaluated on the same images, reported as the
``compare`` block (with captions if it reads them).

An ordered tokenizer (``token_spec.ordered``: FlexTok) is evaluated by length instead
(``vtok.eval.by_length``): every metric at k = 1, 2, 4, ..., R tokens, a plot against k and a
coarse-to-fine grid; ``lengths`` and the decoding options (``steps``, ``guidance``, ``apg``,
``seed``) apply to it only.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vtok.config import RecipeError
from vtok.data.shards import read_shard_meta
from vtok.data.writers import atomic_write_bytes
from vtok.eval import EvalError
from vtok.eval.fid import (FeatureStats, default_cache_dir, eval_batches, frechet_distance, load_stats, ref_stats_path,
                           save_stats)
from vtok.eval.grid import save_grid
from vtok.eval.inception import InceptionFeatures
from vtok.eval.metrics import psnr, ssim
from vtok.models.api import Condition
from vtok.models.export import Export, load_export
from vtok.models.quant.base import code_usage

log = logging.getLogger("vtok.eval")
TEXT_FIELDS = ("text_emb", "text_mask")
WITHOUT_TEXT = ("the same model with an empty caption: every text position masked out of attention in both "
                "the tokenizer and the detokenizer (the image tokens and patches still attend to each other); "
                "the model was trained with captions, so this measures how much it leans on them")


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


def reads_text(export: Export) -> bool:
    """Whether the exported tokenizer needs the captions' text embeddings to encode / decode."""
    return export.token_spec.condition == "text"


def check_text_shards(export: Export, export_dir: str, data: str) -> dict[str, Any]:
    """The ``text-emb.json`` of the eval shards ``data`` for a tokenizer that reads captions; a one-line
    EvalError naming ``vtok precompute text-emb`` when the shards carry no text fields, or carry
    embeddings of another width than the model was trained with."""
    encoder = export.meta.get("text_encoder", {}).get("encoder") or "T5_DIR"
    try:
        _, meta = read_shard_meta(data, "text-emb.json", "text-emb", "--data")
    except RecipeError:
        raise EvalError(f"{export.arch} ({export_dir}) reads captions but --data {data} has no text_emb / text_mask "
                        f"(no text-emb.json): run `vtok precompute text-emb --encoder {encoder} --data {data} "
                        f"--out DIR` and pass --data DIR") from None
    width = int(meta["shape"][-1])
    want = getattr(getattr(export.model, "cfg", None), "text_dim", width)
    if width != want:
        raise EvalError(f"--data {data} carries {width}-wide text embeddings but {export.arch} ({export_dir}) "
                        f"reads {want}-wide ones: rerun `vtok precompute text-emb --encoder {encoder}`")
    trained = export.meta.get("text_encoder", {}).get("encoder")
    if trained and meta.get("encoder") and Path(trained).name != Path(meta["encoder"]).name:
        log.warning("the eval shards' captions were encoded with %s; %s was trained on %s's embeddings",
                    meta["encoder"], export.arch, trained)
    return meta


def empty_caption(cond: Condition) -> Condition:
    """``cond`` with every text position masked (and zeroed): the caption says nothing."""
    return Condition(text=torch.zeros_like(cond.text), text_mask=torch.zeros(cond.text.shape[:2], dtype=torch.bool,
                                                                               device=cond.text.device))


@dataclass
class Variant:
    """One way of reconstructing the eval images: ``model`` with the condition ``cond(batch_cond)``."""

    name: str
    model: Any
    cond: Callable[[Condition | None], Condition | None]
    sums: dict[str, float] = field(default_factory=lambda: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0})

    def run(self, x: torch.Tensor, cond: Condition | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, reconstructions (B, 3, H, W) clamped to [-1, 1]) of images x (B, 3, H, W)."""
        c = self.cond(cond)
        tokens = self.model.encode(x, c) if c is not None else self.model.encode(x)
        rec = self.model.decode(tokens, c) if c is not None else self.model.decode(tokens)
        return tokens, rec.float().clamp(-1, 1)

    def block(self, count: int, lpips: bool, rfid: float | None) -> dict[str, Any]:
        """The mean metrics over ``count`` images (LPIPS None when it was not measured)."""
        return {"psnr": self.sums["psnr"] / count, "ssim": self.sums["ssim"] / count,
                "lpips": self.sums["lpips"] / count if lpips else None, "rfid": rfid}


def load_compare(compare: str, device: torch.device, resolution: int) -> Export:
    """The ``compare`` tokenizer export (a non-ordered one that takes ``resolution`` px images)."""
    other = load_export(compare, "tokenizer", device)
    if other.token_spec.at(resolution).ordered:
        raise EvalError(f"--compare {compare}: {other.arch} is an ordered tokenizer; compare it with its own "
                        "`vtok eval recon` (by length)")
    return other


@torch.no_grad()
def evaluate_recon(export_dir: str, data: str, out: str, *, data_format: str = "wds", resolution: int = 256,
                   batch_size: int = 32, max_samples: int = 0, lpips_vgg: str = "", inception: str = "",
                   cache_dir: str | None = None, grid_images: int = 8, lengths: list[int] | None = None,
                   steps: int | None = None, guidance: float | None = None, apg: bool | None = None,
                   seed: int = 0, compare: str = "") -> dict:
    """Evaluate; returns the report it also writes to ``<out>/recon.json`` (``rfid`` is None without
    ``inception``, the FID Inception weights file). A tokenizer that reads captions gets them from the
    shards and also reports ``without_text``; ``compare``: a second tokenizer export evaluated on the
    same images (the ``compare`` block). An ordered tokenizer is evaluated per length
    (``vtok.eval.by_length``; None options take its defaults); the rest ignore those options."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    export = load_export(export_dir, "tokenizer", device)
    model, spec = export.model, export.token_spec.at(resolution)  # one-line error for a wrong resolution
    if spec.ordered:
        if compare:
            raise EvalError(f"--compare is for tokenizers evaluated at one length; {export.arch} is ordered "
                            "(evaluated by length): evaluate each export on its own")
        from vtok.eval.by_length import DecodeOptions, evaluate_by_length

        options = DecodeOptions.resolve(steps=steps, guidance=guidance, apg=apg, seed=seed)
        return evaluate_by_length(export, export_dir, data, out, data_format=data_format, resolution=resolution,
                                  batch_size=batch_size, max_samples=max_samples, lpips_vgg=lpips_vgg,
                                  inception=inception, cache_dir=cache_dir, grid_images=grid_images,
                                  lengths=lengths, options=options, device=device)
    if lengths or any(v is not None for v in (steps, guidance, apg)):
        log.warning("--lengths / --steps / --guidance / --apg have no effect: %s is not an ordered tokenizer",
                    export.arch)
    other = load_compare(compare, device, resolution) if compare else None
    variants = [Variant("rec", model, lambda c: c if reads_text(export) else None)]
    if reads_text(export):
        check_text_shards(export, export_dir, data)
        variants.append(Variant("without_text", model, empty_caption))
    if other is not None:
        if reads_text(other):
            check_text_shards(other, compare, data)
        variants.append(Variant("compare", other.model, lambda c: c if reads_text(other) else None))
    text = reads_text(export) or (other is not None and reads_text(other))
    fields = ("image", *TEXT_FIELDS) if text else ("image",)
    lpips = load_lpips(lpips_vgg, device)
    fid = (RFID(inception, device, data, data_format=data_format, resolution=resolution, max_samples=max_samples,
                batch_size=batch_size, cache_dir=cache_dir, names=tuple(v.name for v in variants))
           if inception else None)
    codes, count, grid, start = [], 0, [], time.perf_counter()
    for batch in eval_batches(data, fields, data_format=data_format, resolution=resolution, batch_size=batch_size,
                              max_images=max_samples):
        x = batch["image"].to(device)
        cond = (Condition(text=batch["text_emb"].float(), text_mask=batch["text_mask"].bool()).to(device)
                if text else None)
        recs = {}
        for v in variants:
            tokens, rec = v.run(x, cond)
            v.sums["psnr"] += float(psnr(rec, x).sum())
            v.sums["ssim"] += float(ssim(rec, x).sum())
            if lpips is not None:
                v.sums["lpips"] += float(lpips(rec, x).sum())
            if v.name == "rec" and spec.discrete:
                codes.append(tokens.cpu())
            recs[v.name] = rec
        if fid is not None:
            fid.update(x, recs)
        if len(grid) < grid_images:
            grid.extend(zip(x.cpu(), *(r.cpu() for r in recs.values())))
        count += len(x)
    if not count:
        raise EvalError(f"no images read from {data}" + (" (with text_emb / text_mask)" if text else ""))
    rfid = fid.result() if fid is not None else {}
    main = variants[0].block(count, lpips is not None, rfid.get("rec"))
    report = {"num_images": count, "resolution": resolution, "tokenizer": str(export_dir), **main,
              "seconds": time.perf_counter() - start, "codebooks": []}
    if reads_text(export):
        report["condition"] = "text: the eval shards' captions (text_emb / text_mask) on both sides"
        report["without_text"] = {"meaning": WITHOUT_TEXT,
                                  **variants[1].block(count, lpips is not None, rfid.get("without_text"))}
    if other is not None:
        report["compare"] = {"tokenizer": str(compare), "arch": other.arch, "text": reads_text(other),
                             **variants[-1].block(count, lpips is not None, rfid.get("compare"))}
    if codes:
        all_codes = torch.cat(codes)  # (N, k, h, w)
        for i, size in enumerate(spec.vocab_sizes):
            usage = code_usage(all_codes[:, i], size)
            report["codebooks"].append({k: float(v) for k, v in usage.items()})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = grid[:grid_images]
    images = torch.stack([img for row in rows for img in row])  # per image: original, its reconstructions
    per = len(variants) + 1
    order = [per * i + j for j in range(per) for i in range(len(rows))]
    save_grid(images[order], out_dir / "recon_grid.png", nrow=len(rows))
    atomic_write_bytes(out_dir / "recon.json", json.dumps(report, indent=1).encode())
    return report
