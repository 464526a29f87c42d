"""Losses: each returns tensors and never logs (the trainer logs)."""
from vtok.losses.gan import LeCAM, PatchGANDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from vtok.losses.perceptual import LPIPS

__all__ = ["LPIPS", "LeCAM", "PatchGANDiscriminator", "adaptive_weight", "hinge_d_loss", "hinge_g_loss"]
