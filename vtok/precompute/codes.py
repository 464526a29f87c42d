"""``vtok precompute codes``: a frozen tokenizer turns image shards into code shards.

Output samples have ``codes`` (int16 when every vocabulary fits, else int32; float16 for continuous
tokens (``TokenSpec.dim > 0``); shape ``token_spec.shape``, or ``(2, *shape)`` with ``flip``: the image
and its mirror, as LlamaGen's code extraction augments) and every input field except ``image``: code
shards feed generators, which never read pixels, and stay ~100x smaller without them
(``keep_image=True`` keeps it). ``<out>/codes.json`` records the tokenizer and its ``token_spec``
(what the gpt task sizes itself from). A tokenizer on VAE latents (FlexTok; its export names the
VAE dir) gets the images through that frozen VAE's encoder first ("identity": pixels are the
latents). A tokenizer whose ``token_spec.condition`` is "text" (TexTok) encodes each image with its
caption's ``text_emb`` / ``text_mask`` (the input shards must carry them: ``vtok precompute
text-emb``); the mirror of ``flip`` shares the caption. Runs on :mod:`vtok.precompute.runner` (ranks,
resume, summary).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtok.data.transforms import DataError
from vtok.models.api import Condition, TokenSpec
from vtok.parallel.dist import DistInfo
from vtok.precompute.images import center_crop, image_batch, prepare_image
from vtok.precompute.runner import Job, RunnerOptions, model_identity, run_job


@dataclass
class CodesOptions:
    """``vtok precompute codes`` flags (besides the runner's)."""

    tokenizer: str = field(metadata={"help": "a `vtok export` directory of a tokenizer"})
    resolution: int = field(default=256, metadata={"help": "center-crop size fed to the tokenizer"})
    flip: bool = field(default=False, metadata={"help": "also encode the mirrored image (codes (2, ...))"})
    keep_image: bool = field(default=False, metadata={"help": "keep the image in the output shards"})


def code_dtype(spec: TokenSpec) -> np.dtype:
    """int16 when every vocabulary fits (ids < 32,768), else int32; float16 for continuous tokens."""
    if not spec.discrete:
        return np.dtype(np.float16)
    return np.dtype(np.int16 if max(spec.vocab_sizes) <= np.iinfo(np.int16).max + 1 else np.int32)


class CodesJob(Job):
    """uint8 images -> ``codes`` (B, *token_spec.shape) [or (B, 2, ...) with flip] from ``encode``."""

    name = "codes"
    adds = ("codes",)

    def __init__(self, opts: CodesOptions):
        self.opts = opts
        self.drops = () if opts.keep_image else ("image",)
        self.transform = center_crop(opts.resolution)
        self.model: Any = None
        self.vae: torch.nn.Module | None = None  # a latent tokenizer's frozen VAE encoder
        self.spec: TokenSpec | None = None

    def identity(self) -> dict[str, Any]:
        o = self.opts
        return {"model": model_identity(o.tokenizer),
                "settings": {"resolution": o.resolution, "flip": o.flip, "keep_image": o.keep_image}}

    def load(self, device: torch.device) -> None:
        from vtok.models.export import load_export

        export = load_export(self.opts.tokenizer, "tokenizer", device)
        self.model, self.device = export.model, device
        vae = export.meta.get("vae", "")
        if vae:  # a FlexTok export: images -> latents (unless "identity") -> ids
            from vtok.tasks.flextok import IDENTITY, FrozenVAEEncoder

            self.vae = None if vae == IDENTITY else FrozenVAEEncoder(vae).to(device)
        self.spec = export.token_spec.at(self.opts.resolution)  # one-line error for a wrong resolution
        self.dtype = code_dtype(self.spec)

    def prepare(self, sample: dict[str, Any]) -> tuple[torch.Tensor, Any, Any]:
        """(uint8 image (H, W, 3), text_emb (L, D) | None, text_mask (L,) | None)."""
        image = prepare_image(sample, self.transform)
        if self.spec.condition != "text":
            return image, None, None
        missing = [f for f in ("text_emb", "text_mask") if f not in sample]
        if missing:  # every sample of a shard set has the same fields: the input is the wrong one
            raise DataError(f"--data has no {missing} (key {sample['__key__']}): this tokenizer encodes with "
                            "captions; run `vtok precompute text-emb` on the shards and pass its --out")
        return image, sample["text_emb"], sample["text_mask"]

    def condition(self, items: list[tuple[torch.Tensor, Any, Any]]) -> Condition | None:
        """The batch's captions as Condition(text (B, L, D) float32, text_mask (B, L) bool), or None."""
        if self.spec.condition != "text":
            return None
        text = torch.stack([torch.as_tensor(np.asarray(t)) for _, t, _ in items]).float()
        mask = torch.stack([torch.as_tensor(np.asarray(m)) for _, _, m in items]).bool()
        return Condition(text=text, text_mask=mask).to(self.device)

    @torch.no_grad()
    def run(self, items: list[tuple[torch.Tensor, Any, Any]]) -> list[dict[str, Any]]:
        images = image_batch([i[0] for i in items], self.device)
        cond = self.condition(items)
        codes = self.encode(images, cond)  # (B, *token_shape)
        if self.opts.flip:
            codes = torch.stack([codes, self.encode(images.flip(-1), cond)], dim=1)
        codes = codes.float() if not self.spec.discrete else codes
        return [{"codes": c.astype(self.dtype)} for c in codes.cpu().numpy()]

    def encode(self, images: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, *token_shape) (through the VAE when there is
        one; with the captions ``cond`` for a text-conditioned tokenizer)."""
        x = images if self.vae is None else self.vae(images)
        return self.model.encode(x) if cond is None else self.model.encode(x, cond)

    def metadata(self) -> dict[str, Any]:
        return {"tokenizer": str(Path(self.opts.tokenizer).resolve()), "token_spec": self.spec.to_dict(),
                "flip": self.opts.flip, "resolution": self.opts.resolution, "keep_image": self.opts.keep_image}


def precompute_codes(export_dir: str, data: str, out: str, info: DistInfo, *, out_format: str = "",
                     resolution: int = 256, flip: bool = False, batch_size: int = 64,
                     progress: bool = True, keep_image: bool = False) -> int:
    """Encode every shard of ``data`` into ``out``; returns the number of shards this rank wrote."""
    job = CodesJob(CodesOptions(export_dir, resolution, flip, keep_image))
    opts = RunnerOptions(data, out, out_format, batch_size=batch_size, progress=progress)
    return run_job(job, opts, info).written_shards
