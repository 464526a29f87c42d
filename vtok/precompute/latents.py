"""``vtok precompute latents``: a frozen diffusers ``AutoencoderKL`` turns images into ``latents``.

Per sample: ``latents`` float16 (C, h, w) = ``(posterior_mean - shift_factor) * scaling_factor``
(shift 0 when the VAE config has none), of the loader's center crop at ``resolution``; with ``flip``
(2, C, h, w): the image and its mirror. ``save_moments`` also writes ``latents_std`` (the posterior
std times ``scaling_factor``) so training can draw ``latents + latents_std * noise`` instead of always
using the mean. ``<out>/latents.json`` records the factors (decode with ``latents / scaling_factor +
shift_factor``), the latent shape and the VAE. The VAE comes from a local directory; nothing is
downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtok.precompute.images import center_crop, image_batch, prepare_image
from vtok.precompute.runner import DTYPES, Job, model_identity, resolve_dtype


@dataclass
class LatentsOptions:
    """``vtok precompute latents`` flags (besides the runner's)."""

    vae: str = field(metadata={"help": "local directory of a diffusers AutoencoderKL (config.json + weights)"})
    resolution: int = field(default=256, metadata={"help": "center-crop size fed to the VAE"})
    flip: bool = field(default=False, metadata={"help": "also encode the mirrored image (latents (2, C, h, w))"})
    save_moments: bool = field(default=False, metadata={"help": "also write latents_std (posterior std, scaled)"})
    dtype: str = field(default="auto", metadata={
        "help": "VAE dtype (auto: bfloat16 on GPU, float32 on CPU)", "choices": DTYPES})


class LatentsJob(Job):
    """uint8 images -> ``latents`` (B, C, h, w) float16 [+ ``latents_std``] from ``vae.encode``."""

    name = "latents"

    def __init__(self, opts: LatentsOptions):
        self.opts = opts
        self.adds = ("latents", "latents_std") if opts.save_moments else ("latents",)
        self.transform = center_crop(opts.resolution)
        self.vae: Any = None

    def identity(self) -> dict[str, Any]:
        o = self.opts
        return {"model": model_identity(o.vae), "settings": {"resolution": o.resolution, "flip": o.flip,
                                                             "save_moments": o.save_moments, "dtype": o.dtype}}

    def load(self, device: torch.device) -> None:
        from diffusers import AutoencoderKL

        self.device, self.dtype = device, resolve_dtype(self.opts.dtype, device)
        self.vae = AutoencoderKL.from_pretrained(self.opts.vae, torch_dtype=self.dtype, local_files_only=True)
        self.vae.to(device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    def prepare(self, sample: dict[str, Any]) -> torch.Tensor:
        return prepare_image(sample, self.transform)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> scaled (mean, std), each (B, C, h, w) float32."""
        with torch.no_grad():
            post = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return (post.mean.float() - self.shift) * self.scale, post.std.float() * self.scale

    def run(self, items: list[torch.Tensor]) -> list[dict[str, Any]]:
        x = image_batch(items, self.device, self.dtype)
        b = len(items)
        mean, std = self.encode(torch.cat([x, x.flip(-1)]) if self.opts.flip else x)
        if self.opts.flip:  # (2B, C, h, w) -> (B, 2, C, h, w)
            mean, std = (torch.stack([t[:b], t[b:]], dim=1) for t in (mean, std))
        means = mean.to(torch.float16).cpu().numpy()
        if not self.opts.save_moments:
            return [{"latents": m} for m in means]
        stds = std.to(torch.float16).cpu().numpy()
        return [{"latents": m, "latents_std": s} for m, s in zip(means, stds)]

    def metadata(self) -> dict[str, Any]:
        cfg = self.vae.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        side = self.opts.resolution // down
        shape = [cfg.latent_channels, side, side]
        return {"vae": str(Path(self.opts.vae).resolve()), "scaling_factor": self.scale, "shift_factor": self.shift,
                "formula": "latents = (posterior_mean - shift_factor) * scaling_factor",
                "latent_channels": cfg.latent_channels, "downsample": down, "resolution": self.opts.resolution,
                "shape": [2, *shape] if self.opts.flip else shape, "flip": self.opts.flip,
                "save_moments": self.opts.save_moments, "dtype": str(self.dtype).removeprefix("torch.")}
