"""FQGAN / VQGAN tokenizer training: a generator phase and a discriminator phase.

Generator objective (FQGAN, PAPERS.md): l2 (or l1) reconstruction + LPIPS x ``perceptual_weight``
+ quantizer losses (codebook, commitment 0.25, entropy 0.03, disentanglement 0.1) + alignment
InfoNCE x ``align_weight`` per feature-prediction head + the GAN term (``model.gan``, hinge x 0.5)
once the discriminator has started (``train.optim.discriminator.start_step``, 20k in the paper).
Discriminator objective: hinge (+ LeCAM x ``gan.lecam_weight``) on real images and the generator's
reconstructions of the same micro-batch. Shared pieces: ``vtok.losses.adversarial`` (discriminator
registry, GAN terms), ``vtok.losses.alignment``, ``vtok.models.pretrained`` (frozen teachers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtok.config import RecipeError
from vtok.eval.metrics import psnr
from vtok.losses import LPIPS
from vtok.losses.adversarial import Adversarial, AdversarialConfig
from vtok.losses.alignment import infonce_alignment
from vtok.models.pretrained import PretrainedSpec, build_pretrained
from vtok.models.registry import MODELS, build_model
from vtok.train.task import TrainTask, register_task

log = logging.getLogger("vtok.train")


def adversarial_from_recipe(cfg: AdversarialConfig, recipe) -> Adversarial:
    """The task's ``Adversarial``, its GAN term starting at ``train.optim.discriminator.start_step``
    (0 when the recipe has no discriminator optimizer). Shared by the GAN tokenizer tasks."""
    d_cfg = recipe.train.optim.get("discriminator")
    return Adversarial(cfg, d_cfg.start_step if d_cfg is not None else 0)


def build_lpips(weight: float, vgg_weights: str) -> dict[str, nn.Module]:
    """``{"lpips": LPIPS}`` for the task's ``frozen`` when ``weight`` > 0, else {}; a one-line
    RecipeError when the local VGG16 checkpoint is not given."""
    if weight <= 0:
        return {}
    if not vgg_weights:
        raise RecipeError("model.perceptual_weight > 0 needs model.lpips_vgg_weights (a local "
                          "torchvision vgg16 checkpoint); or set model.perceptual_weight=0")
    return {"lpips": LPIPS(vgg_weights)}


def reconstruction_loss(rec_img: torch.Tensor, x: torch.Tensor, kind: str, lpips: nn.Module | None,
                        perceptual_weight: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(rec, rec + perceptual_weight * LPIPS, metrics) of reconstructions (B, 3, H, W) against
    images x: ``kind`` "l2" (MSE) or "l1"; metrics ``rec``, ``psnr`` and (with ``lpips``) ``lpips``."""
    rec = F.mse_loss(rec_img, x) if kind == "l2" else F.l1_loss(rec_img, x)
    metrics: dict[str, Any] = {"rec": rec.detach(), "psnr": psnr(rec_img, x).mean()}
    total = rec
    if lpips is not None:
        p = lpips(rec_img, x).mean()
        total = total + perceptual_weight * p
        metrics["lpips"] = p.detach()
    return rec, total, metrics


@dataclass
class TeacherSpec(PretrainedSpec):
    """A frozen teacher (``vtok.models.pretrained``) for one codebook's feature-prediction head."""

    codebook: int = 1


