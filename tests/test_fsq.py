"""Finite scalar quantization (FlexTok's FSQ [8, 8, 8, 5, 5, 5])."""
import math

import pytest
import torch

from vtok.models.quant import FSQ
from vtok.models.quant.fsq import bound, codes_to_indices, indices_to_codes

LEVELS = (8, 8, 8, 5, 5, 5)


def test_every_id_round_trips_through_its_code():
    ids = torch.arange(math.prod(LEVELS))  # all 64,000 codes
    codes = indices_to_codes(ids, LEVELS)
    assert codes.shape == (64000, 6) and codes.dtype == torch.float32
    assert codes.min() == -1 and codes.max() <= 1
    assert torch.equal(codes_to_indices(codes, LEVELS), ids)
    assert len(torch.unique(codes, dim=0)) == 64000
    # per dimension: L values, spaced 2 / L (even) or 2 / (L - 1) (odd), starting at -1
    for i, level in enumerate(LEVELS):
        values = torch.unique(codes[:, i])
        assert len(values) == level and values[0] == -1
        torch.testing.assert_close(values.diff(), torch.full((level - 1,), 1.0 / (level // 2)))


def test_forward_quantizes_to_the_grid_and_reaches_every_level():
    fsq = FSQ(FSQ.Config())
    z = torch.randn(4, 256, 6) * 3
    out = fsq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (4, 256) and out.losses == {}
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < fsq.codebook_size == 64000
    torch.testing.assert_close(out.quantized, fsq.indices_to_codes(out.indices))
    for i, level in enumerate(LEVELS):  # large |z| saturates the tanh: both ends of each dim are reachable
        assert len(torch.unique(out.quantized[..., i])) == level
    centre = fsq(torch.zeros(1, 1, 6))  # z = 0 lands on code 0 in every dim (even L thanks to the shift)
    assert torch.equal(centre.quantized, torch.zeros(1, 1, 6))


def test_straight_through_gradient_is_the_bound_derivative():
    fsq = FSQ(FSQ.Config())
    z = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    fsq(z).quantized.sum().backward()
    lv = torch.tensor(LEVELS, dtype=torch.float32)
    zz = z.detach().float().requires_grad_(True)
    (bound(zz, LEVELS) / (lv // 2)).sum().backward()  # d/dz of the normalised bound
    assert (z.grad.abs() > 0).all()
    torch.testing.assert_close(z.grad.float(), zz.grad)
    half_l = (lv - 1) * (1 + 1e-3) / 2  # written out: tanh bound, shifted by half a level for even L
    shift = torch.atanh(torch.where(lv % 2 == 0, 0.5, 0.0) / half_l)
    expected = half_l * (1 - torch.tanh(z.detach().float() + shift) ** 2) / (lv // 2)
    torch.testing.assert_close(z.grad.float(), expected)


def test_fp32_under_autocast_and_usage_metrics():
    fsq = FSQ(FSQ.Config(levels=(4, 3)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(torch.randn(2, 5, 2).bfloat16())
    assert out.quantized.dtype == torch.float32
    every = fsq(torch.tensor([[[-9.0, -9.0], [9.0, 9.0]]]))  # two extreme codes
    assert every.metrics["usage"].item() == pytest.approx(2 / 12)
    assert every.metrics["perplexity"].item() == pytest.approx(2.0)
    one = fsq(torch.zeros(1, 10, 2))
    assert one.metrics["usage"].item() == pytest.approx(1 / 12)
    assert one.metrics["perplexity"].item() == pytest.approx(1.0)
