"""TexTok tokenizer training (``train.task: textok``): images + their captions' T5 embeddings ->
N continuous tokens (N x 8) -> images, with a generator phase and a discriminator phase.

Data: image shards that carry ``text_emb`` (L, D) / ``text_mask`` (L,) (``vtok precompute text-emb``);
the model's text width and length are read from the ``text-emb.json`` beside the shards (or
``model.text_meta``), the reader the dit task uses. The **no-text baseline** is the same task and the
same class with text off: a ``-notext`` arch, or ``model.text: false`` (``text_dim=0``), reading only
``image``.

Generator objective (TexTok, shared/PAPERS.md): l2 + LPIPS x 0.1 + GAN x 0.1 (non-saturating, StyleGAN
discriminator) once the discriminator has started (``train.optim.discriminator.start_step``, 80k in
the paper). Discriminator objective: non-saturating + R1 (gamma 10) on the reals + LeCAM x 1e-4.
The loss weights, R1 and LeCAM come from an unofficial transcription of the paper (unverified).
Shared with the fqgan task: ``adversarial_from_recipe`` / ``build_lpips`` / ``reconstruction_loss``
(``vtok.tasks.fqgan``) and the adversarial helper ``vtok.losses.adversarial``.

``evaluate`` (every ``train.eval_every``): the first ``model.eval_images`` samples (and captions) of
the first batch this rank trained on are reconstructed with the live weights; ``eval/psnr`` and, on
rank 0, a grid ``<run_dir>/samples/step_N.png`` (rows: input, reconstruction).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vtok.config import RecipeError
from vtok.eval.metrics import psnr
from vtok.losses.adversarial import AdversarialConfig
from vtok.models.api import Condition
from vtok.models.registry import MODELS, build_model
from vtok.models.tokenizers.textok import TexTok
from vtok.precompute.text_emb import save_random_t5  # re-exported: the smoke recipes' data command
from vtok.tasks.conditions import ConditionSource
from vtok.tasks.dit import text_encoder_info, text_shape
from vtok.tasks.fqgan import adversarial_from_recipe, build_lpips, reconstruction_loss
from vtok.train.task import TrainTask, register_task

log = logging.getLogger("vtok.train")
TEXT_FIELDS = ("text_emb", "text_mask")


def textok_gan() -> AdversarialConfig:
    """TexTok's GAN settings (shared/PAPERS.md; unverified transcription): StyleGAN discriminator
    (base 128 channels), non-saturating loss x 0.1, R1 gamma 10, LeCAM 1e-4. ``layers`` 0: sized
    from ``data.resolution`` (log2(resolution / 4) blocks: 6 at 256 px)."""
    return AdversarialConfig(disc="stylegan", loss="non_saturating", weight=0.1, ndf=128, layers=0,
                             r1_weight=10.0, lecam_weight=1e-4)


def gan_for_resolution(gan: AdversarialConfig, resolution: int) -> AdversarialConfig:
    """``gan`` with ``layers`` 0 resolved for ``resolution`` px images (StyleGAN: 4 * 2 ** layers)."""
    if gan.layers:
        return gan
    blocks = math.log2(resolution / 4) if resolution >= 8 else 0.0
    if gan.disc != "stylegan" or blocks != int(blocks) or blocks < 1:
        raise RecipeError(f"model.gan.layers=0 sizes a StyleGAN discriminator for 4 * 2^n px images, not "
                          f"{gan.disc!r} at data.resolution={resolution}; set model.gan.layers")
    return replace(gan, layers=int(blocks))


@register_task("textok")
class TexTokTask(TrainTask):
    export_module = "tokenizer"

    @dataclass
    class Config:
        arch: str = "textok-b-256-n128"  # a TexTok in vtok.models.registry (textok-*; -notext: the baseline)
        text: bool = True  # false: the arch's no-text baseline (text_dim=0), reading only `image`
        text_meta: str = ""  # text-emb.json of the shards (default: beside data.train_shards)
        # size overrides of the arch (0 = the registry's); tiny recipes use them
        num_tokens: int = 0
        token_dim: int = 0
        width: int = 0
        depth: int = 0
        heads: int = 0
        patch_size: int = 0
        rec_loss: str = "l2"  # "l2" | "l1"
        perceptual_weight: float = 0.1
        lpips_vgg_weights: str = ""  # torchvision vgg16 checkpoint; required when perceptual_weight > 0
        gan: AdversarialConfig = field(default_factory=textok_gan)
        eval_images: int = 8  # rows of the eval grid (per rank, from the first batch it trained on)

    @staticmethod
    def uses_text(cfg: "TexTokTask.Config") -> bool:
        """Whether the model reads captions: a text arch with ``model.text`` on."""
        entry = MODELS.get(cfg.arch)
        return bool(cfg.text and entry is not None and getattr(entry.config, "text_dim", 0) > 0)

    @classmethod
    def build_export(cls, cfg: "TexTokTask.Config", recipe) -> TexTok:
        """The TexTok at ``data.resolution``, its text width / length from the shards' text-emb.json
        (text models) or without text (the baseline)."""
        if cfg.arch not in MODELS or MODELS[cfg.arch].model is not TexTok:
            known = ", ".join(n for n, e in MODELS.items() if e.model is TexTok)
            raise RecipeError(f"model.arch={cfg.arch!r} is not a registered TexTok; known: {known}")
        over: dict[str, Any] = {"image_size": int(recipe.data.resolution)}
        for name in ("num_tokens", "token_dim", "width", "depth", "heads", "patch_size"):
            if getattr(cfg, name):
                over[name] = getattr(cfg, name)
        if cls.uses_text(cfg):
            missing = [f for f in TEXT_FIELDS if f not in recipe.data.fields]
            if missing:
                raise RecipeError(f"{cfg.arch} reads captions: add {missing} to data.fields (vtok precompute "
                                  "text-emb writes them), or train the no-text baseline (model.text=false)")
            over["text_len"], over["text_dim"] = text_shape(recipe, cfg.text_meta)
        else:
            over["text_dim"] = 0
        try:
            return build_model(cfg.arch, **over)
        except ValueError as e:  # TexTokConfig checks
            raise RecipeError(f"model: {e}") from None

    def __init__(self, cfg: "TexTokTask.Config", recipe):
        if cfg.rec_loss not in ("l1", "l2"):
            raise RecipeError(f"model.rec_loss={cfg.rec_loss!r} is not 'l1' or 'l2'")
        if "image" not in recipe.data.fields:
            raise RecipeError(f"data.fields={list(recipe.data.fields)}: the textok task reads `image`; add it")
        self.cfg = replace(cfg, gan=gan_for_resolution(cfg.gan, int(recipe.data.resolution)))
        tokenizer = self.build_export(cfg, recipe)
        self.text = self.uses_text(cfg)
        self.adversarial = adversarial_from_recipe(self.cfg.gan, recipe)
        self.modules = {"tokenizer": tokenizer, "disc": self.adversarial.discriminator}
        self.optimizers = {"generator": ["tokenizer"], "discriminator": ["disc"]}
        self.ema_modules = ("tokenizer",)
        self.frozen = build_lpips(cfg.perceptual_weight, cfg.lpips_vgg_weights)
        self.conditions = ConditionSource("text", 0, cfg.eval_images, 1) if self.text else None
        self._eval_images: torch.Tensor | None = None
        mcfg = tokenizer.cfg
        self._seq = mcfg.grid ** 2 + mcfg.num_tokens + (mcfg.text_len if self.text else 0)
        self._params = sum(p.numel() for p in tokenizer.parameters())

    def condition(self, batch: dict[str, Any]) -> Condition | None:
        """The batch's captions as Condition(text (B, L, D), text_mask (B, L)); None without text."""
        if self.conditions is None:
            return None
        missing = [f for f in TEXT_FIELDS if f not in batch]
        if missing:
            raise RecipeError(f"the batch has no {missing}: add them to data.fields and point data.train_shards "
                              "at the output of `vtok precompute text-emb`")
        return self.conditions.from_batch(batch)

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"]  # the same tensor in both phases: the adversarial helper keys fakes by it
        cond = self.condition(batch)
        if phase == "generator":
            return self.generator_loss(x, cond, step)
        return self.adversarial.discriminator_loss(self.modules["disc"], x,
                                                   lambda: self.modules["tokenizer"](x, cond).reconstruction)

    def generator_loss(self, x: torch.Tensor, cond: Condition | None, step: int
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
        """l2 + LPIPS + GAN on images x (B, 3, S, S) and their captions ``cond``."""
        if self._eval_images is None:
            self._eval_images = x[: self.cfg.eval_images].detach().clone()
        out = self.modules["tokenizer"](x, cond)
        rec_img = out.reconstruction
        rec, total, metrics = reconstruction_loss(rec_img, x, self.cfg.rec_loss, self.frozen.get("lpips"),
                                                  self.cfg.perceptual_weight)
        metrics["token_std"] = out.tokens.detach().float().std()
        last = self.unwrapped("tokenizer").decoder.head.weight if self.cfg.gan.adaptive else None
        g, g_metrics = self.adversarial.generator_term(self.modules["disc"], rec_img, step, rec_loss=rec,
                                                       last_layer=last)
        self.adversarial.remember(x, rec_img, step)
        return total + g, {**metrics, **g_metrics}

    @torch.no_grad()
    def evaluate(self, step: int, run_dir: str) -> dict[str, float]:
        """``psnr`` of the eval rows' reconstructions (live weights, gathered: every rank in
        lockstep) and, on rank 0, the grid ``<run_dir>/samples/step_<N>.png``."""
        from vtok.eval.grid import save_grid

        if self._eval_images is None:
            return {}
        x = self._eval_images
        cond = self.conditions.for_grid(x.device) if self.conditions is not None else None
        with self.gathered("tokenizer") as model:
            was = model.training
            model.eval()
            try:
                rec = model.decode(model.encode(x, cond), cond).float().clamp(-1, 1)
            finally:
                model.train(was)
        metrics = {"psnr": float(psnr(rec, x.float()).mean())}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            save_grid(torch.cat([x.float(), rec]), Path(run_dir) / "samples" / f"step_{step:09d}.png",
                      nrow=x.shape[0])
        return metrics

    def tokens_per_sample(self) -> int:
        return int(self.unwrapped("tokenizer").cfg.num_tokens)

    def flops_per_sample(self) -> float:
        """Dense estimate: each side's parameters see one sequence of patches + tokens (+ text)."""
        return 6.0 * self._params * self._seq

    @classmethod
    def export_info(cls, cfg: "TexTokTask.Config", recipe) -> dict[str, Any]:
        """The arch and, for text models, the T5 the captions were encoded with (text-emb.json)."""
        info: dict[str, Any] = {"arch": cfg.arch, "text": cls.uses_text(cfg)}
        if cls.uses_text(cfg):
            info.update(text_encoder_info(recipe, cfg.text_meta))
        return info


__all__ = ["TexTokTask", "gan_for_resolution", "save_random_t5", "textok_gan"]
