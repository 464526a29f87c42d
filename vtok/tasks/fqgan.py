"""FQGAN / VQGAN tokenizer training: a generator phase and a discriminator phase.

Generator objective (FQGAN, PAPERS.md): l2 (or l1) reconstruction + LPIPS x ``perceptual_weight``
+ quantizer losses (codebook, commitment 0.25, entropy 0.03, disentanglement 0.1) + alignment
InfoNCE x ``align_weight`` per feature-prediction head + hinge GAN x ``gan_weight`` once the
discriminator has started (``train.optim.discriminator.start_step``, 20k in the paper).
Discriminator objective: hinge (+ LeCAM x ``lecam_weight``) on real images and the generator's
reconstructions of the same micro-batch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtok.config import RecipeError
from vtok.eval.metrics import psnr
from vtok.losses import LPIPS, LeCAM, PatchGANDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from vtok.models.registry import MODELS, build_model
from vtok.models.tokenizers.fqgan import alignment_loss
from vtok.train.task import TrainTask, register_task

log = logging.getLogger("vtok.train")


@dataclass
class TeacherSpec:
    """A frozen teacher for one codebook's feature-prediction head."""

    codebook: int = 1
    kind: str = "clip"  # "clip" (open_clip) or "dinov2" (timm)
    model: str = "ViT-L-14"  # open_clip model name, or timm name such as vit_small_patch14_dinov2
    weights: str = ""  # local weights file (no hub access at run time)
    tag: str = ""  # clip only: the open_clip pretrained tag of the file (mean/std, QuickGELU), e.g. "openai"
    feature: str = "cls"  # clip only: "cls" (pre-projection, FQGAN's target) or "embedding"


