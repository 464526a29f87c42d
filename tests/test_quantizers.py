"""l2-normalised VQ and the factorized quantizer (FQGAN)."""
import math

import pytest
import torch
import torch.nn.functional as F

from vtok.models.quant import FactorizedQuantizer, L2VectorQuantizer
from vtok.models.quant.base import code_usage
from vtok.models.quant.factorized import disentanglement_loss
from vtok.models.quant.vq import entropy_loss


def small_vq(**kw) -> L2VectorQuantizer:
    torch.manual_seed(0)
    return L2VectorQuantizer(L2VectorQuantizer.Config(codebook_size=64, dim=8, **kw))


def test_indices_in_range_codes_unit_norm_and_nearest():
    vq = small_vq()
    z = torch.randn(2, 8, 4, 4)
    out = vq(z)
    assert out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.long
    assert 0 <= out.indices.min() and out.indices.max() < 64
    assert out.quantized.shape == z.shape
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 4, 4))
    torch.testing.assert_close(out.quantized, vq.lookup(out.indices))
    # nearest code on the sphere
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    assert torch.equal(torch.cdist(flat, vq.codes()).argmin(-1), out.indices.reshape(-1))


def test_straight_through_gradient_reaches_the_encoder():
    vq = small_vq()
    encoder = torch.nn.Conv2d(3, 8, 1)
    out = vq(encoder(torch.randn(2, 3, 4, 4)))
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert vq.codebook.weight.grad.abs().sum() > 0  # codebook learns through its own loss


def test_losses_weights_and_fp32_under_autocast():
    vq = small_vq(commitment=0.25, entropy_weight=0.03)
    z = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
    assert out.quantized.dtype == torch.float32
    assert set(out.losses) == {"vq_codebook", "vq_commit", "vq_entropy"}
    torch.testing.assert_close(out.losses["vq_commit"], 0.25 * out.losses["vq_codebook"].detach(),
                               rtol=1e-2, atol=1e-4)
    vq.eval()
    assert "vq_entropy" not in vq(z).losses


def test_usage_and_perplexity_on_hand_made_indices():
    m = code_usage(torch.tensor([0, 0, 1, 1]), codebook_size=4)
    assert m["usage"] == 0.5 and m["perplexity"] == pytest.approx(2.0)
    m = code_usage(torch.arange(8), codebook_size=8)
    assert m["usage"] == 1.0 and m["perplexity"] == pytest.approx(8.0)
    m = code_usage(torch.zeros(10, dtype=torch.long), codebook_size=8)
    assert m["usage"] == 1 / 8 and m["perplexity"] == pytest.approx(1.0)


def test_entropy_loss_prefers_confident_and_diverse():
    diverse = torch.eye(4) * 20  # each sample sure of a different code
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 20  # everyone picks code 0
    unsure = torch.zeros(4, 4)  # uniform per sample
    assert entropy_loss(diverse) < entropy_loss(unsure) and entropy_loss(diverse) < entropy_loss(collapsed)
    assert entropy_loss(diverse) == pytest.approx(-math.log(4), abs=1e-3)


def test_disentanglement_zero_for_orthogonal_positive_otherwise_and_formula():
    a = torch.zeros(1, 4, 2, 2)
    b = torch.zeros(1, 4, 2, 2)
    a[:, 0], b[:, 1] = 1.0, 1.0
    assert disentanglement_loss([a, b]) == 0.0
    assert disentanglement_loss([a, a]) == pytest.approx(1.0)
    torch.manual_seed(1)
    x, y, z = (torch.randn(2, 8, 3, 3) for _ in range(3))
    cos2 = lambda p, q: (F.cosine_similarity(p, q, dim=1) ** 2).mean()  # noqa: E731
    expected = (cos2(x, y) + cos2(x, z) + cos2(y, z)) / 3  # triple: average over the pairs
    torch.testing.assert_close(disentanglement_loss([x, y, z]), expected)
    assert disentanglement_loss([x, y]) > 0


def test_factorized_quantizer_concatenates_heads():
    torch.manual_seed(0)
    fq = FactorizedQuantizer(FactorizedQuantizer.Config(
        num_codebooks=3, vq=L2VectorQuantizer.Config(codebook_size=32, dim=8), disentangle_weight=0.1))
    zs = [torch.randn(2, 8, 4, 4, requires_grad=True) for _ in range(3)]
    out = fq(zs)
    assert out.quantized.shape == (2, 24, 4, 4) and out.indices.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out.quantized, fq.lookup(out.indices))
    expected = 0.1 * disentanglement_loss([out.quantized[:, 8 * i:8 * (i + 1)] for i in range(3)])
    torch.testing.assert_close(out.losses["disentangle"], expected)
    assert {"usage_0", "usage_1", "usage_2", "perplexity_2"} <= set(out.metrics)
    sum(out.losses.values()).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zs)
    with pytest.raises(ValueError, match="expected 3 factor features, got 2"):
        fq(zs[:2])
