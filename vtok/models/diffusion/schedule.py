"""DDPM schedule helpers: the linear beta schedule, timestep respacing, and the Gaussian terms of
the variational bound (KL between Gaussians, discretized Gaussian log-likelihood), as in the
improved-DDPM / DiT code."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear schedule, stretched so it keeps its shape at any T: both ends scale by
    ``1000 / num_timesteps``. Returns (T,) float64 (1e-4 .. 0.02 at T = 1000)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spacing: str | int | Iterable[int]) -> list[int]:
    """The original timesteps (sorted) a respaced sampler keeps.

    ``spacing``: an int or "N" (N evenly spaced steps over 0..T-1, both ends included); "a,b,c"
    (the range cut into equal sections with a, b, c steps each); "ddimN" (the integer stride
    that gives exactly N steps, starting at 0); or an explicit collection of timesteps.
    """
    if not isinstance(spacing, (str, int)):
        steps = sorted({int(s) for s in spacing})
        if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"space_timesteps: timesteps must lie in 0..{num_timesteps - 1}")
        return steps
    text = str(spacing).strip()
    if text.startswith("ddim"):
        want = int(text[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"space_timesteps: no integer stride gives exactly {want} of {num_timesteps} steps")
    counts = [int(c) for c in text.split(",")]
    base, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(f"space_timesteps: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]  # Python round, as the reference
        start += size
    return sorted(set(kept))


def respaced_betas(alphas_cumprod: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Betas of the chain that visits only ``keep``: ``1 - abar[k] / abar[previous kept]`` (with
    abar = 1 before the first), so its cumulative products equal ``alphas_cumprod[keep]``. (K,)"""
    kept = alphas_cumprod[torch.tensor(keep)]
    prev = torch.cat([kept.new_ones(1), kept[:-1]])
    return 1.0 - kept / prev


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the reference code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats, elementwise, for data in [-1, 1] quantized to 256 levels (bins of
    half-width 1/255) under N(means, exp(log_scales)^2); the two edge bins take the open tails."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


__all__ = ["approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "linear_betas",
           "normal_kl", "respaced_betas", "space_timesteps"]
