"""``vtok import``: released-checkpoint layouts -> vtok exports, against fixtures listing the official
key names and shapes at tiny sizes (tests/fixtures/official_keys, written by tools/official_keys.py
from the official model classes)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vtok.cli import main
from vtok.importers import (ImporterError, ImportOptions, expected_official, get_importer, import_checkpoint,
                            read_checkpoint)
from vtok.importers.flextok import NULL_KEY, M, half_swap, official_sincos
from vtok.models.export import load_export
from vtok.models.layers.adaln import sincos_2d
from vtok.models.registry import build_model

FIXTURES = Path(__file__).parent / "fixtures" / "official_keys"
KINDS = {"dit": ("dit_tiny", "dit-tiny"), "flextok": ("flextok_tiny", "flextok-tiny"),
         "llamagen-gpt": ("llamagen_gpt_tiny", "gpt-tiny"), "llamagen-vq": ("llamagen_vq_tiny", "vqgan-tiny"),
         "far": ("far_dual_tiny", "far-dual-tiny")}
# config the tiny entries differ in from the official models
RECOGNISED = {"llamagen-gpt": {"prefix_rope": "zero"}, "far": {"prefix_rope": "zero", "head_rope": "trunk"}}
SIZE = ["--image-size", "128"]  # LlamaGen GPTs: the token grid (128 / 16 = gpt-tiny's 8x8); others ignore it


def fixture(kind: str) -> dict:
    return json.loads((FIXTURES / f"{KINDS[kind][0]}.json").read_text())


def official_state(kind: str, seed: int = 0, keys: dict | None = None) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout of the fixture (fixed tables hold their values)."""
    g = torch.Generator().manual_seed(seed)
    keys = keys or fixture(kind)["keys"]
    state = {k: torch.randn(*shape, generator=g) for k, shape in keys.items()}
    if kind == "flextok":
        for k in (M["enc_pos"] + ".posembs", M["dec_pos"] + ".posembs"):
            _, d, h, w = state[k].shape
            state[k] = official_sincos(d, h, w)
    return state


