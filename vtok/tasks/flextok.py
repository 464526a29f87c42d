"""FlexTok tokenizer training (``train.task: flextok``): latents -> 1..R ordered FSQ tokens -> a
rectified-flow decoder that reconstructs the latents from any prefix of them.

What FlexTok models is read from the data (``data.fields``):

* ``latents``: the shards of ``vtok precompute latents``, sized from the ``latents.json`` beside them
  (per sample (C, h, w), or (2, C, h, w) with ``--flip``: one of the two is drawn per sample and
  step). The VAE directory and its scaling / shift factors go into the export so images can be
  decoded. The full-size recipes (recipes/flextok/) train on FlexTok's 16-channel VAE latents.
* ``image`` with ``model.vae``: the latents are made on the fly by a frozen encoder, for small
  runs. ``model.vae: identity`` makes the pixels the "latents" ((3, R, R) in [-1, 1]; FlexTok is
  sized with latent_channels 3, latent_size R, vae_downsample 1), which is what lets a CPU smoke run
  learn the synthetic shapes; ``model.vae: DIR`` is a local diffusers ``AutoencoderKL`` (posterior
  mean, ``(mean - shift_factor) * scaling_factor`` as ``vtok precompute latents`` writes).

Objective per sample (FlexTok, shared/PAPERS.md): encode, keep the first keep_k tokens (nested
dropout by ``model.nested_dropout``; keep_k = 0, the null condition for CFG, with probability
``model.null_prob``), noise at logit-normal t and MSE on the decoder's velocity ``noise - x``;
optional REPA on decoder block ``model.repa_depth`` against frozen DINOv2 patch tokens (needs
``image``). Every random draw (flip pick, t, noise, keep_k, null dropout) comes from ``KeyedDraws``
in that order, so 2 ranks x B/2 follow the 1 x B trajectory exactly.

``evaluate``: a coarse-to-fine grid (rows: the first ``model.eval_images`` samples of the first
training batch this rank saw; columns: the input, then decodes from k = 1, 2, 4, ..., R tokens)
at ``<run_dir>/samples/step_N.png``, and per-k latent MSE ``eval/mse_k<k>``. It decodes with the
live (gathered) weights on every rank in lockstep, as the dit task samples.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vtok.config import RecipeError
from vtok.data.shards import read_shard_meta
from vtok.losses.alignment import build_repa_teacher, cosine_alignment, tokens_on_grid
from vtok.models.pretrained import PretrainedSpec
from vtok.models.registry import MODELS, build_model
from vtok.models.tokenizers.flextok import NESTED_DROPOUT_MODES, FlexTok, powers_of_two
from vtok.train.keyed_rng import KeyedDraws
from vtok.train.task import TrainTask, register_task

log = logging.getLogger("vtok.train")
IDENTITY = "identity"


def find_source(recipe: Any, cfg: "FlexTokTask.Config") -> dict[str, Any]:
    """What the tokenizer reads, from ``data.fields`` and metadata: ``{"source": "latents" | "image",
    "channels", "size" (latent side), "downsample" (image px per latent px), "vae" (dir, "identity"
    or ""), "latent_scaling", "latent_shift"}``; one-line RecipeErrors name the fix."""
    fields, res = list(recipe.data.fields), int(recipe.data.resolution)
    if "latents" in fields:
        path, meta = read_shard_meta(recipe.data.train_shards, "latents.json", "latents", "model.source_meta",
                                     cfg.source_meta)
        c, h, w = (int(s) for s in meta["shape"][-3:])
        if h != w:
            raise RecipeError(f"{path}: latents of {h}x{w}; FlexTok takes square latent grids")
        down = int(meta.get("downsample") or max(1, int(meta.get("resolution", res)) // h))
        return {"source": "latents", "channels": c, "size": h, "downsample": down, "vae": meta.get("vae", ""),
                "latent_scaling": float(meta.get("scaling_factor", 1.0)),
                "latent_shift": float(meta.get("shift_factor", 0.0))}
    if "image" not in fields:
        raise RecipeError(f"data.fields={fields}: the flextok task reads `latents` (vtok precompute latents) "
                          "or `image` (with model.vae)")
    if not cfg.vae:
        raise RecipeError("data.fields has `image` but model.vae is empty: set model.vae=identity (pixels as "
                          "latents, small runs) or a local diffusers AutoencoderKL dir, or train on `latents` shards")
    if cfg.vae == IDENTITY:
        return {"source": "image", "channels": 3, "size": res, "downsample": 1, "vae": IDENTITY,
                "latent_scaling": 1.0, "latent_shift": 0.0}
    config = Path(cfg.vae) / "config.json"
    if not config.is_file():
        raise RecipeError(f"model.vae={cfg.vae!r}: {config} not found; expected a local diffusers AutoencoderKL "
                          "directory (config.json + weights) or `identity`")
    vae = json.loads(config.read_text())
    down = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    if res % down:
        raise RecipeError(f"data.resolution={res} is not a multiple of the VAE's downsampling {down}")
    return {"source": "image", "channels": int(vae.get("latent_channels", 4)), "size": res // down,
            "downsample": down, "vae": str(Path(cfg.vae).resolve()),
            "latent_scaling": float(vae.get("scaling_factor") or 1.0),
            "latent_shift": float(vae.get("shift_factor") or 0.0)}


class FrozenVAEEncoder(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> scaled latents ``(posterior_mean - shift) * scaling`` of a
    frozen local diffusers AutoencoderKL (encoder only is used; nothing is downloaded)."""

    def __init__(self, vae_dir: str):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise RecipeError(f"model.vae={vae_dir!r} needs the `diffusers` package (pip install diffusers), "
                              "or use model.vae=identity / precomputed latents") from None
        self.vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval().requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode(images.to(next(self.vae.parameters()).dtype)).latent_dist.mean
        return (mean.float() - self.shift) * self.scale