@register_task("fqgan")
class FQGANTask(TrainTask):
    export_module = "tokenizer"

    @dataclass
    class Config:
        arch: str = "fqgan-dual-f16"  # a tokenizer in vtok.models.registry
        rec_loss: str = "l2"  # "l2" | "l1"
        perceptual_weight: float = 1.0
        lpips_vgg_weights: str = ""  # torchvision vgg16 checkpoint; required when perceptual_weight > 0
        gan: AdversarialConfig = field(default_factory=AdversarialConfig)
        align_weight: float = 0.5
        teachers: list[TeacherSpec] = field(default_factory=list)  # empty: no alignment heads

    @classmethod
    def build_export(cls, cfg: "FQGANTask.Config", recipe) -> nn.Module:
        """The tokenizer alone (what ``vtok export`` writes), sized for ``data.resolution``."""
        if cfg.arch not in MODELS or MODELS[cfg.arch].kind != "tokenizer":
            known = ", ".join(n for n, e in MODELS.items() if e.kind == "tokenizer")
            raise RecipeError(f"model.arch={cfg.arch!r} is not a registered tokenizer; known: {known}")
        over: dict[str, Any] = {"image_size": recipe.data.resolution}
        if not cfg.teachers:
            over["align"] = {}
        return build_model(cfg.arch, **over)

    def __init__(self, cfg: "FQGANTask.Config", recipe):
        if cfg.rec_loss not in ("l1", "l2"):
            raise RecipeError(f"model.rec_loss={cfg.rec_loss!r} is not 'l1' or 'l2'")
        self.cfg = cfg
        for t in cfg.teachers:
            if t.feature == "tokens":
                raise RecipeError(f"model.teachers[codebook={t.codebook}]: feature=tokens gives per-patch "
                                  "features; FQGAN aligns global ones: use feature=cls or embedding")
        teachers = {t.codebook: build_pretrained(t) for t in cfg.teachers}  # first: a missing file fails fast
        tokenizer = self.build_export(cfg, recipe)
        heads = {int(i) for i in tokenizer.align_heads}
        if heads != set(teachers):
            raise RecipeError(f"model.teachers cover codebooks {sorted(teachers)} but {cfg.arch} predicts "
                              f"features for codebooks {sorted(heads)}; give one teacher per head")
        for i, teacher in teachers.items():
            width = tokenizer.cfg.align[i]
            if teacher.feature_dim != width:
                raise RecipeError(f"teacher for codebook {i} gives {teacher.feature_dim}-d features but "
                                  f"{cfg.arch}'s head predicts {width}-d; pick the matching teacher model")
        self.adversarial = adversarial_from_recipe(cfg.gan, recipe)
        self.modules = {"tokenizer": tokenizer, "disc": self.adversarial.discriminator}
        self.optimizers = {"generator": ["tokenizer"], "discriminator": ["disc"]}
        self.ema_modules = ("tokenizer",)
        self.frozen = {f"teacher{i}": t for i, t in teachers.items()}
        self.frozen.update(build_lpips(cfg.perceptual_weight, cfg.lpips_vgg_weights))

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"]
        if phase == "generator":
            return self.generator_loss(x, step)
        return self.adversarial.discriminator_loss(self.modules["disc"], x,
                                                   lambda: self.modules["tokenizer"](x).reconstruction)

    def generator_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        out = self.modules["tokenizer"](x)
        rec_img = out.reconstruction
        rec, total, metrics = reconstruction_loss(rec_img, x, cfg.rec_loss, self.frozen.get("lpips"),
                                                  cfg.perceptual_weight)
        total = total + sum(out.quant.losses.values())
        metrics.update({k: v.detach() for k, v in out.quant.losses.items()}, **out.quant.metrics)
        for i, pred in out.aligned.items():
            a = infonce_alignment(pred, self.frozen[f"teacher{i}"](x))
            total = total + cfg.align_weight * a / len(out.aligned)
            metrics[f"align_{i}"] = a.detach()
        last = self.unwrapped("tokenizer").decoder.conv_out.weight if cfg.gan.adaptive else None
        g, g_metrics = self.adversarial.generator_term(self.modules["disc"], rec_img, step, rec_loss=rec,
                                                       last_layer=last)
        self.adversarial.remember(x, rec_img, step)
        return total + g, {**metrics, **g_metrics}

    def tokens_per_sample(self) -> int:
        return self.unwrapped("tokenizer").token_spec.num_tokens

    @classmethod
    def export_info(cls, cfg: "FQGANTask.Config", recipe) -> dict[str, Any]:
        return {"arch": cfg.arch}