class Discriminator(nn.Module):
    """PatchGAN + the LeCAM EMAs (buffers, so they checkpoint with the discriminator)."""

    def __init__(self, ndf: int, n_layers: int, lecam_decay: float):
        super().__init__()
        self.net = PatchGANDiscriminator(ndf, n_layers)
        self.lecam = LeCAM(lecam_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_teacher(spec: TeacherSpec) -> nn.Module:
    from vtok.models import teachers

    if spec.kind == "clip":
        return teachers.load_clip_teacher(spec.model, spec.weights, pretrained_tag=spec.tag or None,
                                          feature=spec.feature)
    if spec.kind == "dinov2":
        return teachers.load_dinov2_teacher(spec.model, spec.weights)
    raise RecipeError(f"model.teachers: kind={spec.kind!r} is not 'clip' or 'dinov2'")


@register_task("fqgan")
class FQGANTask(TrainTask):
    @dataclass
    class Config:
        arch: str = "fqgan-dual-f16"  # a vtok.models.registry name
        rec_loss: str = "l2"  # "l2" | "l1"
        perceptual_weight: float = 1.0
        lpips_vgg_weights: str = ""  # torchvision vgg16 checkpoint; required when perceptual_weight > 0
        gan_weight: float = 0.5
        adaptive_gan_weight: bool = False
        lecam_weight: float = 0.0
        lecam_decay: float = 0.999
        disc_ndf: int = 64
        disc_layers: int = 3
        align_weight: float = 0.5
        teachers: list[TeacherSpec] = field(default_factory=list)  # empty: no alignment heads

    def __init__(self, cfg: "FQGANTask.Config", recipe):
        if cfg.arch not in MODELS:
            raise RecipeError(f"model.arch={cfg.arch!r} is not registered; known: {', '.join(MODELS)}")
        if cfg.rec_loss not in ("l1", "l2"):
            raise RecipeError(f"model.rec_loss={cfg.rec_loss!r} is not 'l1' or 'l2'")
        self.cfg = cfg
        teachers = {t.codebook: build_teacher(t) for t in cfg.teachers}
        tokenizer = build_model(cfg.arch) if teachers else build_model(cfg.arch, align={})
        heads = {int(i): h for i, h in tokenizer.align_heads.items()}
        if set(heads) != set(teachers):
            raise RecipeError(f"model.teachers cover codebooks {sorted(teachers)} but {cfg.arch} predicts "
                              f"features for codebooks {sorted(heads)}; give one teacher per head")
        for i, teacher in teachers.items():
            width = tokenizer.cfg.align[i]
            if teacher.feature_dim != width:
                raise RecipeError(f"teacher for codebook {i} gives {teacher.feature_dim}-d features but "
                                  f"{cfg.arch}'s head predicts {width}-d; pick the matching teacher model")
        self.modules = {"tokenizer": tokenizer,
                        "disc": Discriminator(cfg.disc_ndf, cfg.disc_layers, cfg.lecam_decay)}
        self.optimizers = {"generator": ["tokenizer"], "discriminator": ["disc"]}
        self.ema_modules = ("tokenizer",)
        self.frozen = {f"teacher{i}": t for i, t in teachers.items()}
        if cfg.perceptual_weight > 0:
            self.frozen["lpips"] = LPIPS(cfg.lpips_vgg_weights) if cfg.lpips_vgg_weights else None
            if self.frozen["lpips"] is None:
                raise RecipeError("model.perceptual_weight > 0 needs model.lpips_vgg_weights (a local "
                                  "torchvision vgg16 checkpoint); or set model.perceptual_weight=0")
        d_cfg = recipe.train.optim.get("discriminator")
        self.gan_start = d_cfg.start_step if d_cfg is not None else 0
        self._fakes: dict[int, torch.Tensor] = {}  # this step's reconstructions, by micro-batch
        self._fakes_step = -1

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"]
        return self.generator_loss(x, step) if phase == "generator" else self.discriminator_loss(x)

    def generator_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        out = self.modules["tokenizer"](x)
        rec_img = out.reconstruction
        rec = F.mse_loss(rec_img, x) if cfg.rec_loss == "l2" else F.l1_loss(rec_img, x)
        total = rec + sum(out.quant.losses.values())
        metrics: dict[str, Any] = {"rec": rec.detach(), "psnr": psnr(rec_img, x).mean(),
                                   **{k: v.detach() for k, v in out.quant.losses.items()},
                                   **out.quant.metrics}
        if "lpips" in self.frozen:
            p = self.frozen["lpips"](rec_img, x).mean()
            total = total + cfg.perceptual_weight * p
            metrics["lpips"] = p.detach()
        for i, pred in out.aligned.items():
            a = alignment_loss(pred, self.frozen[f"teacher{i}"](x))
            total = total + cfg.align_weight * a / len(out.aligned)
            metrics[f"align_{i}"] = a.detach()
        if step >= self.gan_start and cfg.gan_weight > 0:
            g = hinge_g_loss(self.modules["disc"](rec_img))
            weight = cfg.gan_weight
            if cfg.adaptive_gan_weight:
                last = self._tokenizer().decoder.conv_out.weight
                weight = weight * adaptive_weight(rec, g, last)
            total = total + weight * g
            metrics["gan_g"] = g.detach()
        if step >= self.gan_start:  # the discriminator phase of this step will use it
            if step != self._fakes_step:
                self._fakes, self._fakes_step = {}, step
            self._fakes[id(x)] = rec_img.detach()
        return total, metrics

    def discriminator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        fake = self._fakes.pop(id(x), None)
        if fake is None:  # not cached (e.g. the generator phase was skipped): recompute
            with torch.no_grad():
                fake = self.modules["tokenizer"](x).reconstruction
        disc = self.modules["disc"]
        real_logits, fake_logits = disc(x), disc(fake)
        loss = hinge_d_loss(real_logits, fake_logits)
        metrics = {"logits_real": real_logits.detach().mean(), "logits_fake": fake_logits.detach().mean()}
        if self.cfg.lecam_weight > 0:
            inner = getattr(disc, "module", disc)
            reg = inner.lecam(real_logits, fake_logits)
            loss = loss + self.cfg.lecam_weight * reg
            metrics["lecam"] = reg.detach()
        return loss, metrics

    def _tokenizer(self) -> nn.Module:
        """The tokenizer without a DDP wrapper (for its attributes, not for forward)."""
        return getattr(self.modules["tokenizer"], "module", self.modules["tokenizer"])

    def tokens_per_sample(self) -> int:
        return math.prod(self._tokenizer().token_shape)

    def export_config(self) -> dict[str, Any]:
        tok = self._tokenizer()
        return {"arch": self.cfg.arch, "token_shape": list(tok.token_shape),
                "vocab_sizes": list(tok.vocab_sizes)}
