"""Finite scalar quantization (FSQ; Mentzer et al. 2024), as FlexTok uses it: levels [8, 8, 8, 5, 5, 5]
(64,000 codes, one 6-dim code per register token).

Each dimension i is bounded to ``levels[i]`` integer values by a shifted tanh, rounded with a
straight-through gradient, and normalised to [-1, 1]:

    half_l = (L - 1) (1 + eps) / 2,  offset = 0.5 if L is even else 0,  shift = atanh(offset / half_l)
    bounded = tanh(z + shift) * half_l - offset      -> rounds to {-L//2, ..., L - 1 - L//2}
    code    = round_ste(bounded) / (L // 2)          -> in [-1, 1] (even L: [-1, 1 - 2/L])

The shift makes z = 0 land between two integers for even L, so all L values are reachable. Codes
and ids map to each other with a mixed radix (first dimension fastest). Everything runs in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from vtok.models.quant.base import QuantizerOutput, code_usage, full_precision


def _levels(levels: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(levels), dtype=torch.int64, device=device)


def _basis(levels: Sequence[int], device: torch.device) -> torch.Tensor:
    """Mixed-radix place values (d,): [1, L0, L0 L1, ...]."""
    return torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.int64, device=device)


def bound(z: torch.Tensor, levels: Sequence[int], eps: float = 1e-3) -> torch.Tensor:
    """z (..., d) -> fp32 values in (-L//2 - 0.5, L - L//2 - 0.5) per dimension (before rounding)."""
    lv = _levels(levels, z.device).float()
    half_l = (lv - 1) * (1 + eps) / 2
    offset = torch.where(_levels(levels, z.device) % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half_l)
    return torch.tanh(z.float() + shift) * half_l - offset


def quantize(z: torch.Tensor, levels: Sequence[int], eps: float = 1e-3) -> torch.Tensor:
    """z (..., d) -> straight-through codes (..., d) in [-1, 1], fp32 (gradient of ``bound`` / (L//2))."""
    bounded = bound(z, levels, eps)
    rounded = bounded + (torch.round(bounded) - bounded).detach()
    return rounded / (_levels(levels, z.device) // 2).float()


def codes_to_indices(codes: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Normalised codes (..., d) -> int64 ids (...) in [0, prod(levels)), first dimension fastest."""
    half = (_levels(levels, codes.device) // 2)
    digits = torch.round(codes.float() * half.float()).long() + half  # 0 .. L - 1
    return (digits * _basis(levels, codes.device)).sum(-1)


def indices_to_codes(indices: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """int ids (...) -> normalised fp32 codes (..., d); the inverse of ``codes_to_indices``."""
    lv = _levels(levels, indices.device)
    digits = (indices.long()[..., None] // _basis(levels, indices.device)) % lv
    half = lv // 2
    return (digits - half).float() / half.float()


class FSQ(nn.Module):
    """z (B, N, d) (any (..., d)) -> QuantizerOutput(quantized (..., d) in [-1, 1], indices (...)).

    No parameters and no auxiliary losses; ``metrics`` holds the codebook usage and perplexity."""

    @dataclass
    class Config:
        levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
        eps: float = 1e-3  # widens the tanh bound a little so the extreme values round reliably

    def __init__(self, cfg: "FSQ.Config"):
        super().__init__()
        if not cfg.levels or min(cfg.levels) < 2:
            raise ValueError(f"FSQ levels {cfg.levels}: need at least one dimension, each with >= 2 levels")
        self.cfg = cfg
        self.levels = tuple(int(v) for v in cfg.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., d) -> ids (...)."""
        return codes_to_indices(codes, self.levels)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """ids (...) -> codes (..., d), fp32."""
        return indices_to_codes(indices, self.levels)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with levels {self.levels} expects {self.dim} channels last, got {z.shape[-1]}")
        with full_precision(z):
            codes = quantize(z.float(), self.levels, self.cfg.eps)
            indices = self.codes_to_indices(codes.detach())
        metrics = {k: v.detach() for k, v in code_usage(indices, self.codebook_size).items()}
        return QuantizerOutput(codes, indices, {}, metrics)


__all__ = ["FSQ", "bound", "codes_to_indices", "indices_to_codes", "quantize"]
