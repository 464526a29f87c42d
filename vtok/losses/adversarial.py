"""The adversarial half of a tokenizer task, with a pluggable discriminator.

A tokenizer task owns one ``Adversarial``: it builds the discriminator named by ``AdversarialConfig.disc``
(a ``DISCRIMINATORS`` entry: "patchgan" or "stylegan"), adds the generator's GAN term to the
reconstruction objective, remembers this step's reconstructions per micro-batch and computes the
discriminator phase's loss on them::

    adv = Adversarial(cfg, start_step)                 # adv.discriminator: the module to train
    g, metrics = adv.generator_term(disc, rec, step, rec_loss=rec, last_layer=w)
    adv.remember(x, rec, step)                         # the discriminator phase reuses it
    d, metrics = adv.discriminator_loss(disc, x, regenerate=lambda: model(x).reconstruction)

``disc`` is the (possibly wrapped) module the task calls; ``adv.discriminator`` is the raw one.
With ``r1_weight`` > 0 the discriminator loss adds StyleGAN2's R1 penalty on the real images,
``r1_weight / 2 * E||grad_x D(x)||^2`` (``r1_weight`` is StyleGAN2's gamma; metrics["r1"] is the
expectation without the factor). The reals' forward then goes through
``vtok.parallel.strategy.for_double_backward(disc)``: the penalty's gradient is taken w.r.t. the
inputs only and the penalty joins the loss that the strategy backpropagates, which FSDP2 (gathered
parameters kept through the first backward) and DeepSpeed (the engine's module, no early reduction
epilogue) need.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vtok.config import RecipeError
from vtok.losses.gan import (LeCAM, PatchGANDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss,
                             non_saturating_d_loss, non_saturating_g_loss)
from vtok.losses.stylegan_disc import StyleGANDiscriminator, r1_from_logits
from vtok.parallel.strategy import for_double_backward

GAN_LOSSES: dict[str, tuple[Callable, Callable]] = {
    "hinge": (hinge_d_loss, hinge_g_loss),
    "non_saturating": (non_saturating_d_loss, non_saturating_g_loss),
}
DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {}


def register_discriminator(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``build(ndf, n_layers) -> nn.Module`` (images (B, 3, H, W) -> logits) as ``name``."""
    def deco(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        DISCRIMINATORS[name] = build
        return build
    return deco


@register_discriminator("patchgan")
def _patchgan(ndf: int, n_layers: int) -> nn.Module:
    return PatchGANDiscriminator(ndf, n_layers)


@register_discriminator("stylegan")
def _stylegan(ndf: int, n_layers: int) -> nn.Module:
    """StyleGAN2's residual discriminator: ``n_layers`` downsampling blocks, so images of
    4 * 2 ** n_layers px (TexTok at 256 px: ndf 128, layers 6), channels ndf x [1, 2, 4, 4, 4, 4]."""
    return StyleGANDiscriminator(ndf, n_layers)


@dataclass
class AdversarialConfig:
    disc: str = "patchgan"  # a DISCRIMINATORS name
    loss: str = "hinge"  # "hinge" | "non_saturating"
    weight: float = 0.5  # of the generator's GAN term
    adaptive: bool = False  # VQGAN's balance by last-layer gradient norms
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    ndf: int = 64  # channel base
    layers: int = 3  # PatchGAN: conv layers; StyleGAN: downsampling blocks (log2(resolution / 4))
    r1_weight: float = 0.0  # StyleGAN2's gamma: D loss += gamma / 2 * E||grad_x D(real)||^2; 0 = off


class Discriminator(nn.Module):
    """A registered discriminator + the LeCAM EMAs (buffers, so they checkpoint with it)."""

    def __init__(self, cfg: AdversarialConfig):
        super().__init__()
        if cfg.disc not in DISCRIMINATORS:
            close = difflib.get_close_matches(cfg.disc, list(DISCRIMINATORS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"discriminator {cfg.disc!r} is not registered{hint}; known: "
                              f"{', '.join(sorted(DISCRIMINATORS))}")
        self.net = DISCRIMINATORS[cfg.disc](cfg.ndf, cfg.layers)
        self.lecam = LeCAM(cfg.lecam_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Adversarial:
    """See the module docstring. ``start_step``: the first step with a GAN term (and a D phase)."""

    def __init__(self, cfg: AdversarialConfig, start_step: int = 0):
        if cfg.loss not in GAN_LOSSES:
            raise RecipeError(f"GAN loss {cfg.loss!r}: expected one of {', '.join(GAN_LOSSES)}")
        self.cfg, self.start_step = cfg, start_step
        self.discriminator = Discriminator(cfg)
        self.d_loss, self.g_loss = GAN_LOSSES[cfg.loss]
        self._fakes: dict[int, torch.Tensor] = {}  # this step's reconstructions, by micro-batch
        self._fakes_step = -1

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def generator_term(self, disc: nn.Module, fake: torch.Tensor, step: int, *,
                       rec_loss: torch.Tensor | None = None, last_layer: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Weighted GAN loss of the generator on ``fake`` (0 before ``start_step``) and its metrics."""
        if not self.active(step) or self.cfg.weight <= 0:
            return fake.new_zeros(()), {}
        g = self.g_loss(disc(fake))
        weight: float | torch.Tensor = self.cfg.weight
        if self.cfg.adaptive:
            if rec_loss is None or last_layer is None:
                raise ValueError("adaptive GAN weight needs rec_loss and last_layer")
            weight = weight * adaptive_weight(rec_loss, g, last_layer)
        return weight * g, {"gan_g": g.detach()}

    def remember(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> None:
        """Keep ``fake`` (detached) for the discriminator phase of this step's micro-batch ``real``."""
        if not self.active(step):
            return
        if step != self._fakes_step:
            self._fakes, self._fakes_step = {}, step
        self._fakes[id(real)] = fake.detach()

    def discriminator_loss(self, disc: nn.Module, real: torch.Tensor,
                           regenerate: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The D loss on ``real`` and the remembered fake (``regenerate()`` without grad when none)."""
        fake = self._fakes.pop(id(real), None)
        if fake is None:  # not remembered (e.g. the generator phase was skipped): recompute
            with torch.no_grad():
                fake = regenerate()
        r1 = self.cfg.r1_weight > 0
        real_in = real.detach().requires_grad_(True) if r1 else real
        real_logits = (for_double_backward(disc) if r1 else disc)(real_in)
        fake_logits = disc(fake.detach())
        loss = self.d_loss(real_logits, fake_logits)
        metrics = {"logits_real": real_logits.detach().mean(), "logits_fake": fake_logits.detach().mean()}
        if r1:  # one forward on the reals serves the loss and the penalty
            penalty = r1_from_logits(real_logits, real_in)
            loss = loss + 0.5 * self.cfg.r1_weight * penalty
            metrics["r1"] = penalty.detach()
        if self.cfg.lecam_weight > 0:
            reg = self.discriminator.lecam(real_logits, fake_logits)
            loss = loss + self.cfg.lecam_weight * reg
            metrics["lecam"] = reg.detach()
        return loss, metrics


__all__ = ["Adversarial", "AdversarialConfig", "DISCRIMINATORS", "Discriminator", "GAN_LOSSES",
           "register_discriminator"]
