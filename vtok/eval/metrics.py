"""Image reconstruction metrics on [-1, 1] images (B, 3, H, W): PSNR and SSIM per image."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, on the [0, 1] scale; x is clamped to [-1, 1] first. -> (B,)"""
    mse = (x.detach().float().clamp(-1, 1) - y.float()).pow(2).mean((1, 2, 3)) / 4.0
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on
    [0, 1] images, averaged over channels and valid positions. -> (B,)"""
    x = (x.detach().float().clamp(-1, 1) + 1) / 2
    y = (y.float() + 1) / 2
    w = _gaussian_window().to(x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=3), F.conv2d(y, w, groups=3)
    sxx = F.conv2d(x * x, w, groups=3) - mu_x.pow(2)
    syy = F.conv2d(y * y, w, groups=3) - mu_y.pow(2)
    sxy = F.conv2d(x * y, w, groups=3) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (sxx + syy + c2))
    return s.mean((1, 2, 3))
