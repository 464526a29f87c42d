"""GPT / FAR generators (published sizes: test_models_registry.py): KV-cache decoding, causality, the FAR head's sub-code
order, guidance and seeded sampling."""
import copy
import pickle

import pytest
import torch

from vtok.models.api import Condition as C
from vtok.models.generators import GPT, GPTConfig, filter_logits, guidance_at, sample_logits
from vtok.models.layers import KVCache, rope_2d

def tiny(k: int = 1, **over) -> GPT:
    torch.manual_seed(0)
    cfg = dict(depth=2, dim=32, heads=4, vocab_sizes=(11,) * k, token_shape=(3, 4), num_classes=5,
               head_layers=1 if k > 1 else 0, dropout=0.0, token_dropout=0.0)
    model = GPT(GPTConfig(**{**cfg, **over})).eval()
    for out in model.out:  # zero-initialised: give the outputs something to say
        torch.nn.init.normal_(out.weight, std=0.5)
    return model


def random_codes(model: GPT, b: int = 3) -> torch.Tensor:
    return torch.randint(0, 11, (b, model.num_codebooks, *model.cfg.token_shape))


@pytest.mark.parametrize("prefix_rope", ["identity", "zero"])
@pytest.mark.parametrize("k", [1, 2])
def test_kv_cache_decoding_matches_full_forward(k, prefix_rope):
    model = tiny(k, prefix_rope=prefix_rope)
    codes, labels = random_codes(model), torch.tensor([0, 3, 4])
    full = model(codes, C(labels=labels))  # teacher-forced logits at every position
    flat = codes.flatten(2)
    caches = [KVCache(model.seq_len) for _ in model.layers]
    new = model.embed_labels(labels)
    for t in range(model.seq_len):
        h = model.trunk(new, start=t, caches=caches)
        step = model.head_logits(h, flat[:, :, t:t + 1])
        for j in range(k):
            torch.testing.assert_close(step[j][:, 0], full[j][:, t], atol=1e-5, rtol=1e-5)
        new = model.embed_codes(flat[:, :, t:t + 1])
    # a multi-token chunk after a cached prefix (offset causal mask) agrees too
    caches = [KVCache(model.seq_len) for _ in model.layers]
    x = torch.cat([model.embed_labels(labels), model.embed_codes(flat[:, :, :-1])], 1)
    a = model.trunk(x[:, :5], start=0, caches=caches)
    b = model.trunk(x[:, 5:], start=5, caches=caches)
    torch.testing.assert_close(torch.cat([a, b], 1), model.trunk(x), atol=1e-5, rtol=1e-5)


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = tiny(2)
    codes, labels = random_codes(model), torch.tensor([1, 2, 3])
    before = model(codes, C(labels=labels))
    changed = codes.clone().flatten(2)
    changed[:, :, 7:] = (changed[:, :, 7:] + 1) % 11
    after = model(changed.view_as(codes), C(labels=labels))
    for j in range(2):
        # the logits for token t depend on tokens < t only: positions < 7 are unchanged
        torch.testing.assert_close(before[j][:, :7], after[j][:, :7])
        assert not torch.allclose(before[j][:, 8:], after[j][:, 8:])
    # at position 7 the first sub-code sees nothing of token 7; the second sees its first sub-code
    torch.testing.assert_close(before[0][:, 7], after[0][:, 7])
    assert not torch.allclose(before[1][:, 7], after[1][:, 7])


def test_far_head_predicts_sub_codes_in_order():
    model = tiny(3)
    codes, labels = random_codes(model), torch.tensor([1, 2, 3])
    flat = codes.flatten(2)
    base = model(codes, C(labels=labels))
    for j in range(3):  # change sub-code j at every position (and keep the trunk input fixed)
        h = model.trunk(torch.cat([model.embed_labels(labels), model.embed_codes(flat[:, :, :-1])], 1))
        changed = flat.clone()
        changed[:, j] = (changed[:, j] + 1) % 11
        got = model.head_logits(h, changed)
        ref = model.head_logits(h, flat)
        for i in range(3):
            if i <= j:  # sub-codes up to j do not see sub-code j of the same position
                torch.testing.assert_close(got[i], ref[i])
            else:
                assert not torch.allclose(got[i], ref[i])
        torch.testing.assert_close(ref[0], base[0])