def latents_to_images(meta: dict[str, Any], device: torch.device | str = "cpu"
                      ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Decoded latents (B, C, h, w) -> images (B, 3, H, W) from ``meta``'s ``vae`` / ``latent_scaling``
    / ``latent_shift`` (a flextok source or export): the identity for "identity" (the pixels are the
    latents), else the local diffusers VAE's decoder; None when that VAE is not there."""
    if meta.get("vae") == IDENTITY:
        return lambda z: z.float()
    from vtok.tasks.dit import make_decoder

    return make_decoder({"source": "latents", "vae": meta.get("vae", ""), "latent_scaling":
                         meta.get("latent_scaling", 1.0), "latent_shift": meta.get("latent_shift", 0.0)},
                        device=device)


def keyed_keep_k(draws: KeyedDraws, num_registers: int, mode: str, null_prob: float) -> torch.Tensor:
    """Nested-dropout keep counts (B,) int64 from per-sample keyed draws, with the distributions of
    ``vtok.models.tokenizers.flextok.sample_keep_k``; always consumes one integer and one uniform
    draw per sample (so the stream layout does not depend on the mode)."""
    r = num_registers
    choices = powers_of_two(r) if mode == "pow2" else None
    idx = draws.integers(len(choices) if choices else r)
    if mode == "uniform":
        k = idx + 1
    elif mode == "pow2":
        k = torch.tensor(choices, device=idx.device)[idx]
    elif mode == "uniform_pow2":
        k = torch.clamp(2 ** torch.ceil(torch.log2((idx + 1).double())).long(), max=r)
    else:  # "none"
        k = torch.full_like(idx, r)
    null = draws.uniform() < null_prob
    return torch.where(null, torch.zeros_like(k), k).long()


@register_task("flextok")
class FlexTokTask(TrainTask):
    export_module = "tokenizer"

    @dataclass
    class Config:
        arch: str = "flextok-d12-d12"  # a FlexTok in vtok.models.registry (flextok-*)
        source_meta: str = ""  # latents.json of the shards (default: beside data.train_shards)
        vae: str = ""  # `image` source only: "identity" (pixels are the latents) or a diffusers AutoencoderKL dir
        # size overrides of the arch (0 / empty = the registry's); tiny recipes use them
        encoder_depth: int = 0
        encoder_width: int = 0
        decoder_depth: int = 0
        decoder_width: int = 0
        head_dim: int = 0
        patch_size: int = 0
        num_registers: int = 0
        fsq_levels: list[int] = field(default_factory=list)
        # training objective (empty / negative = the registry's FlexTokConfig values)
        nested_dropout: str = ""  # uniform | pow2 | uniform_pow2 | none
        null_prob: float = -1.0  # P(keep_k = 0), the CFG null condition
        flow_loc: float = 0.0  # logit-normal t = sigmoid(loc + scale * N(0, 1)), then shifted
        flow_scale: float = 1.0
        flow_shift: float = 1.0
        # REPA: a projector after decoder block repa_depth predicts frozen DINOv2 patch tokens of the
        # image (-cosine, x repa_weight); the teacher runs at the FlexTok patch grid x 14 px. 0 = off.
        repa_depth: int = 0
        repa_dim: int = 1024  # the teacher's width (DINOv2-S 384, B 768, L 1024; FlexTok: L)
        repa_weight: float = 0.5
        repa_teacher: PretrainedSpec = field(default_factory=lambda: PretrainedSpec(
            kind="dinov2", model="vit_large_patch14_dinov2", feature="tokens"))
        # every train.eval_every steps: coarse-to-fine grid + eval/mse_k<k>
        eval_images: int = 4  # rows (per rank, from the first batch it trained on)
        eval_steps: int = 25  # Euler steps (official default 25; README 20)
        eval_guidance: float = 1.0  # CFG against the null condition; 1 = none

    @staticmethod
    def overrides(cfg: "FlexTokTask.Config", source: dict[str, Any]) -> dict[str, Any]:
        """FlexTokConfig fields for ``build_model``: the data's latent shape plus the recipe's overrides."""
        out: dict[str, Any] = dict(latent_channels=source["channels"], latent_size=source["size"],
                                   vae_downsample=source["downsample"], flow_loc=cfg.flow_loc,
                                   flow_scale=cfg.flow_scale, flow_shift=cfg.flow_shift)
        for name in ("encoder_depth", "encoder_width", "decoder_depth", "decoder_width", "head_dim", "patch_size",
                     "num_registers", "nested_dropout"):
            if getattr(cfg, name):
                out[name] = getattr(cfg, name)
        if cfg.fsq_levels:
            out["fsq"] = {"levels": list(cfg.fsq_levels)}
        if cfg.null_prob >= 0:
            out["null_prob"] = cfg.null_prob
        if cfg.repa_depth:
            out.update(repa_depth=cfg.repa_depth, repa_dim=cfg.repa_dim)
        return out

    @classmethod
    def build_export(cls, cfg: "FlexTokTask.Config", recipe) -> FlexTok:
        """The FlexTok, sized from the data's latents (or pixels); REPA's projector included when on."""
        if cfg.arch not in MODELS or MODELS[cfg.arch].model is not FlexTok:
            known = ", ".join(n for n, e in MODELS.items() if e.model is FlexTok)
            raise RecipeError(f"model.arch={cfg.arch!r} is not a registered FlexTok; known: {known}")
        if cfg.nested_dropout and cfg.nested_dropout not in NESTED_DROPOUT_MODES:
            raise RecipeError(f"model.nested_dropout={cfg.nested_dropout!r}: expected one of "
                              f"{', '.join(NESTED_DROPOUT_MODES)}")
        if cfg.null_prob >= 1.0:
            raise RecipeError(f"model.null_prob={cfg.null_prob}: expected 0 <= p < 1 (negative: the arch's)")
        source = find_source(recipe, cfg)
        kw = cls.overrides(cfg, source)
        patch = kw.get("patch_size", MODELS[cfg.arch].config.patch_size)
        if source["size"] % max(patch, 1):
            raise RecipeError(f"a {source['size']}x{source['size']} latent grid does not split into {patch}x{patch} "
                              "patches; change data.resolution or model.patch_size")
        for side in ("encoder", "decoder"):
            width = kw.get(f"{side}_width", getattr(MODELS[cfg.arch].config, f"{side}_width"))
            head = kw.get("head_dim", MODELS[cfg.arch].config.head_dim)
            if width % head:
                raise RecipeError(f"model.{side}_width={width} is not a multiple of model.head_dim={head}")
        try:
            return build_model(cfg.arch, **kw)
        except ValueError as e:  # FlexTokConfig / FSQ checks
            raise RecipeError(f"model: {e}") from None

    def __init__(self, cfg: "FlexTokTask.Config", recipe):
        self.cfg = cfg
        self.source = find_source(recipe, cfg)
        model = self.build_export(cfg, recipe)
        self.field = "latents" if self.source["source"] == "latents" else "image"
        self.modules = {"tokenizer": model}
        self.optimizers = {"main": ["tokenizer"]}
        self.ema_modules = ("tokenizer",)
        self.seed = int(recipe.seed)
        self.mcfg = model.cfg
        self._params = sum(p.numel() for p in model.parameters())
        self._eval_latents: torch.Tensor | None = None
        self._decoder: Callable | bool | None = None  # None: not built yet; False: missing
        self.frozen = {}
        if self.field == "image" and self.source["vae"] != IDENTITY:
            self.frozen["vae"] = FrozenVAEEncoder(self.source["vae"])
        if cfg.repa_depth:
            if self.field == "latents" and (recipe.data.crop != "center" or recipe.data.hflip):
                raise RecipeError("model.repa_depth with latents: the teacher's image must be the crop the latents "
                                  "were made from; set data.crop=center data.hflip=false (mirrors come from the "
                                  "--flip latents)")
            self.frozen["repa_teacher"] = build_repa_teacher(cfg.repa_teacher, grid=model.cfg.grid, dim=cfg.repa_dim,
                                                             fields=recipe.data.fields, depth=cfg.repa_depth)

    def _latents(self, batch: dict[str, Any], draws: KeyedDraws) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents (B, C, S, S), the matching images for REPA or None); draws the flip pick first
        when the shards hold (image, mirror) latent pairs."""
        image = batch.get("image") if self.cfg.repa_depth else None
        if self.field == "image":
            x = batch["image"].float()
            x = self.frozen["vae"](x) if "vae" in self.frozen else x
            return x, image
        x = batch["latents"].float()
        if x.dim() == 5:  # (B, 2, C, h, w): the image's and its mirror's latents
            pick = draws.integers(x.shape[1])
            x = x[torch.arange(x.shape[0], device=x.device), pick]
            if image is not None:
                image = torch.where(pick.bool()[:, None, None, None], image.flip(-1), image)
        return x, image

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Flow MSE on the decoder's velocity (+ REPA). Draw order per sample: [flip pick], t, noise,
        keep_k, null dropout."""
        device = batch[self.field].device
        draws = KeyedDraws(batch["__key__"], step, self.seed, device)
        x, image = self._latents(batch, draws)
        if self._eval_latents is None:
            self._eval_latents = x[: self.cfg.eval_images].detach().clone()
        flow = self.unwrapped("tokenizer").flow
        t = flow.time_from_normal(draws.normal())
        noise = draws.normal(x.shape[1:])
        keep_k = keyed_keep_k(draws, self.mcfg.num_registers, self.mcfg.nested_dropout, self.mcfg.null_prob)
        out = self.modules["tokenizer"](x, keep_k=keep_k, t=t, noise=noise)
        loss = out.losses["flow"]
        metrics: dict[str, Any] = {"mse": loss.detach(), "keep_k": keep_k.float().mean(),
                                   **{f"fsq_{k}": v for k, v in out.quant.metrics.items()}}
        if image is not None:
            repa = cosine_alignment(out.repa, tokens_on_grid(self.frozen["repa_teacher"](image), self.mcfg.grid))
            loss = loss + self.cfg.repa_weight * repa
            metrics["repa"] = repa.detach()
        return loss, metrics

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, model: FlexTok, x: torch.Tensor, ks: list[int], seed: int) -> list[torch.Tensor]:
        """Decodes of latents ``x`` from their first k tokens for each k in ``ks`` (one shared noise)."""
        was = model.training
        model.eval()
        try:
            ids = model.encode(x)
            gen = torch.Generator(x.device).manual_seed(seed)
            noise = torch.randn(x.shape, generator=gen, device=x.device)
            return [model.decode(ids, num_tokens=k, steps=self.cfg.eval_steps, guidance=self.cfg.eval_guidance,
                                 noise=noise).float() for k in ks]
        finally:
            model.train(was)

    def _image_decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        try:
            return latents_to_images(self.source, torch.device(self._eval_latents.device.type))
        except ImportError:
            return None

    @torch.no_grad()
    def evaluate(self, step: int, run_dir: str) -> dict[str, float]:
        """Per-k latent MSE of the eval rows, and (rank 0) the coarse-to-fine grid
        ``<run_dir>/samples/step_<N>.png``: one row per image, columns input, k = 1, 2, 4, ..., R.
        Every rank decodes the same number of rows and steps (collective under FSDP2 / ZeRO-3)."""
        from vtok.eval.grid import save_grid

        if self._eval_latents is None:
            return {}
        x = self._eval_latents
        ks = powers_of_two(self.mcfg.num_registers)
        start = time.perf_counter()
        with self.gathered("tokenizer") as model:
            recs = self.reconstruct(model, x, ks, seed=step)
        metrics = {f"mse_k{k}": float((r - x.float()).pow(2).mean()) for k, r in zip(ks, recs)}
        metrics["decode_seconds"] = time.perf_counter() - start
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            if self._decoder is None:
                self._decoder = self._image_decoder() or False
                if not self._decoder:
                    log.warning("no coarse-to-fine grids: the VAE (%s) is not there", self.source["vae"])
            if self._decoder:
                cols = torch.stack([x.float(), *recs], 1)  # (n, 1 + len(ks), C, S, S)
                images = self._decoder(cols.flatten(0, 1)).clamp(-1, 1)
                save_grid(images, Path(run_dir) / "samples" / f"step_{step:09d}.png", nrow=1 + len(ks))
        return metrics

    def tokens_per_sample(self) -> int:
        return int(self.mcfg.grid ** 2 + self.mcfg.num_registers)

    def flops_per_sample(self) -> float:
        return 6.0 * self._params * self.tokens_per_sample()  # dense estimate, attention excluded

    @classmethod
    def export_info(cls, cfg: "FlexTokTask.Config", recipe) -> dict[str, Any]:
        """The source, and what maps decoded latents back to images: the VAE dir ("identity": the
        latents are pixels) and its factors (image = VAE.decode(latents / scaling + shift))."""
        source = find_source(recipe, cfg)
        return {"arch": cfg.arch, "source": source["source"], "vae": source["vae"],
                "latent_scaling": source["latent_scaling"], "latent_shift": source["latent_shift"],
                "latent_shape": [source["channels"], source["size"], source["size"]]}
