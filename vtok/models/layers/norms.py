"""Normalisation layers shared by the transformer models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in fp32: (..., D) -> (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (cast back after): (..., D) -> (..., D).
    ``elementwise_affine=False`` gives the affine-free norm of FlexTok's blocks (and their QK-norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


NORMS = ("layer", "rms", "layer_fp32")


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``"layer"`` (LayerNorm with bias), ``"rms"`` (RMSNorm) or ``"layer_fp32"`` (affine-free
    LayerNorm computed in fp32: no parameters)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer_fp32":
        return FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
    raise ValueError(f"norm {kind!r} is not one of {', '.join(NORMS)}")