def test_guidance_one_equals_plain_conditional_sampling_and_seeds_reproduce():
    model = tiny(2)
    labels = torch.tensor([0, 4])

    def gen(seed, **kw):
        return model.generate(C(labels=labels), generator=torch.Generator().manual_seed(seed), **kw)

    cached = gen(7, guidance=1.0, top_k=5)
    plain = gen(7, guidance=1.0, top_k=5, use_cache=False)  # recompute the prefix every step
    assert torch.equal(cached, plain)
    assert cached.shape == (2, 2, 3, 4) and int(cached.max()) < 11
    assert torch.equal(gen(7, guidance=3.0), gen(7, guidance=3.0))
    assert not torch.equal(gen(7, guidance=3.0), gen(8, guidance=3.0))
    greedy = model.generate(C(labels=labels), temperature=0)
    assert torch.equal(greedy, model.generate(C(labels=labels), temperature=0))


def test_guided_logits_are_u_plus_s_times_c_minus_u():
    model = tiny(1)
    labels = torch.tensor([2])
    cond = model(torch.zeros(1, 1, 3, 4, dtype=torch.long), C(labels=labels))[0][:, 0]
    uncond = model(torch.zeros(1, 1, 3, 4, dtype=torch.long), C(labels=torch.tensor([model.null_class])))[0][:, 0]
    mixed = uncond + 4.0 * (cond - uncond)
    first = model.generate(C(labels=labels), guidance=4.0, temperature=0)[0, 0, 0, 0]
    assert int(first) == int(mixed.argmax())


def test_class_dropout_and_shape_errors():
    model = tiny(1, class_dropout=1.0).train()
    emb = model.embed_labels(torch.tensor([1, 2]), drop=True)
    torch.testing.assert_close(emb, model.cls_embed.weight[model.null_class].expand(2, 1, -1))
    with pytest.raises(ValueError, match="built for \\(1, 3, 4\\)"):
        model(torch.zeros(1, 1, 4, 4, dtype=torch.long), C(labels=torch.tensor([0])))
    with pytest.raises(ValueError, match="head_layers"):
        GPTConfig(vocab_sizes=(4, 4), head_layers=0)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # probs ~ .64 .24 .09 .03: top_p .8 keeps the first two
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert guidance_at(4.0, "linear", 0, 10) == 1.0 and guidance_at(4.0, "linear", 9, 10) == 4.0
    with pytest.raises(ValueError, match="schedule"):
        guidance_at(4.0, "cosine", 0, 10)


def test_sampler_draws_the_softmax_law_and_never_a_filtered_token():
    """The inverse-CDF draw (and the top-k-only fast path) follow softmax(logits / T) restricted to
    the kept tokens: 40,000 rows at once, frequencies within 0.01 of the law."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, float("-inf")]]).expand(40_000, -1)
    g = torch.Generator().manual_seed(0)
    for kw, law in (({}, logits[0].softmax(-1)),
                    ({"top_k": 2}, torch.tensor([2.0, 1.0]).softmax(-1)),
                    ({"top_p": 0.8}, torch.tensor([2.0, 1.0, 0.5]).softmax(-1)),
                    ({"temperature": 2.0}, (logits[0] / 2).softmax(-1))):
        draws = sample_logits(logits, generator=g, **kw)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        want = torch.zeros(5)
        want[:len(law)] = law
        assert (freq - want).abs().max() < 0.01, (kw, freq, want)
        assert int(freq[4]) == 0  # -inf is never drawn
    assert sample_logits(logits[:3], temperature=0).tolist() == [0, 0, 0]


def test_rope_2d_rotates_rows_and_columns_separately():
    table = rope_2d(2, 3, head_dim=8, prefix=1)
    assert table.shape == (7, 4, 2)
    torch.testing.assert_close(table[0], torch.tensor([[1.0, 0.0]] * 4))  # prefix: identity
    # position (0, c): the row pairs (first half) are unrotated, the column pairs rotate with c
    assert torch.allclose(table[1 + 2, :2, 0], torch.ones(2))
    assert not torch.allclose(table[1 + 2, 2:, 0], torch.ones(2))
    assert torch.allclose(table[1 + 3, 2:, 0], torch.ones(2))  # position (1, 0)


def llamagen_rope_2d(grid: int, head_dim: int, base: float, prefix: int) -> torch.Tensor:
    """LlamaGen's 2D table, from its description (autoregressive/models/gpt.py, precompute_freqs_cis_2d):
    half the head's pairs turn with the row and half with the column, at base^(-2i / (head_dim / 2));
    float32 throughout; ``prefix`` rows of zeros (cos 0, sin 0) first for the condition tokens."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    angles = torch.outer(torch.arange(grid).float(), freqs)
    grid_angles = torch.cat([angles[:, None].expand(-1, grid, -1), angles[None].expand(grid, -1, -1)], -1)
    table = torch.stack([grid_angles.cos(), grid_angles.sin()], -1).flatten(0, 1)
    return torch.cat([torch.zeros(prefix, half, 2), table])


