"""Feed-forward layers: the GELU MLP of ViTs and the SwiGLU of LLaMA-style models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear with a hidden width of ``ratio * dim``: (..., D) -> (..., D).
    ``approximate``: "none" (exact GELU) or "tanh" (the tanh GELU of DiT / PixArt-alpha)."""

    def __init__(self, dim: int, ratio: float = 4.0, bias: bool = True, approximate: str = "none"):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden, bias=bias), nn.GELU(approximate=approximate),
                         nn.Linear(hidden, dim, bias=bias))


def swiglu_hidden(dim: int, ratio: float = 4.0, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: 2/3 of ``ratio * dim`` (same FLOPs as a GELU MLP), rounded up to a
    multiple of ``multiple_of``. E.g. 768 -> 2048, 1024 -> 2816, 3200 -> 8704."""
    hidden = int(2 * int(ratio * dim) / 3)
    return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
