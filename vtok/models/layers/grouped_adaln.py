"""An adaLN-Zero transformer block whose modulation is separate per group of tokens.

FlexTok's decoder runs one sequence [noised latent patches | registers] with full attention, but
modulates the patches and the registers with different adaLN heads (apple/ml-flextok; see
shared/PAPERS.md): two ``Linear(D, 6D)`` per block, which is why its decoder block has ~24 D^2
parameters against the ~12 D^2 of a plain one. The groups are contiguous slices of the sequence,
given by their sizes; every group reads the same conditioning vector ``c`` (B, D) (the time).

Layer layout (FlexTok's): LayerNorm without affine computed in fp32, attention without biases and
with per-head QK-norm (the same affine-free norm), SwiGLU MLP without biases, hidden int(8D/3).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vtok.models.layers.adaln import modulate
from vtok.models.layers.attention import Attention
from vtok.models.layers.mlp import SwiGLU, swiglu_hidden
from vtok.models.layers.norms import make_norm


def _per_group(x: torch.Tensor, sizes: Sequence[int], mods: Sequence[tuple[torch.Tensor, ...]], fn) -> torch.Tensor:
    """Apply ``fn(slice, *mod)`` to each contiguous token group of x (B, N, D); concatenate back."""
    return torch.cat([fn(part, *mod) for part, mod in zip(x.split(list(sizes), dim=1), mods)], dim=1)


def _gated(part: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return gate[:, None] * part


class GroupedAdaLNBlock(nn.Module):
    """adaLN-Zero block with one modulation head per token group:

        for group g:  shift1, scale1, gate1, shift2, scale2, gate2 = Linear_g(SiLU(c))
        x = x + gate1_g * Attn(modulate_g(LN(x)), mask)      (attention over the whole sequence)
        x = x + gate2_g * MLP(modulate_g(LN(x)))

    x (B, N, D), c (B, D), ``sizes``: token counts of the groups (sum N), mask: optional boolean
    (N, N) / (B, 1, N, N), True = attend -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, num_groups: int = 2, *, mlp_ratio: float = 4.0,
                 norm: str = "layer_fp32", eps: float = 1e-6, swiglu_multiple_of: int = 1):
        super().__init__()
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(dim, num_heads, bias=False, qk_norm=norm, qk_norm_eps=eps)
        self.norm2 = make_norm(norm, dim, eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, swiglu_multiple_of), bias=False)
        self.adaLN_modulation = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
                                              for _ in range(num_groups))

    def reset_parameters(self) -> None:
        """xavier-uniform Linear weights, zero biases; zero modulation heads (adaLN-Zero: every gate
        starts at 0, so the block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for head in self.adaLN_modulation:
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, sizes: Sequence[int],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if len(sizes) != len(self.adaLN_modulation) or sum(sizes) != x.shape[1]:
            raise ValueError(f"token groups {tuple(sizes)} do not split {x.shape[1]} tokens into "
                             f"{len(self.adaLN_modulation)} groups")
        mods = [head(c).chunk(6, dim=-1) for head in self.adaLN_modulation]
        first = [m[:3] for m in mods]
        second = [m[3:] for m in mods]
        h = _per_group(self.norm1(x), sizes, [m[:2] for m in first], modulate)
        x = x + _per_group(self.attn(h, mask), sizes, [m[2:] for m in first], _gated)
        h = _per_group(self.norm2(x), sizes, [m[:2] for m in second], modulate)
        return x + _per_group(self.mlp(h), sizes, [m[2:] for m in second], _gated)


__all__ = ["GroupedAdaLNBlock"]
