"""l2-normalised vector quantizer (LlamaGen / FQGAN sub-codebook: 16,384 x 8, beta 0.25, entropy 0.03).

Inputs and codes are projected onto the unit sphere, so nearest-neighbour search is a max inner
product and every code is used at the same scale. Quantization runs in fp32 even under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.quant.base import QuantizerOutput, code_usage, full_precision


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or kept in float64 (the quantizer never runs below fp32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy minus the entropy of the batch-averaged code distribution.

    logits: (N, K) similarities / temperature. Minimising it makes each vector confident about one
    code (low per-sample entropy) while the batch spreads over many codes (high average entropy).
    """
    probs = logits.softmax(-1)
    sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    return sample_entropy - avg_entropy


class L2VectorQuantizer(nn.Module):
    """z: (B, D, H, W) -> QuantizerOutput(quantized (B, D, H, W), indices (B, H, W))."""

    @dataclass
    class Config:
        codebook_size: int = 16384
        dim: int = 8
        commitment: float = 0.25  # beta: weight of ||sg(q) - z||^2
        entropy_weight: float = 0.03
        entropy_temperature: float = 0.01

    def __init__(self, cfg: "L2VectorQuantizer.Config"):
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)

    def codes(self) -> torch.Tensor:
        """The unit-norm codebook (K, D), fp32 (fp64 for a float64 model)."""
        return F.normalize(at_least_fp32(self.codebook.weight), dim=-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> unit-norm codes (B, D, H, W)."""
        return self.codes()[indices].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with full_precision(z):
            return self._quantize(at_least_fp32(z))

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        if d != self.cfg.dim:
            raise ValueError(f"quantizer expects {self.cfg.dim} channels, got {d}")
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)  # (N, D)
        codes = self.codes()
        sim = flat @ codes.t()  # (N, K); on the sphere, max similarity = min distance
        indices = sim.argmax(-1)
        q = codes[indices]
        losses = {
            "vq_codebook": F.mse_loss(q, flat.detach()),
            "vq_commit": self.cfg.commitment * F.mse_loss(q.detach(), flat),
        }
        if self.training and self.cfg.entropy_weight > 0:
            losses["vq_entropy"] = self.cfg.entropy_weight * entropy_loss(sim / self.cfg.entropy_temperature)
        q = flat + (q - flat).detach()  # straight-through: forward q, gradient to z
        quantized = q.reshape(b, h, w, d).permute(0, 3, 1, 2)
        metrics = {k: v.detach() for k, v in code_usage(indices, self.cfg.codebook_size).items()}
        return QuantizerOutput(quantized, indices.reshape(b, h, w), losses, metrics)
