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
KINDS = {"dit": ("dit_tiny", "dit-tiny"), "flextok": ("flextok_tiny", "flextok-tiny")}


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
    assert expected_official(imp, model) == {k: tuple(v) for k, v in data["keys"].items()}
    assert imp.recognise(official_state(kind)) == (arch, {})


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mapping_round_trips_exactly_both_ways(kind):
    imp, model = get_importer(kind), build_model(KINDS[kind][1])
    official = official_state(kind)
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
    result = import_checkpoint(kind, path, tmp_path / "export")
    exp = load_export(tmp_path / "export")
    assert exp.arch == KINDS[kind][1] and result.arch == exp.arch
    imp = get_importer(kind)
    mapped_back = imp.to_official(exp.model.state_dict(), exp.model)
    assert all(torch.equal(mapped_back[k], official[k]) for k in official)
    if kind == "dit":  # a pure renaming: every vtok tensor IS a source tensor
        sd = exp.model.state_dict()
        assert torch.equal(sd["layers.1.mlp.0.weight"], official["blocks.1.mlp.fc1.weight"])
        assert torch.equal(sd["y_embedder.weight"], official["y_embedder.embedding_table.weight"])
        assert torch.equal(sd["x_embedder.weight"], official["x_embedder.proj.weight"])
        assert exp.meta["diffusion"]["objective"] == "ddpm" and exp.meta["diffusion"]["learn_sigma"]
        assert exp.token_spec.shape == (4, 8, 8) and exp.resolution == 64 and exp.meta["latent_scaling"] == 0.18215
    else:
        assert exp.meta["latent_shape"] == [4, 8, 8] and exp.token_spec.ordered


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
    victim = sorted(k for k in state if "attn.proj.weight" in k)[-1]  # not one the size is read from
    extra = "encoder.module_dict.enc_extra.weight" if kind == "flextok" else "blocks.0.extra.weight"
    for name, change in (("missing", lambda s: s.pop(victim)),
                         ("unmapped", lambda s: s.__setitem__(extra, torch.zeros(2))),
                         ("mis-shaped", lambda s: s.__setitem__(victim, torch.zeros(3, 5)))):
        broken = dict(state)
        change(broken)
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path))
        err = one_line_error(capsys, "import", kind, str(path), "--out", str(tmp_path / name))
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
    ("flextok", "flextok-d12-d12", {}), ("flextok", "flextok-d18-d28", {})])
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
