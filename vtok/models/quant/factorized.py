"""Factorized quantizer (FQGAN): k independent sub-codebooks, one per factor head.

Each head's features z_i (B, D, H, W) are quantized by its own l2-normalised VQ; the codes are
concatenated on the channel axis for the decoder, and a disentanglement regulariser pushes the
sub-codes of one position to be orthogonal (FQGAN: 0.1 x mean over positions of cos(q_i, q_j)^2,
averaged over the pairs when k = 3). The per-head adapters that produce z_i belong to the tokenizer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.quant.base import QuantizerOutput, full_precision
from vtok.models.quant.vq import L2VectorQuantizer


def disentanglement_loss(codes: list[torch.Tensor]) -> torch.Tensor:
    """Mean over positions and code pairs of cos(q_i, q_j)^2; codes: k tensors (B, D, H, W)."""
    pairs = list(itertools.combinations(codes, 2))
    if not pairs:
        return codes[0].new_zeros(())
    terms = [F.cosine_similarity(a, b, dim=1).pow(2).mean() for a, b in pairs]
    return torch.stack(terms).mean()


class FactorizedQuantizer(nn.Module):
    """[z_1 .. z_k], each (B, D, H, W) -> QuantizerOutput(quantized (B, k*D, H, W), indices (B, k, H, W))."""

    @dataclass
    class Config:
        num_codebooks: int = 2
        vq: L2VectorQuantizer.Config = field(default_factory=L2VectorQuantizer.Config)
        disentangle_weight: float = 0.1

    def __init__(self, cfg: "FactorizedQuantizer.Config"):
        super().__init__()
        self.cfg = cfg
        self.quantizers = nn.ModuleList(L2VectorQuantizer(cfg.vq) for _ in range(cfg.num_codebooks))

    def forward(self, zs: list[torch.Tensor]) -> QuantizerOutput:
        if len(zs) != len(self.quantizers):
            raise ValueError(f"expected {len(self.quantizers)} factor features, got {len(zs)}")
        outs = [q(z) for q, z in zip(self.quantizers, zs)]
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for i, out in enumerate(outs):
            for k, v in out.losses.items():  # summed over heads, as each head's VQ loss counts fully
                losses[k] = losses.get(k, 0.0) + v
            metrics.update({f"{k}_{i}": v for k, v in out.metrics.items()})
        if self.cfg.disentangle_weight > 0 and len(outs) > 1:
            with full_precision(zs[0]):
                losses["disentangle"] = self.cfg.disentangle_weight * disentanglement_loss(
                    [o.quantized.float() for o in outs])
        quantized = torch.cat([o.quantized for o in outs], dim=1)
        indices = torch.stack([o.indices for o in outs], dim=1)
        return QuantizerOutput(quantized, indices, losses, metrics)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, k, H, W) -> concatenated unit-norm codes (B, k*D, H, W)."""
        return torch.cat([q.lookup(indices[:, i]) for i, q in enumerate(self.quantizers)], dim=1)
