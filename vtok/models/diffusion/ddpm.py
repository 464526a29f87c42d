"""Gaussian diffusion (DDPM) as DiT trains and samples it.

Linear betas (1e-4 .. 0.02 over 1000 steps), epsilon prediction with a learned variance in the
"learned range" parameterisation (the network's extra channels v in [-1, 1] interpolate in log
space between the posterior variance and beta_t), the hybrid loss ``mse(eps) + vb_weight * vb``
where the VB term (in bits per dimension) sees a detached mean and so trains only the variance,
ancestral sampling on a respaced chain, and DDIM.

Timesteps are integers 0..T-1 (T - 1 is the noisiest). The network always receives ORIGINAL
timesteps: a respaced diffusion (``respace("250")``) steps through indices 0..K-1 of its own chain
and maps them to the kept original timesteps before calling the network.
The network is ``net(x_t (B, ...), t (B,) int64, cond) -> (B, ...)`` whose ``channel_dim`` holds
``2C`` channels (epsilon, then the variance values) with ``learn_sigma``, or ``C`` without.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from vtok.models.api import Condition
from vtok.models.diffusion.guidance import Guidance, Net, as_guidance, guided, momentum_buffer_for
from vtok.models.diffusion.schedule import (discretized_gaussian_log_likelihood, linear_betas, normal_kl,
                                            respaced_betas, space_timesteps)

SAMPLERS = ("ddpm", "ddim")


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class GaussianDiffusion:
    """Schedules, training loss and samplers of a DDPM (model-agnostic).

    ``betas``: (T,) schedule (default ``linear_betas(num_timesteps)``). ``learn_sigma``: the network
    outputs a variance next to epsilon (else the fixed variance: beta_t, or the posterior
    variance with ``sigma_small``). ``vb_weight``: lambda of the hybrid loss (DiT: 1, VB in bits).
    ``channel_dim``: where epsilon and the variance values are concatenated (-1 for (B, n, d)
    tokens, 1 for (B, C, H, W) images). ``clip_denoised``: clamp predicted x_0 to [-1, 1] when
    sampling (DiT samples latents unclipped). ``guided_channels``: guide only the first k epsilon
    channels (DiT's sample.py guides 3 of its 4 latent channels "for exact reproducibility"; the
    rest come from the conditional rows); None: all of them. Tables are float64; lookups return float32.
    """

    def __init__(self, betas: torch.Tensor | Sequence[float] | None = None, *, num_timesteps: int = 1000,
                 learn_sigma: bool = True, sigma_small: bool = False, vb_weight: float = 1.0,
                 channel_dim: int = -1, clip_denoised: bool = False, guided_channels: int | None = None,
                 timestep_map: Sequence[int] | None = None, original_betas: torch.Tensor | None = None):
        betas = linear_betas(num_timesteps) if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("GaussianDiffusion: betas must be 1-D, at least 2 steps, in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma, self.sigma_small = learn_sigma, sigma_small
        self.vb_weight, self.channel_dim, self.clip_denoised = float(vb_weight), channel_dim, clip_denoised
        self.guided_channels = guided_channels
        self.original_betas = betas if original_betas is None else original_betas
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("GaussianDiffusion: timestep_map needs one entry per beta")
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # log clipped: the posterior variance is 0 at t = 0, so t = 0 borrows t = 1's value
        clipped = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        fixed_large = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self._tables = {
            "sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1.0 - ab).sqrt(), "ab": ab, "ab_prev": ab_prev,
            "sqrt_recip_ab": (1.0 / ab).sqrt(), "sqrt_recipm1_ab": (1.0 / ab - 1.0).sqrt(),
            "post_var": self.posterior_variance, "post_logvar": clipped, "log_betas": torch.log(betas),
            "coef1": betas * ab_prev.sqrt() / (1.0 - ab),
            "coef2": (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
            "fixed_var": self.posterior_variance if sigma_small else fixed_large,
            "fixed_logvar": clipped if sigma_small else torch.log(fixed_large),
        }
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    # -- tables --------------------------------------------------------------------------------
    def _get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at (B,) indices ``t`` as float32, shaped (B, 1, ..., 1) to broadcast on ``like``."""
        key = (name, str(t.device))
        if key not in self._cache:
            self._cache[key] = self._tables[name].to(device=t.device, dtype=torch.float32)
        return self._cache[key][t].view(-1, *([1] * (like.dim() - 1)))

    def respace(self, spacing: str | int | Iterable[int]) -> GaussianDiffusion:
        """The same process on the kept original timesteps (see ``space_timesteps``): betas recomputed
        from the original ``alphas_cumprod`` so the cumulative products match at every kept step."""
        base_ab = torch.cumprod(1.0 - self.original_betas, 0)
        keep = space_timesteps(len(self.original_betas), spacing)
        return GaussianDiffusion(respaced_betas(base_ab, keep), learn_sigma=self.learn_sigma,
                                 sigma_small=self.sigma_small, vb_weight=self.vb_weight,
                                 channel_dim=self.channel_dim, clip_denoised=self.clip_denoised,
                                 guided_channels=self.guided_channels,
                                 timestep_map=keep, original_betas=self.original_betas)

    def original_t(self, t: torch.Tensor) -> torch.Tensor:
        """Chain indices (B,) -> the original timesteps (B,) int64 the network sees."""
        key = ("map", str(t.device))
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
        return self._cache[key][t]

    # -- forward process -------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``. (B, ...)"""
        return self._get("sqrt_ab", t, x_start) * x_start + self._get("sqrt_1m_ab", t, x_start) * noise

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean (B, ...), variance and clipped log-variance (B, 1, ...) of q(x_{t-1} | x_t, x_0)."""
        mean = self._get("coef1", t, x_t) * x_start + self._get("coef2", t, x_t) * x_t
        return mean, self._get("post_var", t, x_t), self._get("post_logvar", t, x_t)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar). (B, ...)"""
        return self._get("sqrt_recip_ab", t, x_t) * x_t - self._get("sqrt_recipm1_ab", t, x_t) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The epsilon that maps x_0 to x_t. (B, ...)"""
        return (self._get("sqrt_recip_ab", t, x_t) * x_t - x0) / self._get("sqrt_recipm1_ab", t, x_t)

    # -- reverse process -------------------------------------------------------------------------
    def split_output(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network output -> (eps (B, ...) like x, variance values or None)."""
        if not self.learn_sigma:
            return out, None
        c = x.shape[self.channel_dim]
        if out.shape[self.channel_dim] != 2 * c:
            raise ValueError(f"learn_sigma: expected {2 * c} channels on dim {self.channel_dim}, "
                             f"got output {tuple(out.shape)} for x {tuple(x.shape)}")
        eps, var = out.split(c, dim=self.channel_dim)
        return eps, var

    def p_mean_variance(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool | None = None) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the network output ``out`` at x_t = ``x`` and chain indices ``t``:
        dict ``mean``, ``variance``, ``log_variance`` (broadcastable to x), ``pred_xstart``, ``eps``."""
        eps, values = self.split_output(out, x)
        if values is None:
            log_var = self._get("fixed_logvar", t, x)
        else:
            frac = (values + 1.0) / 2.0  # [-1, 1] -> [posterior variance, beta_t], in log space
            log_var = frac * self._get("log_betas", t, x) + (1.0 - frac) * self._get("post_logvar", t, x)
        pred_x0 = self.predict_xstart_from_eps(x, t, eps)
        if self.clip_denoised if clip_denoised is None else clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t)
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var,
                "pred_xstart": pred_x0, "eps": eps}

    # -- training --------------------------------------------------------------------------------
    def vb_terms_bpd(self, out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """The VB term at t in bits per dimension (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t > 0, the discretized Gaussian NLL of x_0 at t = 0."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(out, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"].expand_as(x_start))
        return torch.where(t == 0, _mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, net: Net, x_start: torch.Tensor, cond: Condition, *,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample (B,) terms: ``mse`` (epsilon), ``vb`` (bits/dim, on a detached mean; with
        learn_sigma) and ``loss = mse + vb_weight * vb``. ``t`` (B,) chain indices are drawn
        uniformly when not given."""
        b = x_start.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x_start.device, generator=generator)
        if noise is None:
            noise = torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype, generator=generator)
        x_t = self.q_sample(x_start, t, noise)
        out = net(x_t, self.original_t(t), cond).float()
        eps, values = self.split_output(out, x_start)
        terms = {"mse": _mean_flat((noise.float() - eps).pow(2))}
        if values is not None:
            frozen = torch.cat([eps.detach(), values], dim=self.channel_dim)  # VB trains the variance only
            terms["vb"] = self.vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
            terms["loss"] = terms["mse"] + self.vb_weight * terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def loss(self, net: Net, x: torch.Tensor, cond: Condition, **kw
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Batch-mean hybrid loss and detached metrics (``mse``, ``vb``): the RectifiedFlow API."""
        terms = self.training_losses(net, x, cond, **kw)
        return terms["loss"].mean(), {k: v.detach().mean() for k, v in terms.items() if k != "loss"}

    # -- sampling --------------------------------------------------------------------------------
    def _predict(self, net: Net, x: torch.Tensor, i: int, cond: Condition, guidance: Guidance | None,
                 null_cond: Condition | None, buffer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        t_orig = self.timestep_map[i]
        t_norm = t_orig / (len(self.original_betas) - 1)
        c = x.shape[self.channel_dim] if self.learn_sigma else None
        c = self.guided_channels or c
        out = guided(net, x, self.original_t(t), cond, null_cond, guidance, t_norm=t_norm, buffer=buffer,
                     guided_channels=c, channel_dim=self.channel_dim).float()
        return self.p_mean_variance(out, x, t), t

    @torch.no_grad()
    def p_sample_loop(self, net: Net, shape: Sequence[int], cond: Condition, *,
                      guidance: Guidance | float | None = None, null_cond: Condition | None = None,
                      noise: torch.Tensor | None = None, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling through every step of this chain (respace first for fewer steps).
        Guidance acts on epsilon; its interval is in original timesteps / (T - 1). Returns (B, ...)."""
        guidance = as_guidance(guidance)
        x = (noise if noise is not None else torch.randn(tuple(shape), device=device, generator=generator)).float()
        buffer = momentum_buffer_for(guidance)
        for i in reversed(range(self.num_timesteps)):
            p, _ = self._predict(net, x, i, cond, guidance, null_cond, buffer)
            x = p["mean"]
            if i > 0:
                z = torch.randn(x.shape, device=x.device, generator=generator)
                x = x + torch.exp(0.5 * p["log_variance"]) * z
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, net: Net, shape: Sequence[int], cond: Condition, *, eta: float = 0.0,
                         guidance: Guidance | float | None = None, null_cond: Condition | None = None,
                         noise: torch.Tensor | None = None, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM through every step of this chain (eta = 0: deterministic). Returns (B, ...)."""
        guidance = as_guidance(guidance)
        x = (noise if noise is not None else torch.randn(tuple(shape), device=device, generator=generator)).float()
        buffer = momentum_buffer_for(guidance)
        for i in reversed(range(self.num_timesteps)):
            p, t = self._predict(net, x, i, cond, guidance, null_cond, buffer)
            eps = self.predict_eps_from_xstart(x, t, p["pred_xstart"])
            ab, ab_prev = self._get("ab", t, x), self._get("ab_prev", t, x)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            x = p["pred_xstart"] * ab_prev.sqrt() + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
            if i > 0 and eta > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        return x

    def sample(self, net: Net, shape: Sequence[int], cond: Condition, *, steps: str | int | None = 250,
               sampler: str = "ddpm", eta: float = 0.0, **kw) -> torch.Tensor:
        """Respace to ``steps`` (None: all) and run the "ddpm" or "ddim" loop; ``kw`` as the loops."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
        chain = self if steps is None else self.respace(steps)
        if sampler == "ddim":
            return chain.ddim_sample_loop(net, shape, cond, eta=eta, **kw)
        return chain.p_sample_loop(net, shape, cond, **kw)


__all__ = ["SAMPLERS", "GaussianDiffusion"]
