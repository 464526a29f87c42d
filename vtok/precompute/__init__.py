"""Offline jobs that add fields to shards, all on one resumable multi-rank runner (``runner.py``).

    vtok precompute codes     --tokenizer EXPORT   image -> codes (discrete ids or continuous tokens)
    vtok precompute captions  --model DIR | --from-jsonl FILE   image -> caption
    vtok precompute text-emb  --encoder DIR        caption -> text_emb (L, D) float16, text_mask (L,)
    vtok precompute latents   --vae DIR            image -> latents (C, h, w) float16 [+ latents_std]
"""
from __future__ import annotations

import importlib

# command -> (module, options dataclass, job class, one-line help)
JOBS: dict[str, tuple[str, str, str, str]] = {
    "codes": ("vtok.precompute.codes", "CodesOptions", "CodesJob",
              "image shards -> token-code shards with a frozen tokenizer (image dropped by default)"),
    "captions": ("vtok.precompute.captions", "CaptionsOptions", "CaptionsJob",
                 "add `caption` from a local image-to-text model, or import a JSONL of captions"),
    "text-emb": ("vtok.precompute.text_emb", "TextEmbOptions", "TextEmbJob",
                 "add `text_emb` / `text_mask` from a frozen T5 encoder over `caption`"),
    "latents": ("vtok.precompute.latents", "LatentsOptions", "LatentsJob",
                "add `latents` (scaled, float16) from a frozen diffusers AutoencoderKL"),
}


def job_classes(name: str) -> tuple[type, type]:
    """(options dataclass, job class) of the job ``name`` (a key of :data:`JOBS`)."""
    module, options, job, _ = JOBS[name]
    mod = importlib.import_module(module)
    return getattr(mod, options), getattr(mod, job)
