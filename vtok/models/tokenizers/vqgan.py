"""The VQGAN CNN encoder / decoder of LlamaGen's VQ-16 (and its x8 variant), used by FQGAN.

Encoder trunk: conv_in -> per level [ResBlock x num_res_blocks (+ self-attention at the lowest
resolution)] with a stride-2 downsample between levels -> mid (res, attn, res); each FQGAN factor
head adds GroupNorm, SiLU and the conv to ``z_channels``. The decoder mirrors it with ``num_res_blocks + 1`` blocks per level and
nearest-neighbour upsampling. ch 128, ch_mult (1, 1, 2, 2, 4) gives x16; (1, 2, 2, 4) gives x8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, 1, c, h * w).transpose(-1, -2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exact halving


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class CNNConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention when ``attn``), then a resample."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, resample: nn.Module | None, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, dropout) for i in range(n))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n)) if attn else None
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x)
        return self.resample(x) if self.resample is not None else x


class Mid(nn.Sequential):
    def __init__(self, ch: int, dropout: float):
        super().__init__(ResBlock(ch, ch, dropout), AttnBlock(ch), ResBlock(ch, ch, dropout))


class Encoder(nn.Module):
    """The encoder trunk: x (B, 3, H, W) in [-1, 1] -> features (B, ch * ch_mult[-1], H/f, W/f).
    The output head (GroupNorm, SiLU, conv to ``z_channels``) belongs to each factor head (fqgan.py)."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        mults, last = (1, *cfg.ch_mult), len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.levels = nn.ModuleList(
            Level(cfg.ch * mults[i], cfg.ch * m, cfg.num_res_blocks, i == last,
                  Downsample(cfg.ch * m) if i != last else None, cfg.dropout)
            for i, m in enumerate(cfg.ch_mult))
        self.mid = Mid(cfg.ch * cfg.ch_mult[-1], cfg.dropout)

    def blocks(self):
        return [*self.levels, self.mid]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.mid(h)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x (B, 3, h*f, w*f)."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        top, n_levels = cfg.ch * cfg.ch_mult[-1], len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = Mid(top, cfg.dropout)
        levels, cin = [], top
        for i in range(n_levels):  # from the lowest resolution up
            cout = cfg.ch * cfg.ch_mult[n_levels - 1 - i]
            levels.append(Level(cin, cout, cfg.num_res_blocks + 1, i == 0,
                                Upsample(cout) if i != n_levels - 1 else None, cfg.dropout))
            cin = cout
        self.levels = nn.ModuleList(levels)
        self.norm_out, self.conv_out = norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def blocks(self):
        return [self.mid, *self.levels]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
