"""Walk the model registry: full sizes build on meta with the published parameter counts; tiny
siblings run forward + backward on CPU."""
import pytest
import torch

from vtok.models.registry import MODELS, build_model
from vtok.models.tokenizers.fqgan import alignment_loss


TOKENIZERS = [n for n, e in MODELS.items() if e.kind == "tokenizer"]


@pytest.mark.parametrize("name", [n for n in MODELS if "tiny" not in n])
def test_full_size_builds_on_meta_with_published_count(name):
    with torch.device("meta"):
        model = build_model(name)
    count = sum(p.numel() for p in model.parameters())
    expected = MODELS[name].params
    if expected is not None:
        assert abs(count - expected) / expected < 0.02, f"{name}: {count:,} vs published {expected:,}"
    if MODELS[name].kind == "tokenizer":
        assert model.token_shape[1] in (16, 32)  # 256 px at x16 / x8
    else:  # generators: LlamaGen's 16x16 token grid of a 256 px image at x16
        assert model.seq_len == 256 and model.cfg.token_shape == (16, 16)


@pytest.mark.parametrize("name", [n for n in TOKENIZERS if "tiny" in n])
def test_tiny_sibling_forward_backward_encode_decode(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == x.shape
    loss = (out.reconstruction - x).pow(2).mean() + sum(out.quant.losses.values())
    for i, feat in out.aligned.items():
        loss = loss + alignment_loss(feat, torch.randn(2, feat.shape[1]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    model.eval()
    codes = model.encode(x)
    k = model.cfg.num_codebooks
    assert codes.shape == (2, k, 16, 16) and model.token_shape == (k, 16, 16)
    assert int(codes.max()) < model.vocab_sizes[0]
    assert model.decode(codes).shape == x.shape
    if k > 1:
        assert "disentangle" in out.quant.losses


def test_alignment_loss_falls_when_prediction_matches_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(8, 32)
    random_pred = torch.randn(8, 32)
    assert alignment_loss(teacher, teacher) < alignment_loss(random_pred, teacher)
    noisy = teacher + 0.5 * torch.randn(8, 32)
    assert alignment_loss(teacher, teacher) <= alignment_loss(noisy, teacher) < alignment_loss(random_pred, teacher)


def test_unknown_model_suggests():
    with pytest.raises(KeyError, match="did you mean 'fqgan-dual-f16'"):
        build_model("fqgan-dual-16")
