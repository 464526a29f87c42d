"""TexTok (text-conditioned ViT tokenizer / detokenizer), its no-text baseline, the registry entries,
and the StyleGAN discriminator with the R1 penalty."""
import math

import pytest
import torch
from torch import nn

from vtok.config import RecipeError
from vtok.losses.adversarial import DISCRIMINATORS, Adversarial, AdversarialConfig
from vtok.losses.stylegan_disc import StyleGANDiscriminator, minibatch_stddev, r1_penalty
from vtok.models.api import Condition, Tokenizer
from vtok.models.registry import MODELS, build_model
from vtok.models.tokenizers.textok import TexTok, TexTokOutput, patchify, unpatchify

TEXTOK_B = 175_338_440  # 256 px, patch 8, N = 128, T5-XL (2048): both ViT-Bs + embeddings + heads


def tiny(name: str = "textok-tiny", seed: int = 0) -> TexTok:
    torch.manual_seed(seed)
    return build_model(name).eval()


def caption(b: int = 2, length: int = 6, dim: int = 32, real: tuple[int, ...] = (4, 6), seed: int = 1) -> Condition:
    """Random T5-like embeddings (b, length, dim); row i has ``real[i]`` real tokens, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, length, dim, generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(real)[:, None]
    return Condition(text=text, text_mask=mask)


def images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1


def test_text_reaches_both_sides_and_padding_reaches_neither():
    model, x, cond = tiny(), images(), caption()
    tokens = model.encode(x, cond)
    rec = model.decode(tokens, cond)
    assert tokens.shape == (2, 32, 8) and rec.shape == (2, 3, 64, 64)

    changed = Condition(text=cond.text.clone(), text_mask=cond.text_mask)
    changed.text[0, 1] += 1.0  # one real caption position of sample 0 only
    tokens2 = model.encode(x, changed)
    assert (tokens2[0] - tokens[0]).abs().max() > 1e-4  # the tokenizer reads the caption
    assert torch.equal(tokens2[1], tokens[1])  # and only its own sample's
    rec2 = model.decode(tokens, changed)  # same tokens, other caption
    assert (rec2[0] - rec[0]).abs().max() > 1e-4 and torch.equal(rec2[1], rec[1])

    padded = Condition(text=cond.text.clone(), text_mask=cond.text_mask)
    padded.text[0, 4:] = 100 * torch.randn(2, 32)  # sample 0's padded positions only
    assert torch.equal(model.encode(x, padded), tokens)
    assert torch.equal(model.decode(tokens, padded), rec)

    # padding == truncation; a mask of ints / all ones == no mask
    short = Condition(text=cond.text[:1, :4], text_mask=None)
    torch.testing.assert_close(model.encode(x[:1], short), tokens[:1], atol=1e-5, rtol=1e-5)
    full = Condition(text=cond.text, text_mask=torch.ones(2, 6, dtype=torch.int64))
    assert torch.equal(model.encode(x, full), model.encode(x, Condition(text=cond.text)))


def test_no_text_baseline_is_the_same_class_and_ignores_conditions():
    text_model, base = tiny(), tiny("textok-tiny-notext")
    assert type(base) is type(text_model) is TexTok and MODELS["textok-tiny-notext"].model is TexTok
    assert base.encoder.text_proj is None and base.decoder.text_proj is None
    assert base.token_spec.condition == "none" and text_model.token_spec.condition == "text"
    assert isinstance(base, Tokenizer) and isinstance(text_model, Tokenizer)
    # the baseline has exactly the text model's parameters minus the two text projections
    n_proj = 2 * (32 * 64 + 64)
    assert sum(p.numel() for p in base.parameters()) + n_proj == sum(p.numel() for p in text_model.parameters())

    x = images(3)
    tokens = base.encode(x)
    assert tokens.shape == (3, 32, 8) and tokens.dtype == torch.float32
    assert torch.equal(base.encode(x, caption(3, real=(1, 2, 6))), tokens)
    rec = base.decode(tokens)
    assert rec.shape == (3, 3, 64, 64) and torch.equal(base.decode(tokens, caption(3, real=(6, 6, 6))), rec)
    out = base(x)
    assert isinstance(out, TexTokOutput) and out.reconstruction.shape == x.shape


def test_text_model_asks_for_its_condition_in_one_line():
    model, x = tiny(), images()
    for cond in (None, Condition(labels=torch.tensor([0, 1]))):
        with pytest.raises(RecipeError, match=r"pass Condition\(text=.*text_dim=0") as err:
            model.encode(x, cond)
        assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="expects \\(2, L, 32\\)"):
        model.encode(x, caption(dim=16))
    with pytest.raises(RecipeError, match="text_mask of shape"):
        model.encode(x, Condition(text=caption().text, text_mask=torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(RecipeError, match="pass --resolution 64"):
        model.encode(images(size=32), caption())
    with pytest.raises(ValueError, match="decodes \\(B, 32, 8\\)"):
        model.decode(torch.zeros(2, 16, 8), caption())


def test_training_forward_sends_gradients_through_text_on_both_sides():
    model = tiny().train()
    out = model(images(), caption())
    assert isinstance(out, TexTokOutput) and out.tokens.shape == (2, 32, 8)
    out.reconstruction.square().mean().backward()
    for proj in (model.encoder.text_proj, model.decoder.text_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert model.encoder.image_tokens.grad.abs().sum() > 0 and model.decoder.mask_token.grad.abs().sum() > 0
    assert len(model.blocks()) == 4


def test_patchify_round_trip():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 16, 48) and torch.equal(p[0, 1], x[0, :, :4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(p, 4, 4), x)


def test_textok_b_exact_count_and_every_entry_builds_on_meta():
    with torch.device("meta"):
        model = build_model("textok-b-256-n128")
    count = sum(p.numel() for p in model.parameters())
    assert count == TEXTOK_B == MODELS["textok-b-256-n128"].params
    assert abs(count - 176e6) / 176e6 < 0.01  # the paper's "~176M"
    assert sum(p.numel() for p in model.encoder.vit.layers.parameters()) == 12 * 7_087_872  # ViT-B blocks

    names = sorted(n for n in MODELS if n.startswith("textok-"))
    expected = {f"textok-b-{r}-n{n}" for r, ns in ((256, (32, 64, 128, 256)), (512, (32, 128))) for n in ns}
    expected |= {"textok-tiny"}
    assert set(names) == expected | {f"{n}-notext" for n in expected}
    for name in names:
        entry = MODELS[name]
        with torch.device("meta"):
            m = build_model(name)
        spec, cfg = m.token_spec, entry.config
        assert type(m) is TexTok and spec.shape == (cfg.num_tokens, 8) and spec.dim == 8 and not spec.discrete
        assert spec.condition == ("none" if name.endswith("-notext") else "text")
        if "tiny" not in name:
            resolution = int(name.split("-")[2])
            assert spec.resolution == resolution and cfg.patch_size == resolution // 32
            assert cfg.text_dim == (0 if name.endswith("-notext") else {256: 2048, 512: 4096}[resolution])
            assert (cfg.width, cfg.depth, cfg.heads) == (768, 12, 12)


# -- StyleGAN discriminator and R1 ---------------------------------------------------------------------
@pytest.mark.parametrize("size,blocks", [(16, 2), (32, 3)])
def test_stylegan_disc_shapes_on_cpu(size, blocks):
    torch.manual_seed(0)
    disc = DISCRIMINATORS["stylegan"](8, blocks)
    assert isinstance(disc, StyleGANDiscriminator) and disc.resolution == size
    out = disc(torch.randn(3, 3, size, size))  # 3 samples: mbstd groups of 3
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=f"takes {size} px; set the GAN config.s layers"):
        disc(torch.randn(2, 3, 2 * size, 2 * size))


def test_stylegan_disc_textok_layout_at_256_on_meta():
    with torch.device("meta"):
        disc = StyleGANDiscriminator(128, 6)
        out = disc(torch.empty(4, 3, 256, 256))
    assert out.shape == (4, 1)
    assert [b.conv2.out_channels for b in disc.blocks] == [128, 256, 512, 512, 512, 512]
    assert disc.fc.in_features == 512 * 16


def test_minibatch_stddev_by_hand():
    x = torch.randn(4, 2, 3, 3)
    y = minibatch_stddev(x, group_size=2)  # groups {0, 2} and {1, 3}
    assert y.shape == (4, 3, 3, 3) and torch.equal(y[:, :2], x)
    hand = ((x[0] - x[2]) / 2).square().add(1e-8).sqrt().mean()  # population std of two samples
    torch.testing.assert_close(y[0, 2], hand.expand(3, 3))
    torch.testing.assert_close(y[2, 2], hand.expand(3, 3))


class Quadratic(nn.Module):
    """D(x) = 0.5 * w * ||x||^2 per sample, so grad_x D = w * x."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w * x.flatten(1).square().sum(1, keepdim=True)