def one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vtok: error: "), err
    return err


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fixture_is_the_official_layout_of_the_tiny_entry(kind):
    data, (_, arch) = fixture(kind), KINDS[kind]
    assert data["vtok_arch"] == arch and data["commit"]
    imp, model = get_importer(kind), build_model(arch)
    weights, _ = imp.split(official_state(kind))  # LlamaGen's VQ: less its codebook-usage buffer
    assert expected_official(imp, model) == {k: tuple(v.shape) for k, v in weights.items()}
    assert imp.recognise(weights) == (arch, RECOGNISED.get(kind, {}))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mapping_round_trips_exactly_both_ways(kind):
    imp, model = get_importer(kind), build_model(KINDS[kind][1])
    official, _ = imp.split(official_state(kind))
    vtok = imp.to_vtok(official, model)
    assert {k: tuple(v.shape) for k, v in vtok.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    back = imp.to_official(vtok, model)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
    fresh = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    again = imp.to_vtok(imp.to_official(fresh, model), model)
    assert again.keys() == fresh.keys() and all(torch.equal(again[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_import_writes_an_export_holding_the_source_weights(kind, tmp_path):
    official = official_state(kind, seed=1)
    path = tmp_path / "released.safetensors"
    save_file(official, str(path))
    result = import_checkpoint(kind, path, tmp_path / "export", ImportOptions(image_size=128))
    exp = load_export(tmp_path / "export")
    assert exp.arch == KINDS[kind][1] and result.arch == exp.arch
    imp = get_importer(kind)
    mapped_back = imp.to_official(exp.model.state_dict(), exp.model)
    assert all(torch.equal(mapped_back[k], official[k]) for k in imp.split(official)[0])
    if kind == "dit":  # a pure renaming: every vtok tensor IS a source tensor
        sd = exp.model.state_dict()
        assert torch.equal(sd["layers.1.mlp.0.weight"], official["blocks.1.mlp.fc1.weight"])
        assert torch.equal(sd["y_embedder.weight"], official["y_embedder.embedding_table.weight"])
        assert torch.equal(sd["x_embedder.weight"], official["x_embedder.proj.weight"])
        assert exp.meta["diffusion"]["objective"] == "ddpm" and exp.meta["diffusion"]["learn_sigma"]
        assert exp.meta["diffusion"]["guided_channels"] == 3  # DiT's sample.py guides 3 of the 4 channels
        assert exp.token_spec.shape == (4, 8, 8) and exp.resolution == 64 and exp.meta["latent_scaling"] == 0.18215
    elif kind == "flextok":
        assert exp.meta["latent_shape"] == [4, 8, 8] and exp.token_spec.ordered
    elif kind == "llamagen-vq":
        assert result.checkpoint.dropped == {"codebook usage": 1} and exp.token_spec.vocab_sizes == (256,)
        assert exp.resolution == 128 and exp.model.cfg.image_size == 128  # --image-size
    else:
        k = len(exp.model.cfg.vocab_sizes)
        assert exp.model.cfg.prefix_rope == "zero" and exp.token_spec.shape == (k, 8, 8)
        assert exp.meta["imported"]["overrides"] == RECOGNISED[kind] and exp.meta["tokenizer"] == ""


def test_dit_training_checkpoint_picks_ema_unless_no_ema(tmp_path, capsys):
    ema, raw = official_state("dit", seed=2), official_state("dit", seed=3)
    path = tmp_path / "0001000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", image_size=256)}, path)
    assert main(["import", "dit", str(path), "--out", str(tmp_path / "e")]) == 0
    assert "'ema' entry" in capsys.readouterr().out
    sd = load_export(tmp_path / "e").model.state_dict()
    assert torch.equal(sd["layers.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    assert main(["import", "dit", str(path), "--out", str(tmp_path / "m"), "--no-ema"]) == 0
    sd = load_export(tmp_path / "m").model.state_dict()
    assert torch.equal(sd["layers.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])
    # the released DiT-XL-2-*.pt files are raw state dicts (EMA weights): taken as they are
    torch.save(ema, tmp_path / "raw.pt")
    assert read_checkpoint(tmp_path / "raw.pt").picked == ""


def test_other_sizes_are_recognised_and_refused_in_one_line(tmp_path, capsys):
    wide = build_model("dit-tiny", hidden=96)  # the official layout of a width-96 DiT (no registered size)
    keys = expected_official(get_importer("dit"), wide)
    path = tmp_path / "wide.safetensors"
    save_file(official_state("dit", keys=keys), str(path))
    err = one_line_error(capsys, "import", "dit", str(path), "--out", str(tmp_path / "x"))
    assert "depth 2, width 96, patch 2" in err and "not a registered size" in err
    tiny = tmp_path / "tiny.safetensors"
    save_file(official_state("dit"), str(tiny))
    err = one_line_error(capsys, "import", "dit", str(tiny), "--out", str(tmp_path / "y"), "--arch", "dit-xl-2")
    assert "is dit-tiny" in err and "not dit-xl-2" in err
    # FlexTok: a decoder one block deeper is d2-d3, which vtok does not register
    state = official_state("flextok")
    prefix = M["dec_tf"] + ".blocks."
    state.update({k.replace(prefix + "1.", prefix + "2."): v.clone() for k, v in state.items()
                  if k.startswith(prefix + "1.")})
    save_file(state, str(tmp_path / "deep.safetensors"))
    err = one_line_error(capsys, "import", "flextok", str(tmp_path / "deep.safetensors"), "--out", str(tmp_path / "z"))
    assert "FlexTok d2-d3" in err and "not a registered size" in err


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_missing_extra_and_misshaped_keys_are_named_in_one_line(kind, tmp_path, capsys):
    state = official_state(kind)
    victim = sorted(k for k in state if "attn.proj.weight" in k or "attention.wo" in k or "attn.0.v.weight" in k)[-1]
    extra = "encoder.module_dict.enc_extra.weight" if kind == "flextok" else "blocks.0.extra.weight"
    for name, change in (("missing", lambda s: s.pop(victim)),
                         ("unmapped", lambda s: s.__setitem__(extra, torch.zeros(2))),
                         ("mis-shaped", lambda s: s.__setitem__(victim, torch.zeros(3, 5)))):
        broken = dict(state)
        change(broken)
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path))
        err = one_line_error(capsys, "import", kind, str(path), "--out", str(tmp_path / name), *SIZE)
        said = "shape mismatches: 1" if name == "mis-shaped" else f"{name} keys: 1"
        assert said in err and (extra if name == "unmapped" else victim) in err


def test_bad_file_wrong_kind_and_unknown_kind_are_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert "not a readable" in one_line_error(capsys, "import", "dit", str(junk), "--out", str(tmp_path / "a"))
    dit = tmp_path / "dit.safetensors"
    save_file(official_state("dit"), str(dit))
    assert "not a FlexTok checkpoint" in one_line_error(capsys, "import", "flextok", str(dit), "--out",
                                                         str(tmp_path / "b"))
    assert "unknown import kind 'vqgan'" in one_line_error(capsys, "import", "vqgan", str(dit), "--out",
                                                            str(tmp_path / "c"))
    assert "not found" in one_line_error(capsys, "import", "dit", str(tmp_path / "nope.pt"), "--out",
                                         str(tmp_path / "d"))


def test_flextok_sincos_facts_vae_keys_and_a_foreign_table(tmp_path, capsys):
    # the official table is vtok's (DiT's) transposed: row index first; hence the half-swap basis change
    d, g = 64, 4
    official = official_sincos(d, g, g)[0].permute(1, 2, 0).reshape(g * g, d)
    vtok = sincos_2d(d, g)
    assert torch.allclose(official, vtok.reshape(g, g, d).transpose(0, 1).reshape(g * g, d), atol=1e-6)
    assert torch.allclose(official[:, torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])], vtok, atol=1e-6)
    state = official_state("flextok")
    state["vae.vae.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(state, str(tmp_path / "with_vae.safetensors"))
    result = import_checkpoint("flextok", tmp_path / "with_vae.safetensors", tmp_path / "e", ImportOptions())
    assert result.checkpoint.dropped == {"vae": 1} and result.meta["imported"]["left_out"] == {"vae": 1}
    key = M["enc_pos"] + ".posembs"
    state[key] = state[key].transpose(2, 3).contiguous()  # vtok's own layout is not the official one
    save_file(state, str(tmp_path / "foreign.safetensors"))
    err = one_line_error(capsys, "import", "flextok", str(tmp_path / "foreign.safetensors"), "--out",
                         str(tmp_path / "f"))
    assert "fixed tables that differ" in err and key in err


@pytest.mark.parametrize("kind,arch,overrides", [
    ("dit", "dit-xl-2", {}), ("dit", "dit-xl-2", {"input_size": 64}), ("dit", "dit-b-4", {}),
    ("flextok", "flextok-d12-d12", {}), ("flextok", "flextok-d18-d28", {}),
    ("llamagen-gpt", "gpt-b", {"prefix_rope": "zero"}), ("llamagen-gpt", "gpt-3b", {"prefix_rope": "zero"}),
    ("llamagen-vq", "vqgan-f16", {}), ("llamagen-vq", "vqgan-f8", {}),
    ("far", "far-b-dual", RECOGNISED["far"]), ("far", "far-l-triple", RECOGNISED["far"])])
def test_released_sizes_are_recognised_from_shapes(kind, arch, overrides):
    """Full sizes on the meta device: DiT-XL/2 at 256 and 512 px (the released files), FlexTok sizes."""
    imp = get_importer(kind)
    with torch.device("meta"):
        model = build_model(arch, **overrides)
        state = {k: torch.empty(shape) for k, shape in expected_official(imp, model).items()}
    assert imp.recognise(state) == (arch, overrides)


def test_flextok_registers_null_and_output_head_follow_the_official_semantics(tmp_path):
    """The official decoder's register path and output head, re-implemented on the official keys:
    Linear(codes) + register positions, then MaskedNestedDropout (positions >= k hold the bare mask
    token), then the null condition (LearnedNullCond: nullcond at every position); the head's
    Fp32LayerNorm has eps 1e-5. vtok after import agrees, up to the half-swap basis change."""
    official = official_state("flextok", seed=4)
    save_file(official, str(tmp_path / "released.safetensors"))
    import_checkpoint("flextok", tmp_path / "released.safetensors", tmp_path / "export")
    dec = load_export(tmp_path / "export").model.decoder
    perm, b, k, d = half_swap(64), 2, 5, 64
    codes = torch.randn(b, 16, 4, generator=torch.Generator().manual_seed(5))
    h = F.linear(codes, official[M["dec_codes"] + ".proj.weight"], official[M["dec_codes"] + ".proj.bias"])
    h = h + official[M["dec_regpos"] + ".posembs"][0, 0].t()
    h[:, k:] = official[M["dec_mask"] + ".dropout_mask_token"]
    with torch.no_grad():
        torch.testing.assert_close(dec.embed_registers(codes, torch.full((b,), k)), h[..., perm])
        null = dec.embed_registers(codes, torch.zeros(b, dtype=torch.long))
        torch.testing.assert_close(null, official[NULL_KEY].expand(b, 16, d)[..., perm])
        # output head on a stream of tiny variance, where eps 1e-5 vs 1e-6 shows
        x, c = 1e-3 * torch.randn(b, 16, d), torch.randn(b, d)
        o = M["dec_head"] + "."
        shift, scale = F.linear(F.silu(c), official[o + "adaLN_modulation.1.weight"],
                                official[o + "adaLN_modulation.1.bias"]).chunk(2, -1)
        normed = F.layer_norm(x, (d,), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]
        ref = F.linear(normed, official[o + "proj.weight"], official[o + "proj.bias"])
        torch.testing.assert_close(dec.final_layer(x[..., perm], c), ref, rtol=1e-4, atol=1e-4)
    # ZeroNullCond (no nullcond key): the null condition is zeros at every register
    del official[NULL_KEY]
    save_file(official, str(tmp_path / "zero_null.safetensors"))
    import_checkpoint("flextok", tmp_path / "zero_null.safetensors", tmp_path / "zero")
    assert torch.equal(load_export(tmp_path / "zero").model.decoder.null_token, torch.zeros(d))


def llamagen_rope_table(grid: int, head_dim: int) -> torch.Tensor:
    """LlamaGen's ``precompute_freqs_cis_2d`` with one class token: a zero row, then the (row, col)
    grid; (1 + grid^2, head_dim / 2, 2) of (cos, sin)."""
    q4 = head_dim // 4  # rotated pairs per axis
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2)[:q4].float() / (head_dim // 2)))
    angles = torch.arange(grid).float()[:, None] * freqs  # (grid, head_dim / 4)
    grid_angles = torch.cat([angles[:, None].expand(-1, grid, -1), angles[None].expand(grid, -1, -1)], -1)
    table = torch.stack([grid_angles.cos(), grid_angles.sin()], -1).flatten(0, 1)
    return torch.cat([torch.zeros(1, head_dim // 2, 2), table])


def llamagen_blocks(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, heads: int,
                    table: torch.Tensor) -> torch.Tensor:
    """LlamaGen's TransformerBlocks ``prefix``0.. on x (B, N, D), causal: RMSNorm -> wqkv split q | k | v
    -> pair-wise rotation by ``table`` (N, hd / 2, 2) -> SDPA -> wo; RMSNorm -> w2(silu(w1) * w3)."""
    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    b, n, d = x.shape
    hd = d // heads

    def rotate(t):  # (b, n, heads, hd)
        p = t.reshape(b, n, heads, hd // 2, 2)
        c, s_ = table[None, :n, None, :, 0], table[None, :n, None, :, 1]
        return torch.stack([p[..., 0] * c - p[..., 1] * s_, p[..., 1] * c + p[..., 0] * s_], -1).flatten(3)

    depth = len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    for i in range(depth):
        L = f"{prefix}{i}."
        q, k, v = F.linear(rms(x, sd[L + "attention_norm.weight"]), sd[L + "attention.wqkv.weight"]).split(d, -1)
        q, k = rotate(q.view(b, n, heads, hd)), rotate(k.view(b, n, heads, hd))
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.view(b, n, heads, hd).transpose(1, 2), is_causal=True)
        x = x + F.linear(att.transpose(1, 2).reshape(b, n, d), sd[L + "attention.wo.weight"])
        h = rms(x, sd[L + "ffn_norm.weight"])
        x = x + F.linear(F.silu(F.linear(h, sd[L + "feed_forward.w1.weight"])) * F.linear(h, sd[L + "feed_forward.w3.weight"]),
                         sd[L + "feed_forward.w2.weight"])
    return x


def llamagen_reference_logits(sd: dict[str, torch.Tensor], seq: torch.Tensor, labels: torch.Tensor, heads: int,
                              grid: int) -> torch.Tensor:
    """LlamaGen's c2i forward written out on the official keys (autoregressive/models/gpt.py, eval):
    [class | tokens[:-1]] -> blocks with the zero-row 2D table -> RMSNorm -> output."""
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None],
                   sd["tok_embeddings.weight"][seq[:, :-1]]], 1)
    table = llamagen_rope_table(grid, x.shape[-1] // heads)
    x = llamagen_blocks(x, sd, "layers.", heads, table)
    return F.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * sd["norm.weight"], sd["output.weight"])


def far_reference_logits(sd: dict[str, torch.Tensor], codes: torch.Tensor, labels: torch.Tensor, heads: int,
                         grid: int) -> list[torch.Tensor]:
    """FQGAN's FAR forward written out on the official keys (far_dual.py / far_triple.py, eval): the
    sub-code embeddings concatenated -> aggregation_layer; the trunk as LlamaGen's; per position the head
    runs over [h_t, e_1(c_t1), ..] rotated by the trunk table's first k rows; norm; output_J."""
    k = codes.shape[1]
    emb = torch.cat([sd[f"tok_embeddings_{j + 1}.weight"][codes[:, j]] for j in range(k)], -1)
    agg = F.linear(emb, sd["aggregation_layer.weight"], sd["aggregation_layer.bias"])
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None], agg[:, :-1]], 1)
    b, n, d = x.shape
    table = llamagen_rope_table(grid, d // heads)
    h = llamagen_blocks(x, sd, "layers.", heads, table)
    ctx = torch.stack([h] + [sd[f"tok_embeddings_{j + 1}.weight"][codes[:, j]] for j in range(k - 1)], 2)
    ctx = llamagen_blocks(ctx.reshape(b * n, k, d), sd, "ar_head.", heads, table[:k]).view(b, n, k, d)
    ctx = ctx * torch.rsqrt(ctx.pow(2).mean(-1, keepdim=True) + 1e-5) * sd["norm.weight"]
    return [F.linear(ctx[:, :, j], sd[f"output_{j + 1}.weight"]) for j in range(k)]


def test_llamagen_gpt_import_gives_llamagens_logits_and_sizes_its_grid_from_the_name(tmp_path, capsys):
    from vtok.models.api import Condition

    official = {k: v * 0.2 for k, v in official_state("llamagen-gpt", seed=6).items()}
    path = tmp_path / "c2i_tiny_128.pt"  # released names carry the image size (c2i_B_256.pt, c2i_XL_384.pt)
    torch.save({"model": official, "optimizer": {}, "steps": 7, "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    assert main(["import", "llamagen-gpt", str(path), "--out", str(tmp_path / "e")]) == 0
    assert "'model' entry" in capsys.readouterr().out
    gpt = load_export(tmp_path / "e").model
    g = torch.Generator().manual_seed(7)
    codes, labels = torch.randint(0, 16384, (3, 1, 8, 8), generator=g), torch.tensor([0, 5, 24])  # 24: null
    with torch.no_grad():
        ours = gpt(codes, Condition(labels=labels))[0]
    ref = llamagen_reference_logits(official, codes.flatten(1), labels, heads=4, grid=8)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # the same weights with vtok's own (identity) class-token rows give other logits: the switch matters
    plain = build_model("gpt-tiny").eval()
    plain.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        assert (plain(codes, Condition(labels=labels))[0] - ref).abs().max() > 1e-2
    # --image-size wins over the name; neither is one line asking for the flag
    assert main(["import", "llamagen-gpt", str(path), "--out", str(tmp_path / "big"), "--image-size", "384"]) == 0
    assert load_export(tmp_path / "big").model.cfg.token_shape == (24, 24)
    save_file(official, str(tmp_path / "gpt.safetensors"))
    err = one_line_error(capsys, "import", "llamagen-gpt", str(tmp_path / "gpt.safetensors"), "--out", str(tmp_path / "x"))
    assert "--image-size" in err
    err = one_line_error(capsys, "import", "llamagen-gpt", str(tmp_path / "gpt.safetensors"), "--out", str(tmp_path / "x"),
                         "--image-size", "100")
    assert "not a multiple of 16" in err


def test_llamagen_gpt_t2i_gqa_and_foreign_tokenizers_are_refused_in_one_line(tmp_path, capsys):
    from vtok.models.export import save_export

    official = official_state("llamagen-gpt")
    t2i = {**official, "cls_embedding.cap_proj.fc1.weight": torch.zeros(128, 2048)}
    save_file(t2i, str(tmp_path / "t2i_128.safetensors"))
    assert "t2i" in one_line_error(capsys, "import", "llamagen-gpt", str(tmp_path / "t2i_128.safetensors"),
                                   "--out", str(tmp_path / "a"))
    gqa = {**official, "layers.0.attention.wqkv.weight": torch.zeros(256, 128)}
    save_file(gqa, str(tmp_path / "gqa_128.safetensors"))
    assert "grouped-query" in one_line_error(capsys, "import", "llamagen-gpt", str(tmp_path / "gqa_128.safetensors"),
                                             "--out", str(tmp_path / "b"))
    save_file(official, str(tmp_path / "c2i_128.safetensors"))
    save_export(tmp_path / "vq256", build_model("vqgan-tiny"), "vqgan-tiny")  # 256 codes, not 16,384
    err = one_line_error(capsys, "import", "llamagen-gpt", str(tmp_path / "c2i_128.safetensors"), "--out",
                         str(tmp_path / "c"), "--tokenizer", str(tmp_path / "vq256"))
    assert "--tokenizer" in err and "[256]" in err


def test_imported_llamagen_gpt_samples_through_the_imported_vq_it_records(tmp_path):
    """The small-sample version of the reproduction path: vtok import llamagen-vq and llamagen-gpt
    --tokenizer -> vtok sample --npz (tiny weights); the VQ's l2-normalised lookup is LlamaGen's."""
    import numpy as np
    from vtok.models.quant import L2VectorQuantizer

    imp = get_importer("llamagen-vq")
    vq = build_model("vqgan-tiny", vq=L2VectorQuantizer.Config(codebook_size=16384, dim=8))
    official = {k: torch.randn_like(v) for k, v in imp.to_official(vq.state_dict(), vq).items()}
    official["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"model": official, "optimizer": {}, "steps": 3}, tmp_path / "vq_ds4_tiny.pt")
    assert main(["import", "llamagen-vq", str(tmp_path / "vq_ds4_tiny.pt"), "--out", str(tmp_path / "vq")]) == 0
    tok = load_export(tmp_path / "vq")
    codes = torch.randint(0, 16384, (2, 1, 4, 4))
    want = F.normalize(official["quantize.embedding.weight"], dim=-1)[codes[:, 0]].permute(0, 3, 1, 2)
    assert torch.allclose(tok.model.quantizer.lookup(codes), want, atol=1e-6)
    save_file(official_state("llamagen-gpt", seed=8), str(tmp_path / "c2i_tiny_128.safetensors"))
    assert main(["import", "llamagen-gpt", str(tmp_path / "c2i_tiny_128.safetensors"), "--out", str(tmp_path / "gpt"),
                 "--tokenizer", str(tmp_path / "vq")]) == 0
    assert load_export(tmp_path / "gpt").meta["tokenizer"] == str((tmp_path / "vq").resolve())
    assert main(["sample", "--generator", str(tmp_path / "gpt"), "--out", str(tmp_path / "s"), "--classes", "3,7",
                 "--per-class", "1", "--npz", "--guidance", "2.0"]) == 0
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("name,arch", [("fqgan_dual_f16", "fqgan-dual-f16"), ("fqgan_triple_f16", "fqgan-triple-f16")])
def test_fqgan_fixtures_are_the_released_layouts(name, arch):
    """The released FQGAN-Dual / Triple x16 layouts (showlab/FQGAN on the meta device) are vtok's
    registry sizes exactly, and are recognised from their shapes."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["vtok_arch"] == arch and data["commit"]
    imp = get_importer("fqgan")
    with torch.device("meta"):
        model = build_model(arch)
        state = {k: torch.empty(shape) for k, shape in data["keys"].items()}
    weights, dropped = imp.split(state)
    assert dropped == {"codebook usage": model.cfg.num_codebooks}
    assert expected_official(imp, model) == {k: tuple(v.shape) for k, v in weights.items()}
    assert imp.recognise(weights) == (arch, {})


def fqgan_official(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A random FQGAN state dict in the official layout at a tiny size (plus the usage buffers)."""
    imp, model = get_importer("fqgan"), build_model(arch)
    g = torch.Generator().manual_seed(seed)
    official = {k: torch.randn(v.shape, generator=g) for k, v in imp.to_official(model.state_dict(), model).items()}
    suffixes = ("vis", "sem") if model.cfg.num_codebooks == 2 else ("vis", "sem_mid", "sem_high")
    official.update({f"quantize_{s}.codebook_used": torch.zeros(65536) for s in suffixes})
    return official


@pytest.mark.parametrize("arch", ["fqgan-dual-tiny", "fqgan-triple-tiny"])
def test_fqgan_import_round_trips_and_reads_the_official_names(arch, tmp_path, capsys):
    official = fqgan_official(arch, seed=10)
    assert official["encoder.visual_head.0.transformer.0.attn.in_proj_weight"].shape[0] == 3 * 64
    head = "feat_pred_head" if "dual" in arch else "high_sem_feat_pred"
    assert official[f"{head}.class_embedding"].dim() == 2  # (1, W) officially; vtok's cls is (1, 1, W)
    torch.save({"model": official, "optimizer": {}, "steps": 1}, tmp_path / "fqgan.pt")
    assert main(["import", "fqgan", str(tmp_path / "fqgan.pt"), "--out", str(tmp_path / "e")]) == 0
    exp = load_export(tmp_path / "e")
    assert exp.arch == arch and exp.meta["imported"]["left_out"] == {"codebook usage": exp.model.cfg.num_codebooks}
    imp = get_importer("fqgan")
    back = imp.to_official(exp.model.state_dict(), exp.model)
    weights, _ = imp.split(official)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    # trained without representation supervision: no feature heads, imported with align = {}
    bare = {k: v for k, v in official.items() if "feat_pred" not in k}
    torch.save({"model": bare}, tmp_path / "bare.pt")
    assert main(["import", "fqgan", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "b")]) == 0
    assert load_export(tmp_path / "b").model.cfg.align == {}
    # each kind names the other
    torch.save({"model": official_state("llamagen-vq")}, tmp_path / "vq.pt")
    assert "llamagen-vq" in one_line_error(capsys, "import", "fqgan", str(tmp_path / "vq.pt"), "--out", str(tmp_path / "x"))
    assert "FQGAN" in one_line_error(capsys, "import", "llamagen-vq", str(tmp_path / "fqgan.pt"), "--out",
                                     str(tmp_path / "y"))


def test_fqgan_adapter_is_multihead_attention_blocks_on_the_official_keys():
    """An FQGAN factor adapter as the official code runs it (torch's nn.MultiheadAttention, LayerNorm
    eps 1e-5, exact GELU, positions then ln_pre ... ln_post over the H*W grid) on the official keys,
    against vtok's adapter after the mapping."""
    official = fqgan_official("fqgan-dual-tiny", seed=11)
    model = build_model("fqgan-dual-tiny").eval()
    model.load_state_dict(get_importer("fqgan").to_vtok(get_importer("fqgan").split(official)[0], model))
    p = "encoder.semantic_head.0."
    w = official[p + "ln_pre.weight"].shape[0]
    x = torch.randn(2, w, 16, 16, generator=torch.Generator().manual_seed(12))
    seq = x.flatten(2).transpose(1, 2) + official[p + "positional_embedding"]
    seq = F.layer_norm(seq, (w,), official[p + "ln_pre.weight"], official[p + "ln_pre.bias"])
    layers = len({k.split(".")[4] for k in official if k.startswith(p + "transformer.")})
    for i in range(layers):
        L = f"{p}transformer.{i}."
        mha = torch.nn.MultiheadAttention(w, model.cfg.adapter_heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": official[L + "attn.in_proj_weight"],
                             "in_proj_bias": official[L + "attn.in_proj_bias"],
                             "out_proj.weight": official[L + "attn.out_proj.weight"],
                             "out_proj.bias": official[L + "attn.out_proj.bias"]})
        h = F.layer_norm(seq, (w,), official[L + "ln_1.weight"], official[L + "ln_1.bias"])
        seq = seq + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(seq, (w,), official[L + "ln_2.weight"], official[L + "ln_2.bias"])
        h = F.gelu(F.linear(h, official[L + "mlp.c_fc.weight"], official[L + "mlp.c_fc.bias"]))
        seq = seq + F.linear(h, official[L + "mlp.c_proj.weight"], official[L + "mlp.c_proj.bias"])
    seq = F.layer_norm(seq, (w,), official[p + "ln_post.weight"], official[p + "ln_post.bias"])
    with torch.no_grad():
        ours = model.heads[1][0](x)  # heads: [vis, sem]
    torch.testing.assert_close(ours, seq.transpose(1, 2).reshape_as(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture_name,arch", [("far_dual_tiny", "far-dual-tiny"), ("far_triple_tiny", "far-triple-tiny")])
def test_far_import_gives_fqgans_logits(fixture_name, arch, tmp_path):
    """FAR-dual and FAR-triple (official layout from the fixture, random weights) through vtok import far
    give the written-out official forward's logits for every sub-code; vtok's own head RoPE (1D over
    the k head positions) would not."""
    from vtok.models.api import Condition

    data = json.loads((FIXTURES / f"{fixture_name}.json").read_text())
    assert data["vtok_arch"] == arch and data["commit"]
    g = torch.Generator().manual_seed(13)
    official = {k: torch.randn(*shape, generator=g) * 0.2 for k, shape in data["keys"].items()}
    torch.save({"model": official, "steps": 1}, tmp_path / "far_tiny_128.pt")
    assert main(["import", "far", str(tmp_path / "far_tiny_128.pt"), "--out", str(tmp_path / "e")]) == 0
    far = load_export(tmp_path / "e").model
    assert far.cfg.head_rope == "trunk" and far.cfg.prefix_rope == "zero"
    k = len(far.cfg.vocab_sizes)
    codes, labels = torch.randint(0, 16384, (2, k, 8, 8), generator=g), torch.tensor([3, 24])
    ref = far_reference_logits(official, codes.flatten(2), labels, heads=4, grid=8)
    with torch.no_grad():
        ours = far(codes, Condition(labels=labels))
        for j in range(k):
            torch.testing.assert_close(ours[j], ref[j], rtol=1e-4, atol=1e-4)
        plain = build_model(arch, prefix_rope="zero").eval()
        plain.load_state_dict(far.state_dict())
        assert (plain(codes, Condition(labels=labels))[1] - ref[1]).abs().max() > 1e-2
