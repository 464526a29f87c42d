"""FlexTok model: the encoder's prefix-LM mask, nested dropout in the decoder, the flow objective,
decoding (with APG) and the encoder / decoder parameter split of the published sizes."""
import pytest
import torch

from vtok.models.diffusion import Guidance, RectifiedFlow
from vtok.models.registry import MODELS, build_model
from vtok.models.tokenizers.flextok import README_GUIDANCE, FlexTok, powers_of_two, sample_keep_k


def tiny(seed: int = 0, **overrides) -> FlexTok:
    """The tiny FlexTok with every parameter nudged, so zero-initialised heads / gates pass signal."""
    torch.manual_seed(seed)
    model = build_model("flextok-tiny", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def latents(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_register_sees_only_earlier_registers_and_patches_never_see_registers():
    model = tiny()
    enc, patches = model.encoder, model.patchify(latents())
    p, r = enc.num_patches, enc.num_registers
    with torch.no_grad():
        before = enc.hidden(patches)
        i = 5
        enc.registers[i + 1:] += torch.randn(r - i - 1, enc.registers.shape[1])  # change later registers
        after = enc.hidden(patches)
        torch.testing.assert_close(after[:, :p + i + 1], before[:, :p + i + 1], rtol=0, atol=1e-6)
        assert (after[:, p + i + 1:] - before[:, p + i + 1:]).abs().amax() > 1e-3
        enc.registers.copy_(torch.randn_like(enc.registers))  # change every register
        torch.testing.assert_close(enc.hidden(patches)[:, :p], before[:, :p], rtol=0, atol=1e-6)
        # ... while every register depends on the patches
        moved = enc.hidden(patches + 1.0)[:, p:] - enc.hidden(patches)[:, p:]
        assert (moved.flatten(2).abs().amax(-1) > 1e-4).all()
    mask = enc.attention_mask("cpu")
    assert not mask[:p, p:].any() and mask[p:, :p].all()
    assert torch.equal(mask[p:, p:], torch.ones(r, r, dtype=torch.bool).tril())


def test_registers_at_or_after_keep_k_have_no_effect_on_the_decoder():
    model = tiny()
    b, k = 2, 6
    x_t, t = latents(b, 2), torch.tensor([0.3, 0.8])
    codes = model.quantizer.indices_to_codes(torch.randint(0, 1000, (b, 16)))
    other = codes.clone()
    other[:, k:] = model.quantizer.indices_to_codes(torch.randint(0, 1000, (b, 16 - k)))
    keep = torch.full((b,), k)
    with torch.no_grad():
        v1, _ = model.velocity(x_t, t, codes, keep)
        v2, _ = model.velocity(x_t, t, other, keep)
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)
        changed = codes.clone()
        changed[:, k - 1] = -changed[:, k - 1] + 0.5  # a kept register does matter
        assert (model.velocity(x_t, t, changed, keep)[0] - v1).abs().amax() > 1e-4
        # masked registers hold the bare mask token (positions come before nested dropout, as the
        # official decoder); keep_k = 0 is the null condition: the null token everywhere, codes ignored
        regs = model.decoder.embed_registers(codes, keep)
        assert torch.equal(regs[:, k:], model.decoder.mask_token.expand(b, 16 - k, -1))
        regs0 = model.decoder.embed_registers(codes, torch.zeros(b, dtype=torch.long))
        assert torch.equal(regs0, model.decoder.null_token.expand(b, 16, -1))
        null = model.null_condition(b)
        v_null, _ = model.velocity(x_t, t, null.extra["codes"], null.extra["keep_k"])
        torch.testing.assert_close(model.velocity(x_t, t, codes, torch.zeros(b, dtype=torch.long))[0], v_null,
                                   rtol=0, atol=0)
        # a prefix of codes (R' < R) is the same as masked padding
        torch.testing.assert_close(model.velocity(x_t, t, codes[:, :k], keep)[0], v1, rtol=0, atol=1e-6)


def test_training_forward_is_the_flow_loss_and_fresh_model_predicts_zero():
    model = build_model("flextok-tiny")
    x = latents(3)
    out = model(x, keep_k=torch.tensor([1, 4, 16]), t=torch.tensor([0.1, 0.5, 0.9]), noise=torch.randn_like(x))
    assert torch.equal(out.prediction, torch.zeros_like(x))  # zero-initialised adaLN + output layer
    model = tiny().train()
    keep, t, noise = torch.tensor([1, 4, 16]), torch.tensor([0.1, 0.5, 0.9]), torch.randn_like(x)
    out = model(x, keep_k=keep, t=t, noise=noise)
    assert out.prediction.shape == x.shape and out.quant.indices.shape == (3, 16)
    assert out.quant.quantized.shape == (3, 16, 4) and out.repa is None
    torch.testing.assert_close(out.target, noise - x)
    net, cond = model.diffusion_net(), model.condition(out.quant.quantized, keep)
    loss, _ = RectifiedFlow().loss(net, x, cond, t=t, noise=noise)
    torch.testing.assert_close(out.losses["flow"], loss)
    out.losses["flow"].backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0  # straight-through FSQ reaches the encoder
    drawn = model(x).keep_k  # training mode draws keep_k per image
    assert drawn.shape == (3,) and 0 <= int(drawn.min()) and int(drawn.max()) <= 16


def test_nested_dropout_modes_and_injected_randomness():
    def draw(mode, **kw):
        return sample_keep_k(4000, 256, mode, generator=torch.Generator().manual_seed(0), **kw)
    assert powers_of_two(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256] and powers_of_two(12)[-1] == 12
    u = draw("uniform")
    assert int(u.min()) == 1 and int(u.max()) == 256 and len(torch.unique(u)) > 200
    assert set(draw("pow2").tolist()) == set(powers_of_two(256))
    up = draw("uniform_pow2")
    assert set(up.tolist()) <= set(powers_of_two(256)) and (up == 256).float().mean() > 0.45  # half of 1..256
    assert torch.equal(draw("uniform"), u)  # seeded generator: reproducible
    assert torch.equal(draw("none"), torch.full((4000,), 256))
    null_rate = (draw("pow2", null_prob=0.1) == 0).float().mean().item()
    assert 0.07 < null_rate < 0.13


def test_encode_decode_shapes_prefixes_and_apg():
    model = tiny()
    spec = model.token_spec
    assert spec.shape == (1, 16) and spec.vocab_sizes == (1000,) and spec.ordered and spec.variable_length
    assert spec.resolution == 64 and spec.downsample == 0 and model.input_shape == (4, 8, 8)
    x = latents(2)
    patches = model.patchify(x)
    assert patches.shape == (2, 16, 16) and torch.equal(model.unpatchify(patches), x)
    torch.testing.assert_close(patches[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # (p, q, C)
    tokens = model.encode(x)
    assert tokens.shape == (2, 1, 16) and tokens.dtype == torch.long and int(tokens.max()) < 1000
    out = model.decode(tokens, steps=4)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(model.decode(tokens, steps=4), out)  # seeded noise: reproducible
    prefix = model.decode(tokens[..., :4], steps=4)  # 4 tokens = the first 4 of 16, the rest masked
    torch.testing.assert_close(model.decode(tokens, num_tokens=4, steps=4), prefix)
    torch.testing.assert_close(model.decode(tokens[:, 0, :4], steps=4), prefix)
    assert (prefix - out).abs().amax() > 1e-4
    apg = model.decode(tokens, steps=4, guidance=README_GUIDANCE)
    cfg = model.decode(tokens, steps=4, guidance=Guidance(scale=3.0))
    assert torch.isfinite(apg).all() and torch.isfinite(cfg).all() and (apg - out).abs().amax() > 1e-5
    with pytest.raises(ValueError, match="latents of shape"):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="num_tokens"):
        model.decode(tokens[..., :4], num_tokens=5)


def test_repa_features_come_from_the_chosen_decoder_block():
    model = tiny(repa_depth=1, repa_dim=12, repa_hidden=32).train()
    out = model(latents(2))
    assert out.repa.shape == (2, 16, 12)  # one feature per 2x2 patch of the 8x8 latent
    with pytest.raises(ValueError, match="repa_depth"):
        build_model("flextok-tiny", repa_depth=3, repa_dim=8)


@pytest.mark.parametrize("name, encoder, decoder", [("flextok-d12-d12", 85.19e6, 172.25e6),
                                                    ("flextok-d18-d28", 287.03e6, 2169.28e6)])
def test_published_encoder_and_decoder_split(name, encoder, decoder):
    with torch.device("meta"):
        model = build_model(name)
    count = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("encoder", "decoder")}
    assert abs(count["encoder"] - encoder) / encoder < 0.01 and abs(count["decoder"] - decoder) / decoder < 0.01
    assert sum(p.numel() for p in model.parameters()) == sum(count.values())  # FSQ has no parameters
    assert MODELS[name].params is not None


def test_export_without_the_null_token_fails_in_one_line_naming_file_keys_and_fix(tmp_path):
    """Exports written before the learned null token (``decoder.null_token``) conditioned the decoder
    differently (null = every register masked, masked registers kept their positions), so they are
    refused, not loaded with a made-up null token; a complete export still loads."""
    from safetensors.torch import load_file, save_file

    from vtok.models.export import ExportError, load_export, save_export

    model = tiny()
    weights = save_export(tmp_path / "tok", model, "flextok-tiny", meta={"vae": "identity", "source": "image"})
    loaded = load_export(tmp_path / "tok", "tokenizer").model
    torch.testing.assert_close(loaded.decoder.null_token, model.decoder.null_token)
    state = load_file(str(weights))
    del state["decoder.null_token"]
    save_file(state, str(weights))
    with pytest.raises(ExportError) as err:
        load_export(tmp_path / "tok", "tokenizer")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{weights}: missing keys: 1 ('decoder.null_token')"), msg
    assert "`vtok export RECIPE --out DIR`" in msg and "retrain" in msg
