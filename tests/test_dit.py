"""DiT: official parameter counts, adaLN-Zero init, 2D / 1D token modes, text cross-attention with
padding masks, REPA features, the rectified-flow sampler and classifier-free-guidance batching."""
import math

import pytest
import torch

from vtok.models.api import Condition
from vtok.models.generators import DiT, DiTConfig
from vtok.models.layers import sincos_2d
from vtok.models.registry import MODELS, build_model

PUBLISHED = {"dit-s-2": 32_963_360, "dit-b-2": 130_512_416, "dit-l-2": 458_102_816, "dit-xl-2": 675_129_632}


def official_count(depth: int, d: int, p: int, c: int = 4, side: int = 32, classes: int = 1000) -> int:
    """Parameters of facebookresearch/DiT's DiT(learn_sigma=True), by its layer layout."""
    h = 4 * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + (6 * d * d + 6 * d)
    final = d * p * p * 2 * c + p * p * 2 * c + 2 * d * d + 2 * d
    embed = (c * p * p * d + d) + (256 * d + d + d * d + d) + (classes + 1) * d + (side // p) ** 2 * d
    return embed + depth * block + final


def count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name).parameters())


def perturbed(model: DiT, seed: int = 0) -> DiT:
    """Break the zero init (adaLN-Zero, zero output) so outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts_exact_on_meta(name):
    got = count(name)
    assert abs(got - PUBLISHED[name]) / PUBLISHED[name] < 1e-3 and got == PUBLISHED[name], f"{got:,}"


@pytest.mark.parametrize("size", ["s", "b", "l", "xl"])
@pytest.mark.parametrize("patch", [4, 8])
def test_patch_4_and_8_counts_follow_the_official_layout(size, patch):
    name = f"dit-{size}-{patch}"
    cfg = MODELS[name].config
    assert cfg.patch_size == patch
    expected = official_count(cfg.depth, cfg.hidden, patch)
    assert MODELS[name].params == expected == count(name)


def test_fresh_dit_predicts_exactly_zero():
    for name in ("dit-tiny", "dit-tiny-1d", "dit-t2i-tiny"):
        model = build_model(name).eval()
        spec = model.token_spec
        x = torch.randn(3, *spec.shape)
        out = model(x, Condition(labels=torch.tensor([0, 1, 2])), torch.rand(3))
        assert out.shape[0] == 3 and out.abs().max() == 0  # adaLN-Zero + zero final layer (DiT)
        # learned sigma: 2C output channels (channel axis 1 in 2D, last in 1D)
        assert out.shape[1 if model.spatial else -1] == 2 * spec.dim


def test_sincos_2d_is_dits_layout():
    d, side = 16, 3
    table = sincos_2d(d, side)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    for row in range(side):
        for col in range(side):
            ex, ey = col * omega, row * omega  # first half: column (x), second half: row (y)
            expected = torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()]).float()
            torch.testing.assert_close(table[row * side + col], expected)


def test_float_time_is_scaled_to_dits_step_range():
    model = perturbed(build_model("dit-tiny"))
    x, cond = torch.randn(2, 4, 8, 8), Condition(labels=torch.tensor([3, 4]))
    a = model(x, cond, torch.tensor([0.25, 0.5]))
    b = model(x, cond, torch.tensor([250, 500]))  # integer DDPM steps, embedded as is
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(x, cond, torch.tensor([0.3, 0.5])))


def test_class_dropout_uses_the_null_class_only_in_training():
    model = perturbed(build_model("dit-tiny", class_dropout=1.0))
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    null = model(x, Condition(labels=torch.full((2,), 24)), t)
    labelled = model(x, Condition(labels=torch.tensor([1, 2])), t)
    assert not torch.allclose(null, labelled)
    torch.testing.assert_close(model(x, Condition(), t), null)  # no labels = unconditional
    model.train()
    torch.testing.assert_close(model(x, Condition(labels=torch.tensor([1, 2])), t), null)


def test_t2i_text_matters_and_masked_padding_does_not():
    model = perturbed(build_model("dit-t2i-tiny"))
    assert model.token_spec.condition == "text"
    torch.manual_seed(0)
    x, t = torch.randn(2, 32, 8), torch.rand(2)
    text = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    base = model(x, Condition(text=text, text_mask=mask), t)
    other = text.clone()
    other[:, :6] = torch.randn(2, 6, 32)
    assert not torch.allclose(base, model(x, Condition(text=other, text_mask=mask), t))
    padded = text.clone()
    padded[:, 6:] = torch.randn(2, 4, 32)
    torch.testing.assert_close(model(x, Condition(text=padded, text_mask=mask), t), base)
    torch.testing.assert_close(model(x, Condition(text=text[:, :6]), t), base)  # short caption = padded
    null = model(x, model.null_condition(2), t)
    torch.testing.assert_close(model(x, Condition(), t), null)  # no text = the learned null caption
    with pytest.raises(ValueError, match="text_len=16"):
        model(x, Condition(text=torch.randn(2, 17, 32)), t)


def test_1d_mode_shapes_and_generate():
    model = perturbed(build_model("dit-tiny-1d"))
    assert model.token_spec.shape == (32, 8) and model.token_spec.num_tokens == 32
    out = model(torch.randn(3, 32, 8), Condition(labels=torch.tensor([0, 1, 2])), torch.rand(3))
    assert out.shape == (3, 32, 16)
    with pytest.raises(ValueError, match="built for \\(32, 8\\)"):
        model(torch.randn(3, 16, 8), Condition(), torch.rand(3))
    sample = model.generate(Condition(labels=torch.tensor([0, 1])), steps=3, num_tokens=32)
    assert sample.shape == (2, 32, 8) and torch.isfinite(sample).all()


def test_repa_features_per_patch():
    model = perturbed(build_model("dit-tiny", repa_depth=1, repa_dim=24, repa_hidden=32))
    out, feats = model(torch.randn(2, 4, 8, 8), Condition(labels=torch.tensor([0, 1])), torch.rand(2))
    assert out.shape == (2, 8, 8, 8) and feats.shape == (2, model.num_patches, 24) == (2, 16, 24)
    (out.pow(2).mean() + feats.pow(2).mean()).backward()
    assert model.repa_projector[0].weight.grad.abs().sum() > 0
    with torch.device("meta"):
        proj = build_model("dit-xl-2", repa_depth=8, repa_dim=768).repa_projector  # REPA: 3 layers, hidden 2048
    assert [m.weight.shape for m in proj if hasattr(m, "weight")] == [(2048, 1152), (2048, 2048), (768, 2048)]
    with pytest.raises(ValueError, match="spatial tokens"):
        DiTConfig(token_mode="1d", patch_size=1, repa_depth=1, repa_dim=8)


def test_generate_is_seeded_and_shaped():
    model = perturbed(build_model("dit-tiny"))
    cond = Condition(labels=torch.tensor([1, 2, 3]))

    def sample(seed: int) -> torch.Tensor:
        return model.generate(cond, steps=4, guidance=2.0, generator=torch.Generator().manual_seed(seed))

    a = sample(0)
    assert a.shape == (3, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, sample(0)) and not torch.allclose(a, sample(1))
    assert not model.training


def test_euler_sampler_follows_the_rectified_flow():
    """With the exact velocity of a point mass at x0 (v = (x_t - x0) / t) Euler lands on x0."""
    model = build_model("dit-tiny").eval()
    x0 = torch.randn(2, 4, 8, 8)

    def exact(x, cond, t):
        v = (x - x0) / t.view(-1, 1, 1, 1)
        return torch.cat([v, torch.zeros_like(v)], 1)  # learned-sigma channels are ignored

    model.forward = exact
    out = model.generate(Condition(labels=torch.tensor([0, 1])), steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dit-tiny", "dit-t2i-tiny"])
def test_guidance_runs_one_forward_on_2b_rows(name):
    model = perturbed(build_model(name))
    rows: list[int] = []
    model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    if model.token_spec.condition == "text":
        cond = Condition(text=torch.randn(2, 5, 32), text_mask=torch.ones(2, 5, dtype=torch.bool))
    else:
        cond = Condition(labels=torch.tensor([4, 5]))
    g = torch.Generator().manual_seed(0)
    plain = model.generate(cond, steps=3, generator=g.manual_seed(0))
    assert rows == [2, 2, 2]
    rows.clear()
    guided = model.generate(cond, steps=3, guidance=4.0, generator=g.manual_seed(0))
    assert rows == [4, 4, 4] and not torch.allclose(plain, guided)
    # guidance mixes u + s (c - u): one-step check against two separate forwards
    x, t = torch.randn(2, *model.token_spec.shape), torch.full((2,), 0.7)
    c = model.prediction(model(x, cond, t))
    u = model.prediction(model(x, model.null_condition(2), t))
    torch.testing.assert_close(model.guided_prediction(x, cond, t, 4.0), u + 4.0 * (c - u), atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(guided.abs().max()))


@pytest.mark.parametrize("name", ["dit-tiny", "dit-tiny-1d"])
def test_diffusion_net_plugs_into_flow_and_ddpm(name):
    from vtok.models.diffusion import GaussianDiffusion, RectifiedFlow

    model = perturbed(build_model(name)).train()
    x, cond = torch.randn(2, *model.token_spec.shape), Condition(labels=torch.tensor([0, 1]))
    flow_loss, _ = RectifiedFlow().loss(model.diffusion_net(), x, cond)
    ddpm = GaussianDiffusion(channel_dim=model.channel_dim)
    ddpm_loss, _ = ddpm.loss(model.diffusion_net(learned_sigma=True), x, cond)
    (flow_loss + ddpm_loss).backward()
    assert torch.isfinite(flow_loss) and torch.isfinite(ddpm_loss)
    model.eval()
    sample = ddpm.sample(model.diffusion_net(learned_sigma=True), x.shape, cond, steps=3)
    assert sample.shape == x.shape and torch.isfinite(sample).all()
