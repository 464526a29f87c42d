"""Diffusion-transformer pieces (DiT, Peebles & Xie 2023; PixArt-alpha, Chen et al. 2023), shared by
the DiT generator and the FlexTok decoder.

- ``timestep_embedding`` / ``TimestepEmbedder``: sinusoidal features of the (scaled) timestep, then
  Linear -> SiLU -> Linear (DiT's, 256 frequencies).
- ``sincos_1d`` / ``sincos_2d``: fixed sin-cos positional tables (DiT's / MAE's layout).
- ``AdaLNZeroBlock``: LayerNorm (no affine) modulated by shift / scale from the conditioning vector,
  gated residuals, all six modulations from one zero-initialised Linear (adaLN-Zero), optionally with
  a cross-attention layer between self-attention and MLP (PixArt-alpha: plain residual, no norm).
- ``FinalLayer``: adaLN (shift, scale) then a zero-initialised Linear to the patch outputs.

The conditioning vector ``c`` is (B, D) (one per sample, as DiT) or (B, N, D) (one per token, e.g.
FlexTok's separate modulation for patches and registers).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vtok.models.layers.attention import Attention, CrossAttention
from vtok.models.layers.mlp import Mlp


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) * (1 + scale) + shift, with shift / scale (B, D) (broadcast over N) or (B, N, D)."""
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def _gate(g: torch.Tensor) -> torch.Tensor:
    return g[:, None] if g.dim() == 2 else g


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: t (B,) -> (B, dim), float32.

    Frequencies ``max_period ** (-i / half)`` for i < dim // 2; the layout is [cos | sin] (as DiT /
    GLIDE), zero-padded by one column when ``dim`` is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): ``timestep_embedding`` (``freq_dim`` features) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def reset_parameters(self) -> None:
        """DiT: both Linear weights ~ N(0, 0.02), biases zero."""
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(t, self.freq_dim, self.max_period)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


def sincos_1d(dim: int, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos table: positions (M,) -> (M, dim) laid out [sin | cos] with frequencies
    ``base ** (-i / (dim / 2))`` (MAE / DiT's 1D table). ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"sin-cos positions need an even width, got {dim}")
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, height: int, width: int | None = None, device: torch.device | str | None = None
              ) -> torch.Tensor:
    """Fixed 2D sin-cos table for a row-major (height, width) grid: -> (height * width, dim).

    DiT's layout: the first dim / 2 columns encode the column (x) index, the last dim / 2 the row (y)
    index (its ``meshgrid(grid_w, grid_h)`` puts x first), each a ``sincos_1d`` table."""
    width = height if width is None else width
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs.reshape(-1)), sincos_1d(dim // 2, ys.reshape(-1))], dim=1)


class AdaLNZeroBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning, optionally with PixArt-alpha's cross-attention:

        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
        x = x + gate1 * SelfAttn(modulate(LN(x), shift1, scale1))
        x = x + CrossAttn(x, context, context_mask)          (only with ``cross_attention``)
        x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))

    x (B, N, D), c (B, D) or (B, N, D), context (B, L, D_ctx), context_mask (B, L) bool -> (B, N, D).
    LayerNorms have no affine parameters (eps 1e-6), attention has qkv / proj biases, the MLP uses
    the tanh GELU: DiT's layer layout, so the parameter count is DiT's."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, cross_attention: bool = False,
                 context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, bias=True)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio, bias=True, approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def reset_parameters(self) -> None:
        """xavier-uniform Linear weights, zero biases (DiT's basic init); then zero the modulation
        Linear (adaLN-Zero: every gate starts at 0, so each block starts as the identity) and the
        cross-attention output projection (PixArt-alpha zeroes ``cross_attn.proj``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        if self.cross_attn is not None:
            nn.init.zeros_(self.cross_attn.proj.weight)
            nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + _gate(gate1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass the context (B, L, D_ctx)")
            x = x + self.cross_attn(x, context, context_mask)
        return x + _gate(gate2) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """DiT's output layer: x (B, N, D), c (B, D) or (B, N, D) -> (B, N, out_dim) =
    Linear(modulate(LN(x), shift, scale)) with (shift, scale) = Linear(SiLU(c))."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def reset_parameters(self) -> None:
        """DiT zeroes the modulation and the output Linear: a fresh model predicts exactly 0."""
        for lin in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


__all__ = ["AdaLNZeroBlock", "FinalLayer", "TimestepEmbedder", "modulate", "sincos_1d", "sincos_2d",
           "timestep_embedding"]
