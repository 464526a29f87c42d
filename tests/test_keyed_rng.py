"""Per-sample keyed draws: the same numbers for a sample whatever batch, position or rank it is in."""
import torch

from vtok.train.keyed_rng import KeyedDraws, sample_seed


def test_draws_follow_the_sample_not_the_batch():
    keys = [f"k{i}" for i in range(8)]
    whole = KeyedDraws(keys, step=3, seed=1)
    a, b = KeyedDraws(keys[:4], 3, 1), KeyedDraws(keys[4:][::-1], 3, 1)
    full_u, full_n = whole.uniform(), whole.normal((2, 3))
    halves_u = torch.cat([a.uniform(), b.uniform().flip(0)])
    halves_n = torch.cat([a.normal((2, 3)), b.normal((2, 3)).flip(0)])
    assert torch.equal(full_u, halves_u) and torch.equal(full_n, halves_n)
    assert full_n.shape == (8, 2, 3) and full_u.shape == (8,)


def test_draws_change_with_step_seed_and_key():
    base = KeyedDraws(["a", "b"], 0, 0).normal((4,))
    assert not torch.equal(base, KeyedDraws(["a", "b"], 1, 0).normal((4,)))
    assert not torch.equal(base, KeyedDraws(["a", "b"], 0, 1).normal((4,)))
    assert not torch.equal(base[0], base[1])
    assert sample_seed("a", 0, 0) == sample_seed("a", 0, 0) < 2 ** 63
    ints = KeyedDraws([str(i) for i in range(200)], 0).integers(2)
    assert ints.dtype == torch.int64 and set(ints.tolist()) == {0, 1}
