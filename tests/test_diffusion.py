"""vtok.models.diffusion: rectified flow, DDPM (DiT's), CFG / interval / APG guidance.

The samplers are checked against Gaussian targets, whose exact velocity / epsilon are closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from vtok.models.api import Condition
from vtok.models.diffusion import (GaussianDiffusion, Guidance, MomentumBuffer, RectifiedFlow, apg_combine,
                                   cat_conditions, cfg_combine, discretized_gaussian_log_likelihood, guided,
                                   linear_betas, normal_kl, shift_time, space_timesteps)

NONE = Condition()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

MU, S = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0])  # flow target N(MU, S^2), per dim


# -- rectified flow ---------------------------------------------------------------------------------
def exact_velocity(x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
    """E[noise - x | x_t] for x ~ N(MU, S^2), x_t = (1-t) x + t noise."""
    tb = t.view(-1, 1)
    var = (1 - tb) ** 2 * S ** 2 + tb ** 2  # Var(x_t)
    d = x - (1 - tb) * MU
    return tb / var * d - (MU + (1 - tb) * S ** 2 / var * d)


def test_flow_interpolation_time_sampling_and_shift():
    x, noise = torch.randn(4, 3), torch.randn(4, 3)
    flow = RectifiedFlow(loc=0.5, scale=0.8)
    assert torch.allclose(flow.interpolate(x, noise, torch.zeros(4)), x)
    assert torch.allclose(flow.interpolate(x, noise, torch.ones(4)), noise)
    half = torch.full((4,), 0.5)
    assert torch.allclose(flow.q_sample(x, half, noise), 0.5 * (x + noise))
    assert torch.allclose(flow.target(x, noise), noise - x)
    t = flow.sample_t(20000, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    grid = RectifiedFlow(shift=3.0).time_grid(4)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
    assert grid[2].item() == pytest.approx(0.75)  # the midpoint is pushed toward noise


def test_flow_loss_at_exact_field_is_irreducible_minimum():
    gen = torch.Generator().manual_seed(1)
    n, flow = 200_000, RectifiedFlow()
    x = MU + S * torch.randn(n, 2, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    t = torch.full((n,), 0.3)
    loss, metrics = flow.loss(exact_velocity, x, NONE, t=t, noise=noise)
    irreducible = (S ** 2 / (0.7 ** 2 * S ** 2 + 0.3 ** 2)).mean()  # Var(noise - x | x_t) = s^2 / Var(x_t)
    assert loss.item() == pytest.approx(irreducible.item(), rel=0.01)
    assert metrics["mse"].item() == loss.item() and math.isnan(metrics["mse_hi_t"].item())
    t = flow.sample_t(n, generator=gen)  # logit-normal times: the exact field still wins
    exact, _ = flow.loss(exact_velocity, x, NONE, t=t, noise=noise)
    for delta in (0.05, -0.05):
        worse, _ = flow.loss(lambda a, b, c: exact_velocity(a, b, c) + delta, x, NONE, t=t, noise=noise)
        assert worse.item() > exact.item() + 0.5 * delta ** 2


def _sampler_error(solver: str, steps: int, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    out = RectifiedFlow().sample(exact_velocity, z.shape, NONE, steps=steps, solver=solver, noise=z)
    return (out - (MU + S * z)).abs().max().item(), out  # the exact ODE maps z to MU + S z


def test_flow_euler_and_heun_reproduce_gaussian():
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(2))
    errs = {(sv, n): _sampler_error(sv, n, z) for sv in ("euler", "heun") for n in (8, 16)}
    for (solver, steps), (err, out) in errs.items():
        assert torch.allclose(out.mean(0), MU, atol=0.05)
        rel_std = ((out.std(0) - S) / S).abs().max().item()
        assert rel_std < (0.2 if solver == "euler" else 0.02), (solver, steps, rel_std)
    e8, e16 = errs["euler", 8][0], errs["euler", 16][0]
    h8, h16 = errs["heun", 8][0], errs["heun", 16][0]
    assert h16 < e16 / 10  # at 16 steps: Euler ~0.84, Heun ~0.02 (max abs error)
    assert 1.6 < e8 / e16 < 2.4  # first order
    assert 3.0 < h8 / h16 < 5.5  # second order


def test_flow_sampler_guidance_batches_rows_and_respects_interval():
    calls = []

    def net(x, t, cond):
        calls.append(len(x))
        return exact_velocity(x, t, cond) + 0.1 * cond.labels.float().view(-1, 1)

    b = 5
    cond, null = Condition(labels=torch.ones(b, dtype=torch.long)), Condition(labels=torch.zeros(1, dtype=torch.long))
    g = Guidance(scale=2.0, interval=(0.45, 1.0))
    RectifiedFlow().sample(net, (b, 2), cond, steps=10, guidance=g, null_cond=null)
    assert calls == [2 * b] * 6 + [b] * 4  # t = 1.0 .. 0.5 guided, 0.4 .. 0.1 conditional only
    calls.clear()
    RectifiedFlow().sample(net, (b, 2), cond, steps=3, solver="heun", guidance=1.0, null_cond=null)
    assert calls == [b] * 6
    z = torch.randn(b, 2, generator=torch.Generator().manual_seed(5))
    cfg = RectifiedFlow().sample(net, (b, 2), cond, steps=4, guidance=3.0, null_cond=null, noise=z)
    apg = RectifiedFlow().sample(net, (b, 2), cond, steps=4, guidance=Guidance(scale=3.0, apg=True),
                                 null_cond=null, noise=z)
    assert apg.isfinite().all() and not torch.allclose(apg, cfg)
    with pytest.raises(ValueError):
        RectifiedFlow().sample(net, (b, 2), cond, steps=3, solver="rk4")


# -- DDPM -------------------------------------------------------------------------------------------
def test_linear_schedule_and_q_sample():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert torch.allclose(linear_betas(500), 2 * linear_betas(1000)[::2], rtol=0.01)
    x, noise, t = torch.randn(3, 4, 2), torch.randn(3, 4, 2), torch.tensor([0, 499, 999])
    abar = torch.tensor([math.prod(1 - b for b in d.betas[: i + 1].tolist()) for i in t.tolist()])
    want = abar.sqrt().view(-1, 1, 1) * x + (1 - abar).sqrt().view(-1, 1, 1) * noise
    assert torch.allclose(d.q_sample(x, t, noise), want.float(), atol=1e-5)
    assert torch.allclose(d.predict_xstart_from_eps(d.q_sample(x, t, noise), t, noise), x, atol=1e-3)


def test_q_posterior_matches_bayes_rule():
    d = GaussianDiffusion(num_timesteps=100)
    x0, xt, t = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([1, 40, 99])
    beta = d.betas[t].view(-1, 1)
    abar_prev = d.alphas_cumprod[t - 1].view(-1, 1)
    # q(x_{t-1}|x_0) = N(sqrt(abar') x0, 1-abar'), q(x_t|x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta)
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    mean = (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * xt / beta) / precision
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, t)
    assert torch.allclose(got_mean, mean.float(), atol=1e-5)
    assert torch.allclose(got_var, (1 / precision).float(), rtol=1e-5)
    assert torch.allclose(got_logvar, got_var.log(), atol=1e-5)
    _, var0, logvar0 = d.q_posterior_mean_variance(x0, xt, torch.zeros(3, dtype=torch.long))
    assert var0.abs().max() == 0 and torch.allclose(logvar0, d.posterior_variance[1].log().float())


def test_respacing_keeps_alphas_cumprod_and_original_timesteps():
    base = GaussianDiffusion()
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8] and len(space_timesteps(1000, 250)) == 250
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "2,3") == [0, 49, 50, 74, 99]  # Python round: 24.5 -> 24, as the reference
    chain = base.respace("250")
    assert chain.num_timesteps == 250 and chain.timestep_map[0] == 0 and chain.timestep_map[-1] == 999
    assert torch.allclose(chain.alphas_cumprod, base.alphas_cumprod[chain.timestep_map], rtol=1e-12)
    assert torch.equal(base.respace("250").respace("50").betas, base.respace("50").betas)
    seen = []

    def net(x, t, cond):
        seen.append(int(t[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=-1)

    base.sample(net, (2, 3), NONE, steps="10", sampler="ddpm")
    assert seen == sorted(space_timesteps(1000, "10"), reverse=True)


def test_kl_and_discretized_likelihood():
    m1, m2, l1, l2 = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    assert torch.allclose(normal_kl(m1, l1, m2, l2), ref, atol=1e-5)
    centers = torch.linspace(-1, 1, 256)  # the 256 bins tile the line: probabilities sum to one
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0)):
        ll = discretized_gaussian_log_likelihood(centers, torch.full_like(centers, mean),
                                                 torch.full_like(centers, log_scale))
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_hybrid_loss_vb_trains_only_the_variance():
    d = GaussianDiffusion(num_timesteps=50)
    x = torch.rand(6, 4, 3) * 2 - 1
    noise, t = torch.randn(6, 4, 3), torch.tensor([0, 1, 5, 20, 40, 49])
    out = torch.cat([torch.randn(6, 4, 3), torch.rand(6, 4, 3) * 2 - 1], dim=-1).requires_grad_(True)
    terms = d.training_losses(lambda *a: out, x, NONE, t=t, noise=noise)
    assert all(bool(v.isfinite().all()) and v.shape == (6,) for v in terms.values())
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    g_vb, = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[..., :3].abs().max() == 0 and g_vb[..., 3:].abs().max() > 0  # mean detached
    g_mse, = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[..., 3:].abs().max() == 0 and g_mse[..., :3].abs().max() > 0
    # exact epsilon and the posterior variance (v = -1): KL = 0 for t > 0, decoder NLL (> 0) at t = 0
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=-1)
    terms = d.training_losses(lambda *a: exact, x, NONE, t=t, noise=noise)
    assert terms["mse"].abs().max() < 1e-10 and terms["vb"][1:].abs().max() < 1e-4 and terms["vb"][0] > 0
    loss, metrics = d.loss(lambda *a: exact, x, NONE, t=t, noise=noise)
    assert loss.dim() == 0 and set(metrics) == {"mse", "vb"}
    with pytest.raises(ValueError):
        d.training_losses(lambda *a: noise, x, NONE, t=t, noise=noise)  # learn_sigma needs 2C channels
    images = torch.rand(2, 3, 4, 4) * 2 - 1  # (B, C, H, W) with epsilon | variance on dim 1
    out = torch.cat([torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)], dim=1)
    terms = GaussianDiffusion(num_timesteps=50, channel_dim=1).training_losses(lambda *a: out, images, NONE)
    assert all(bool(v.isfinite().all()) for v in terms.values())
    fixed = GaussianDiffusion(num_timesteps=50, learn_sigma=False).training_losses(lambda *a: noise, x, NONE,
                                                                                   t=t, noise=noise)
    assert set(fixed) == {"mse", "loss"} and fixed["loss"].abs().max() == 0


def test_ddpm_guidance_acts_on_epsilon_inside_the_interval():
    rows, null = [], Condition(labels=torch.zeros(1, dtype=torch.long))

    def net(x, t, cond):
        rows.append(len(x))
        lab = cond.labels.float().view(-1, 1)
        return torch.cat([0.1 * x + lab, 2 * lab.expand_as(x) - 1], dim=-1)  # v: +1 cond, -1 null

    cond = Condition(labels=torch.ones(3, dtype=torch.long))
    g = Guidance(scale=4.0, interval=(0.5, 1.0))
    out = GaussianDiffusion().sample(net, (3, 2), cond, steps="10", guidance=g, null_cond=null)
    assert rows == [6] * 5 + [3] * 5 and out.isfinite().all()  # kept 999 .. 555 guided, 444 .. 0 not
    chain, x = GaussianDiffusion().respace("10"), torch.randn(3, 2)
    p, _ = chain._predict(net, x, 9, cond, g, null, None)
    eps_c, eps_u = 0.1 * x + 1, 0.1 * x
    assert torch.allclose(p["eps"], eps_u + 4 * (eps_c - eps_u))  # guided epsilon
    # the variance comes from the conditional rows (v = +1: beta_t), not the guided mix
    assert torch.allclose(p["log_variance"], chain._get("log_betas", torch.full((3,), 9), x).expand(3, 2))
    # guided_channels (DiT's sample.py guides 3 of 4 latent channels): the rest of epsilon is conditional,
    # and respacing keeps the setting
    part = GaussianDiffusion(guided_channels=1).respace("10")
    p, _ = part._predict(net, x, 9, cond, g, null, None)
    assert torch.allclose(p["eps"][:, :1], (eps_u + 4 * (eps_c - eps_u))[:, :1])
    assert torch.allclose(p["eps"][:, 1:], eps_c[:, 1:])


MU_D, S_D = torch.tensor([0.5, -0.3]), torch.tensor([0.3, 0.8])  # DDPM target N(MU_D, S_D^2)


def exact_eps_net(chain: GaussianDiffusion):
    """Exact E[eps | x_t] for the DDPM target, plus the learned-range value of the exact reverse variance."""
    abar_all = GaussianDiffusion().alphas_cumprod
    keep = torch.tensor(chain.timestep_map)

    def net(x, t, cond):
        ab = abar_all[t].float().view(-1, 1)
        eps = (1 - ab).sqrt() / (ab * S_D ** 2 + 1 - ab) * (x - ab.sqrt() * MU_D)
        i = torch.searchsorted(keep, t)
        beta = chain.betas[i].view(-1, 1)
        ab_c, ab_p = chain.alphas_cumprod[i].view(-1, 1), chain.alphas_cumprod_prev[i].view(-1, 1)
        var_x0 = S_D.double() ** 2 * (1 - ab_c) / (ab_c * S_D.double() ** 2 + 1 - ab_c)
        true_var = beta * (1 - ab_p) / (1 - ab_c) + (beta * ab_p.sqrt() / (1 - ab_c)) ** 2 * var_x0
        lo = torch.log(torch.cat([chain.posterior_variance[1:2], chain.posterior_variance[1:]]))[i].view(-1, 1)
        v = 2 * (true_var.log() - lo) / (beta.log() - lo) - 1
        return torch.cat([eps, v.float().expand_as(x)], dim=-1)

    return net


def test_ddpm_and_ddim_samplers_reproduce_gaussian():
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(3))
    chain = GaussianDiffusion().respace("50")
    gen = torch.Generator().manual_seed(4)
    ddpm = chain.p_sample_loop(exact_eps_net(chain), z.shape, NONE, noise=z, generator=gen)
    ddim = chain.ddim_sample_loop(exact_eps_net(chain), z.shape, NONE, noise=z, eta=0.0)
    again = GaussianDiffusion().sample(exact_eps_net(chain), z.shape, NONE, steps="50", sampler="ddim", noise=z)
    assert torch.equal(ddim, again)  # eta = 0 is deterministic
    fine = GaussianDiffusion().respace("100")
    ddim_fine = fine.ddim_sample_loop(exact_eps_net(fine), z.shape, NONE, noise=z)

    def std_err(out):
        return ((out.std(0) - S_D) / S_D).abs().max().item()

    for out in (ddpm, ddim, ddim_fine):
        assert torch.allclose(out.mean(0), MU_D, atol=0.03)
    # exact epsilon + exact reverse variance: ancestral sampling is exact up to Monte Carlo (~0.5%)
    assert std_err(ddpm) < 0.03
    # DDIM (the probability-flow ODE, first order): ~8% low at 50 steps, ~4% at 100
    assert std_err(ddim) < 0.12 and std_err(ddim_fine) < 0.6 * std_err(ddim)


# -- guidance ---------------------------------------------------------------------------------------
class CountingNet:
    """A conditional toy network that records the rows of each call."""

    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, x, t, cond):
        self.rows.append(len(x))
        shift = cond.labels.float().view(-1, *([1] * (x.dim() - 1)))
        return x * (1 + t.float().view_as(shift)) + shift * torch.linspace(-1, 1, x.shape[-1])


def _rows():
    b = 4
    x, t = torch.randn(b, 3, 6), torch.rand(b)
    return x, t, Condition(labels=torch.arange(1, b + 1)), Condition(labels=torch.zeros(1, dtype=torch.long))


def test_cat_conditions_pads_text_and_broadcasts_null():
    a = Condition(labels=torch.tensor([3, 4]), text=torch.randn(2, 5, 8), extra={"k": torch.ones(2, 1)})
    b = Condition(labels=torch.tensor([0]), text=torch.zeros(1, 2, 8), text_mask=torch.tensor([[True, False]]),
                  extra={"k": torch.zeros(1, 1)})
    c = cat_conditions(a, b)
    assert c.labels.tolist() == [3, 4, 0, 0] and c.text.shape == (4, 5, 8) and c.extra["k"].shape == (4, 1)
    assert c.text_mask.tolist() == [[True] * 5] * 2 + [[True] + [False] * 4] * 2
    assert len(cat_conditions(NONE, NONE)) == 0
    with pytest.raises(ValueError):
        cat_conditions(a, Condition(labels=torch.tensor([0])))


def test_cfg_is_one_batched_call():
    x, t, cond, null = _rows()
    net = CountingNet()
    assert torch.equal(guided(net, x, t, cond, null, 1.0), CountingNet()(x, t, cond)) and net.rows == [4]
    net.rows.clear()
    out = guided(net, x, t, cond, null, Guidance(scale=3.0))
    assert net.rows == [8]  # one call on [cond; uncond]
    c, u = net(x, t, cond), net(x, t, Condition(labels=torch.zeros(4, dtype=torch.long)))
    assert torch.allclose(out, u + 3 * (c - u), atol=1e-5)
    with pytest.raises(ValueError):
        guided(net, x, t, cond, None, 2.0)


def test_guidance_interval_and_guided_channels():
    x, t, cond, null = _rows()
    net, g = CountingNet(), Guidance(scale=3.0, interval=(0.2, 0.6))
    c = net(x, t, cond)
    net.rows.clear()
    assert torch.equal(guided(net, x, t, cond, null, g, t_norm=0.9), c) and net.rows == [4]
    assert not torch.equal(guided(net, x, t, cond, null, g, t_norm=0.4), c) and net.rows == [4, 8]
    per_row = guided(net, x, t, cond, null, g, t_norm=torch.tensor([0.1, 0.3, 0.5, 0.9]))
    full = guided(net, x, t, cond, null, g, t_norm=0.4)
    assert torch.equal(per_row[[0, 3]], c[[0, 3]]) and torch.allclose(per_row[1:3], full[1:3])
    part = guided(net, x, t, cond, null, g, t_norm=0.4, guided_channels=2, channel_dim=-1)
    assert torch.allclose(part[..., :2], full[..., :2]) and torch.equal(part[..., 2:], c[..., 2:])


def test_apg_reduces_to_cfg_and_caps_the_update():
    x, t, cond, null = _rows()
    net = CountingNet()
    plain = guided(net, x, t, cond, null, Guidance(scale=4.0))
    apg = guided(net, x, t, cond, null, Guidance(scale=4.0, apg=True, momentum=0.0, norm_threshold=0.0, eta=1.0))
    assert torch.allclose(apg, plain, atol=1e-5)
    c, u = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    c_norm = c.flatten(1).norm(dim=1)
    for r in (0.1, 1.0):
        update = (apg_combine(c, u, 5.0, eta=1.0, norm_threshold=r) - c) / 4.0
        norms = update.flatten(1).norm(dim=1)
        assert bool((norms <= r + 1e-5).all())
    assert torch.allclose((apg_combine(c, u, 5.0, eta=1.0, norm_threshold=0.1) - c).flatten(1).norm(dim=1),
                          torch.full((3,), 0.4), atol=1e-5)  # (c - u) is far longer than 0.1: capped at r
    big = apg_combine(c, u, 5.0, eta=1.0, norm_threshold=1e6)
    assert torch.allclose(big, cfg_combine(c, u, 5.0), atol=1e-5)  # a loose cap changes nothing
    orth = apg_combine(c, u, 5.0, eta=0.0, norm_threshold=0.0) - c  # eta 0: orthogonal to cond
    assert ((orth.flatten(1) * c.flatten(1)).sum(1) / c_norm).abs().max() < 1e-4


def test_apg_momentum_buffer():
    buf = MomentumBuffer(-0.5)
    d1, d2 = torch.randn(2, 3), torch.randn(2, 3)
    buf.update(d1)
    assert torch.allclose(buf.update(d2), d2 - 0.5 * d1)
    c1, u1, c2, u2 = (torch.randn(2, 4) for _ in range(4))
    buf = MomentumBuffer(-0.5)
    apg_combine(c1, u1, 3.0, eta=1.0, buffer=buf)
    second = apg_combine(c2, u2, 3.0, eta=1.0, buffer=buf)
    assert torch.allclose(second, c2 + 2.0 * ((c2 - u2) - 0.5 * (c1 - u1)), atol=1e-5)
    g = Guidance(scale=3.0, apg=True)  # FlexTok's defaults
    assert (g.momentum, g.norm_threshold, g.eta) == (-0.5, 2.5, 0.0)
    with pytest.raises(ValueError):
        Guidance(interval=(0.8, 0.2))