def test_zero_prefix_rope_is_llamagens_table_and_changes_the_logits():
    """``prefix_rope="zero"``: the table equals LlamaGen's (the class token's query and key become
    zero); the default identity rows differ only in the prefix, and so do the logits."""
    for grid, head_dim, prefix in ((16, 64, 1), (3, 8, 120)):
        zero = rope_2d(grid, grid, head_dim, prefix=prefix, prefix_rows="zero")
        torch.testing.assert_close(zero, llamagen_rope_2d(grid, head_dim, 10000.0, prefix), atol=2e-6, rtol=0)
        ident = rope_2d(grid, grid, head_dim, prefix=prefix)
        assert torch.equal(ident[prefix:], zero[prefix:])
        assert torch.equal(ident[:prefix, :, 0], torch.ones(prefix, head_dim // 2))
    with pytest.raises(ValueError, match="prefix_rope"):
        GPTConfig(prefix_rope="zeros")
    a, b = tiny(), tiny(prefix_rope="zero")
    b.load_state_dict(a.state_dict())  # the tables are not weights: the same weights load either way
    codes, labels = random_codes(a), torch.tensor([0, 3, 4])
    assert not torch.allclose(a(codes, C(labels=labels))[0], b(codes, C(labels=labels))[0], atol=1e-4)


def test_generation_under_bf16_autocast_fills_a_bf16_cache():
    model = tiny(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.generate(C(labels=torch.tensor([1, 2])), guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 2, 3, 4) and 0 <= int(codes.min()) and int(codes.max()) < 11
    cache = KVCache(4)
    k = torch.randn(1, 2, 1, 8, dtype=torch.bfloat16)
    cache.append(k, k)
    assert cache.k.dtype == torch.bfloat16 and cache.k.shape == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_compiled_decode_step_samples_the_eager_tokens():
    """``generate(compile=True)`` (static KV cache + torch.compile) draws exactly the eager path's tokens
    for a fixed seed: plain GPT, FAR head with guidance, a padded caption with a 1D prefix of tokens,
    and under bf16 autocast."""
    cases = [(tiny(1), C(labels=torch.tensor([0, 4])), {}),
             (tiny(2), C(labels=torch.tensor([1, 2, 3])), {"guidance": 3.0, "top_k": 6}),
             (tiny(condition="text", text_len=6, text_dim=8, token_shape=(12,)),
              C(text=torch.randn(2, 6, 8), text_mask=torch.tensor([[True] * 4 + [False] * 2, [True] * 6])),
              {"guidance": 2.0, "num_tokens": 7})]
    for model, cond, kw in cases:
        for seed in (0, 1):
            eager = model.generate(cond, generator=torch.Generator().manual_seed(seed), **kw)
            compiled = model.generate(cond, generator=torch.Generator().manual_seed(seed), compile=True, **kw)
            assert torch.equal(eager, compiled), (model.cfg, seed)
    model, cond, kw = cases[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model.generate(cond, generator=torch.Generator().manual_seed(5), **kw)
        compiled = model.generate(cond, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    assert torch.equal(eager, compiled)
    # one compiled function serves every model with that model's own weights; nothing is stored on
    # the module, so it still deep-copies (EMA) and pickles
    other = tiny(1)
    torch.nn.init.normal_(other.layers[0].attn.qkv.weight, std=1.0)
    a = other.generate(cases[0][1], generator=torch.Generator().manual_seed(0), compile=True)
    assert torch.equal(a, other.generate(cases[0][1], generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, cases[0][0].generate(cases[0][1], generator=torch.Generator().manual_seed(0)))
    copy.deepcopy(other), pickle.dumps(other)
