"""Model-agnostic diffusion: rectified flow, DDPM (DiT's), and guidance (CFG, interval, APG).

A network is any callable ``net(x_t, t, cond) -> prediction`` on batches: ``x_t`` (B, ...),
``t`` (B,), ``cond`` a :class:`vtok.models.api.Condition` of B rows. The processes below only
noise, compute losses and integrate; the FlexTok decoder and the DiT generator supply the nets.

Conventions (written down once, here):

* Rectified flow (:class:`RectifiedFlow`, the minRF / FlexTok convention): ``t`` float in [0, 1],
  ``x_t = (1 - t) x + t noise``, **t = 1 is pure noise**, t = 0 is data. The network predicts the
  velocity ``v = noise - x`` (so ``dx_t/dt = v``); samplers integrate from t = 1 to t = 0.
  Training t is logit-normal ``sigmoid(loc + scale * N(0, 1))``, optionally shifted by
  ``shift t / (1 + (shift - 1) t)``.
* DDPM (:class:`GaussianDiffusion`, the DiT / improved-DDPM convention): ``t`` int64 in 0..T-1,
  **t = T - 1 is the noisiest**, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. The network
  predicts epsilon, plus (``learn_sigma``) C more channels on ``channel_dim`` that pick the
  variance in log space between the posterior variance (-1) and beta_t (+1). The network always
  sees original timesteps, also on a respaced chain.
* Guidance (:func:`guided`): the conditional and the unconditional rows run in one network call on
  ``[x; x]`` with ``[cond; null_cond]``; the caller provides ``null_cond`` (null class / caption).
  The guidance interval is in normalized time, 0 = data, 1 = noise (the flow ``t``; a DDPM
  timestep divided by T - 1). ``scale = 1`` runs only the conditional rows.

Typical use::

    flow = RectifiedFlow()
    loss, metrics = flow.loss(net, x, cond)
    x0 = flow.sample(net, x.shape, cond, steps=25, solver="heun",
                     guidance=Guidance(scale=7.5, apg=True), null_cond=null)

    ddpm = GaussianDiffusion()                      # 1000 linear steps, learned sigma
    loss, metrics = ddpm.loss(net, x, cond)
    x0 = ddpm.sample(net, x.shape, cond, steps="250", guidance=4.0, null_cond=null)
"""
from vtok.models.diffusion.ddpm import SAMPLERS, GaussianDiffusion
from vtok.models.diffusion.flow import SOLVERS, RectifiedFlow, shift_time
from vtok.models.diffusion.guidance import (Guidance, MomentumBuffer, Net, apg_combine, as_guidance,
                                            cat_conditions, cfg_combine, guided, momentum_buffer_for)
from vtok.models.diffusion.schedule import (approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
                                            linear_betas, normal_kl, respaced_betas, space_timesteps)

__all__ = ["SAMPLERS", "SOLVERS", "GaussianDiffusion", "Guidance", "MomentumBuffer", "Net", "RectifiedFlow",
           "apg_combine", "approx_standard_normal_cdf", "as_guidance", "cat_conditions", "cfg_combine",
           "discretized_gaussian_log_likelihood", "guided", "linear_betas", "momentum_buffer_for", "normal_kl",
           "respaced_betas", "shift_time", "space_timesteps"]