def test_r1_penalty_equals_the_analytic_gradient_norm():
    x = torch.randn(3, 3, 4, 4)
    disc = Quadratic(1.5)
    r1 = r1_penalty(disc, x)
    hand = (1.5 ** 2) * x.flatten(1).square().sum(1).mean()  # E ||w x||^2
    torch.testing.assert_close(r1, hand)
    r1.backward()  # d/dw (w^2 E||x||^2) = 2 w E||x||^2: the penalty trains the discriminator
    torch.testing.assert_close(disc.w.grad, 2 * 1.5 * x.flatten(1).square().sum(1).mean())
    assert not x.requires_grad  # the caller's tensor is untouched

    torch.manual_seed(0)
    sg = StyleGANDiscriminator(8, 2).double()
    xd = x.double().expand(3, 3, 4, 4).repeat(1, 1, 4, 4).clone()  # 16 px
    xg = xd.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sg(xg).sum(), xg)
    torch.testing.assert_close(r1_penalty(sg, xd), grad.square().sum() / 3)
    v = torch.randn_like(xd)  # the gradient is the true one: central difference along v
    eps = 1e-5
    fd = (sg(xd + eps * v).sum() - sg(xd - eps * v).sum()) / (2 * eps)
    torch.testing.assert_close(fd, (grad * v).sum(), rtol=1e-5, atol=1e-7)


def test_adversarial_helper_adds_r1_when_weighted():
    torch.manual_seed(0)
    real, fake = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    cfg = dict(disc="stylegan", loss="non_saturating", ndf=8, layers=2)
    plain, with_r1 = Adversarial(AdversarialConfig(**cfg)), Adversarial(AdversarialConfig(**cfg, r1_weight=10.0))
    with_r1.discriminator.load_state_dict(plain.discriminator.state_dict())
    d0, m0 = plain.discriminator_loss(plain.discriminator, real, regenerate=lambda: fake)
    d1, m1 = with_r1.discriminator_loss(with_r1.discriminator, real, regenerate=lambda: fake)
    assert "r1" not in m0 and m1["r1"] > 0
    torch.testing.assert_close(m1["r1"], r1_penalty(with_r1.discriminator, real).detach())
    torch.testing.assert_close(d1 - d0, 5.0 * m1["r1"])  # gamma / 2 with gamma = 10
    d1.backward()
    grads = [p.grad for p in with_r1.discriminator.parameters()]
    assert all(g is not None for g in grads) and not real.requires_grad
    assert math.isfinite(float(d1.detach()))
