"""Rectified flow in the minRF / FlexTok convention.

``x_t = (1 - t) x + t noise`` with t in [0, 1] (t = 1 is pure noise), the network predicts the
velocity ``v = noise - x``, training draws logit-normal t (``sigmoid(loc + scale * N(0, 1))``)
with an optional timestep shift ``t -> shift t / (1 + (shift - 1) t)`` (shift > 1 spends more time
near noise), and sampling integrates ``dx/dt = v`` from t = 1 down to t = 0 with Euler or Heun.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vtok.models.api import Condition
from vtok.models.diffusion.guidance import Guidance, Net, as_guidance, guided, momentum_buffer_for

SOLVERS = ("euler", "heun")


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift ``shift t / (1 + (shift - 1) t)`` (identity at shift 1); keeps 0 and 1 fixed."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


class RectifiedFlow:
    """Training loss and samplers of a rectified flow (model-agnostic).

    ``loc``/``scale``: location and scale of the logit-normal training-time distribution.
    ``shift``: timestep shift applied to training times and to the sampling grid (1 = none).
    The network is ``net(x_t (B, ...), t (B,) float in [0, 1], cond) -> v (B, ...)``.
    """

    def __init__(self, loc: float = 0.0, scale: float = 1.0, shift: float = 1.0):
        if scale <= 0 or shift <= 0:
            raise ValueError(f"RectifiedFlow: scale={scale} and shift={shift} must be > 0")
        self.loc, self.scale, self.shift = float(loc), float(scale), float(shift)

    # -- training ----------------------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times (n,) float32: logit-normal, then shifted."""
        return self.time_from_normal(torch.randn(n, device=device, generator=generator))

    def time_from_normal(self, z: torch.Tensor) -> torch.Tensor:
        """Training times from standard-normal draws z (B,): ``shift(sigmoid(loc + scale z))``."""
        return shift_time(torch.sigmoid(self.loc + self.scale * z.float()), self.shift)

    @staticmethod
    def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x + t noise``: x, noise (B, ...), t (B,) -> (B, ...)."""
        tb = _bview(t.to(x.dtype), x)
        return (1.0 - tb) * x + tb * noise

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``interpolate`` with GaussianDiffusion.q_sample's argument order: (B, ...), (B,), (B, ...)."""
        return self.interpolate(x_start, noise, t)

    @staticmethod
    def target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity target ``noise - x`` (B, ...)."""
        return noise - x

    def loss(self, net: Net, x: torch.Tensor, cond: Condition, *, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between ``net(x_t, t, cond)`` and ``noise - x``, mean over every element.

        x: clean data (B, ...); ``t`` (B,) and ``noise`` (B, ...) are drawn when not given.
        Returns (scalar loss, metrics): ``mse`` (the loss, detached), ``mse_lo_t`` / ``mse_hi_t``
        (mean per-sample MSE for t < 0.5 / t >= 0.5; NaN when a half is empty)."""
        if t is None:
            t = self.sample_t(x.shape[0], x.device, generator)
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        pred = net(self.interpolate(x, noise, t), t, cond)
        per = (pred.float() - self.target(x, noise).float()).pow(2).flatten(1).mean(1)  # (B,)
        loss = per.mean()
        with torch.no_grad():
            lo = (t < 0.5).float()  # masked means without a host sync (0 / 0 = NaN when empty)
            metrics = {"mse": loss.detach(), "mse_lo_t": (per.detach() * lo).sum() / lo.sum(),
                       "mse_hi_t": (per.detach() * (1 - lo)).sum() / (1 - lo).sum()}
        return loss, metrics

    # -- sampling ----------------------------------------------------------------------------
    def time_grid(self, steps: int, shift: float | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """``steps + 1`` times from 1 (noise) down to 0 (data): uniform, then shifted. (steps+1,)"""
        if steps < 1:
            raise ValueError(f"steps={steps}: need at least one step")
        grid = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
        return shift_time(grid, self.shift if shift is None else shift).float()

    @torch.no_grad()
    def sample(self, net: Net, shape: Sequence[int], cond: Condition, *, steps: int = 25,
               solver: str = "euler", guidance: Guidance | float | None = None,
               null_cond: Condition | None = None, noise: torch.Tensor | None = None,
               shift: float | None = None, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate from noise (t = 1) to data (t = 0); returns x_0 of ``shape`` (B, ...).

        ``solver``: "euler" (``steps`` network evaluations) or "heun" (2 per step; a second-order
        trapezoid on every step, including the last, since v is defined at t = 0). ``guidance``:
        a :class:`Guidance` or a plain CFG scale; its interval is in flow time. With APG one
        momentum buffer lives for the whole run (Heun updates it at both evaluations).
        ``noise``: the starting noise (else drawn with ``generator`` on ``device``)."""
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r}: expected one of {', '.join(SOLVERS)}")
        guidance = as_guidance(guidance)
        x = noise if noise is not None else torch.randn(tuple(shape), device=device, generator=generator)
        x = x.float()
        buffer = momentum_buffer_for(guidance)
        grid = self.time_grid(steps, shift).tolist()
        b = x.shape[0]

        def velocity(xc: torch.Tensor, tc: float) -> torch.Tensor:
            tt = torch.full((b,), tc, device=xc.device, dtype=torch.float32)
            return guided(net, xc, tt, cond, null_cond, guidance, t_norm=tc, buffer=buffer).float()

        for t0, t1 in zip(grid[:-1], grid[1:]):
            dt = t1 - t0  # negative: time runs from noise to data
            d0 = velocity(x, t0)
            if solver == "euler":
                x = x + dt * d0
            else:
                d1 = velocity(x + dt * d0, t1)
                x = x + dt * 0.5 * (d0 + d1)
        return x


__all__ = ["SOLVERS", "RectifiedFlow", "shift_time"]
