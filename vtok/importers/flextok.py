"""FlexTok (apple/ml-flextok at 87d00cc) -> vtok's ``FlexTok``.

The released ``model.safetensors`` is the state dict of the official ``FlexTok`` wrapper:
``vae.*`` (its diffusers AutoencoderKL, wrapped: ``vae.vae.*``), ``encoder.module_dict.<name>.*``
and ``decoder.module_dict.<name>.*`` (``SequentialModuleDictWrapper``s composed from a hydra config
kept in the HF repos); the FSQ regularizer has only non-persistent buffers, the flow pipeline is not
a module. Parameter names inside each module are from the official classes; the module NAMES come
from the config, which is not in the code repository: the ones below are those the official
wrapper code indexes (``enc_register_module``, ``dec_nested_dropout``) and, for the rest, the names
quoted from the released config by public forks (an assumption, kept in one table, ``ENC`` /
``DEC``, so it is one edit if a released file disagrees)::

    encoder.module_dict.
      enc_patch_emb.patch_proj.{weight,bias}        PatchEmbedder: Linear(p*p*C, D), (p, q, C) order
      enc_posemb_module.posembs                      (1, D, g, g) fixed 2D sin-cos (a frozen Parameter)
      enc_register_module.registers                  (R, D)  Registers1D
      enc_transformer.blocks.N.attn.{wq,wk,wv,proj}.weight   FlexBlock: no biases, QK-norm (no params)
      enc_transformer.blocks.N.mlp.{fc1,fc2,fc3}.weight      GatedMlp: fc2(silu(fc1 x) * fc3 x)
      enc_to_latents.proj.{weight,bias}              LinearHead: affine-free LN + Linear(D, d)
    decoder.module_dict.
      dec_from_latents.proj.{weight,bias}            LinearLayer: Linear(d, D)
      dec_registers_posemb_module.posembs            (1, 1, D, R) learned 1D positions (assumed type)
      dec_nested_dropout.dropout_mask_token          (D,)  MaskedNestedDropout (after the positions)
      dec_latent_dropout.nullcond                    (D,)  LearnedNullCond: the CFG null replaces every
                                       register (after nested dropout); a file without this key is
                                       taken as ZeroNullCond (no parameters: the null is zeros)
      dec_noise_patch_emb.patch_proj.{weight,bias}   Linear(p*p*C, D)
      dec_patches_posemb_module.posembs              (1, D, g, g) fixed 2D sin-cos
      dec_time_embedder.mlp.{0,2}.{weight,bias}      TimestepEmbedder ([cos | sin], max_period 256)
      dec_transformer.blocks.N.attn.{wq,wk,wv,proj}.weight, mlp.{fc1,fc2,fc3}.weight
      dec_transformer.blocks.N.adaLN_modulation.1.{weight,bias}  (2 x 6D, D): FlexBlockAdaLN with
                                       adaLN_expansion 2: the first 6D rows modulate the patches, the
                                       last 6D the registers; chunks gate_msa, gate_mlp, shift_msa,
                                       scale_msa, shift_mlp, scale_mlp
      dec_to_patches.adaLN_modulation.1.{weight,bias} (2D, D): shift, scale
      dec_to_patches.proj.{weight,bias}              Linear(D, p*p*C)

Two facts make this more than a renaming:

* the official 2D sin-cos table puts the ROW index in the first half of the width and the column in
  the second (``build_2d_sincos_posemb``: ``meshgrid(w, h, indexing="ij")`` then ``(h w)``), vtok's
  ``sincos_2d`` (DiT's layout) the other way round. vtok's table is a fixed buffer, so the import
  changes basis instead: the residual stream of each transformer is permuted (halves swapped), which
  is exact because every operation on it is permutation-equivariant (affine-free LayerNorm,
  elementwise modulation, residual adds; QK-norm acts after the projections). Rows of what writes
  to the stream, columns of what reads it, and the modulation chunks are permuted accordingly.
* the adaLN chunk order (gate, gate, shift, scale, shift, scale) is regrouped into vtok's per-group
  (shift, scale, gate) x 2 heads, and wq / wk / wv are fused into vtok's qkv.

The fixed tables are checked on import (a table that differs from the official formula is refused)
and regenerated on export. Checked against the official code (87d00cc): masked registers hold the
bare mask token (the positions are added before ``MaskedNestedDropout``), the CFG null condition is
one vector at every register position (``nullcond.py``; the pipeline's unconditional pass sets
``eval_dropout_mask``), and every LayerNorm, the output head's included, is ``Fp32LayerNorm`` with
eps 1e-5; vtok's FlexTok does the same. The module NAME ``dec_latent_dropout`` and its class
(Learned- vs ZeroNullCond) are from a public fork quoting the released config's module order, not
from the code repository.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtok.importers import (Checkpoint, Importer, ImporterError, ImportOptions, count_indexed, published_first,
                            register_importer, require_keys)
from vtok.models.api import TokenSpec

ENC, DEC = "encoder.module_dict.", "decoder.module_dict."
# official module names (see the module docstring for which are read from code and which assumed)
M = {"enc_patch": ENC + "enc_patch_emb", "enc_pos": ENC + "enc_posemb_module",
     "enc_reg": ENC + "enc_register_module", "enc_tf": ENC + "enc_transformer",
     "enc_head": ENC + "enc_to_latents", "dec_codes": DEC + "dec_from_latents",
     "dec_regpos": DEC + "dec_registers_posemb_module", "dec_mask": DEC + "dec_nested_dropout",
     "dec_patch": DEC + "dec_noise_patch_emb", "dec_pos": DEC + "dec_patches_posemb_module",
     "dec_time": DEC + "dec_time_embedder", "dec_tf": DEC + "dec_transformer", "dec_head": DEC + "dec_to_patches",
     "dec_null": DEC + "dec_latent_dropout"}
OFFICIAL_NORM_EPS = 1e-5  # Fp32LayerNorm(bias=False, elementwise_affine=False): nn.LayerNorm's default eps
OFFICIAL_ADALN = ("gate_msa", "gate_mlp", "shift_msa", "scale_msa", "shift_mlp", "scale_mlp")
VTOK_ADALN = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
ADALN_ORDER = [OFFICIAL_ADALN.index(n) for n in VTOK_ADALN]  # vtok chunk i = official chunk ADALN_ORDER[i]
NOTES = ("CFG null: a checkpoint without dec_latent_dropout.nullcond is taken as ZeroNullCond (null token = 0); "
         "the module name dec_latent_dropout is from a fork quoting the released config (unverified)")
NULL_KEY = M["dec_null"] + ".nullcond"


def official_sincos(dim: int, height: int, width: int) -> torch.Tensor:
    """ml-flextok's fixed 2D table as stored, (1, dim, height, width): at (row a, column b) the
    width holds [sin(a w), cos(a w), sin(b w), cos(b w)], w = 10000 ** (-i / (dim / 4))."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    a = torch.arange(height, dtype=torch.float32)[:, None, None] * omega  # (h, 1, q)
    b = torch.arange(width, dtype=torch.float32)[None, :, None] * omega  # (1, w, q)
    a, b = a.expand(height, width, quarter), b.expand(height, width, quarter)
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=-1)  # (h, w, dim)
    return table.permute(2, 0, 1)[None].contiguous()


def half_swap(dim: int) -> torch.Tensor:
    """The residual-stream permutation official -> vtok: vtok[i] = official[perm[i]] (halves swapped)."""
    return torch.cat([torch.arange(dim // 2, dim), torch.arange(0, dim // 2)])


def _rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, perm)


def _cols(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return t.index_select(1, perm)


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    return count_indexed(state, prefix + ".blocks.")


class _Mapper:
    """Both directions of the mapping for one model size; ``fwd`` True: official -> vtok."""

    def __init__(self, model: nn.Module, fwd: bool):
        cfg = model.cfg
        self.cfg, self.fwd = cfg, fwd
        pe, pd = half_swap(cfg.encoder_width), half_swap(cfg.decoder_width)
        # official -> vtok uses perm; vtok -> official its inverse
        self.pe = pe if fwd else torch.argsort(pe)
        self.pd = pd if fwd else torch.argsort(pd)

    def blocks(self, src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], official: str, vtok: str,
               depth: int, width: int, perm: torch.Tensor, adaln: bool) -> None:
        for i in range(depth):
            o, v = f"{official}.blocks.{i}.", f"{vtok}.layers.{i}."
            if self.fwd:
                qkv = torch.cat([src[o + f"attn.w{n}.weight"] for n in "qkv"], 0)
                out[v + "attn.qkv.weight"] = _cols(qkv, perm)
                out[v + "attn.proj.weight"] = _rows(src[o + "attn.proj.weight"], perm)
                out[v + "mlp.w1.weight"] = _cols(src[o + "mlp.fc1.weight"], perm)
                out[v + "mlp.w3.weight"] = _cols(src[o + "mlp.fc3.weight"], perm)
                out[v + "mlp.w2.weight"] = _rows(src[o + "mlp.fc2.weight"], perm)
            else:
                qkv = _cols(src[v + "attn.qkv.weight"], perm)
                for n, part in zip("qkv", qkv.chunk(3, 0)):
                    out[o + f"attn.w{n}.weight"] = part.clone()
                out[o + "attn.proj.weight"] = _rows(src[v + "attn.proj.weight"], perm)
                out[o + "mlp.fc1.weight"] = _cols(src[v + "mlp.w1.weight"], perm)
                out[o + "mlp.fc3.weight"] = _cols(src[v + "mlp.w3.weight"], perm)
                out[o + "mlp.fc2.weight"] = _rows(src[v + "mlp.w2.weight"], perm)
            if adaln:
                self.adaln(src, out, o + "adaLN_modulation.1.", v + "adaLN_modulation.", width, perm)

    def adaln(self, src, out, official: str, vtok: str, width: int, perm: torch.Tensor) -> None:
        """Official (2 groups x 6 chunks x D, in) <-> vtok 2 heads of (6 chunks x D, in), chunks
        reordered (``ADALN_ORDER``) and the rows of each chunk permuted (they modulate the stream)."""
        for name in ("weight", "bias"):
            if self.fwd:
                t = src[official + name]
                t = t.reshape(2, 6, width, *t.shape[1:])[:, ADALN_ORDER].index_select(2, perm)
                for g in range(2):
                    out[f"{vtok}{g}.1.{name}"] = t[g].reshape(6 * width, *t.shape[3:]).contiguous()
            else:
                heads = [src[f"{vtok}{g}.1.{name}"] for g in range(2)]
                t = torch.stack([h.reshape(6, width, *h.shape[1:]) for h in heads]).index_select(2, perm)
                back = torch.empty_like(t)
                back[:, ADALN_ORDER] = t
                out[official + name] = back.reshape(12 * width, *t.shape[3:]).contiguous()

    def final(self, src, out, width: int, perm: torch.Tensor) -> None:
        o, v = M["dec_head"] + ".", "decoder.final_layer."
        for name in ("weight", "bias"):
            if self.fwd:
                t = src[o + "adaLN_modulation.1." + name]
                t = t.reshape(2, width, *t.shape[1:]).index_select(1, perm)
                out[v + "adaLN_modulation.1." + name] = t.reshape(2 * width, *t.shape[2:]).contiguous()
            else:
                t = src[v + "adaLN_modulation.1." + name]
                t = t.reshape(2, width, *t.shape[1:]).index_select(1, perm)
                out[o + "adaLN_modulation.1." + name] = t.reshape(2 * width, *t.shape[2:]).contiguous()
        if self.fwd:
            out[v + "linear.weight"] = _cols(src[o + "proj.weight"], perm)
            out[v + "linear.bias"] = src[o + "proj.bias"]
        else:
            out[o + "proj.weight"] = _cols(src[v + "linear.weight"], perm)
            out[o + "proj.bias"] = src[v + "linear.bias"]

    def __call__(self, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg, fwd, pe, pd = self.cfg, self.fwd, self.pe, self.pd
        out: dict[str, torch.Tensor] = {}
        # (official key, vtok key, transform official -> vtok given a perm); inverse perms reverse them
        pairs = [
            (M["enc_patch"] + ".patch_proj.weight", "encoder.patch_embed.weight", "rows", pe),
            (M["enc_patch"] + ".patch_proj.bias", "encoder.patch_embed.bias", "rows", pe),
            (M["enc_reg"] + ".registers", "encoder.registers", "cols", pe),
            (M["enc_head"] + ".proj.weight", "encoder.head.weight", "cols", pe),
            (M["enc_head"] + ".proj.bias", "encoder.head.bias", "", None),
            (M["dec_patch"] + ".patch_proj.weight", "decoder.patch_embed.weight", "rows", pd),
            (M["dec_patch"] + ".patch_proj.bias", "decoder.patch_embed.bias", "rows", pd),
            (M["dec_codes"] + ".proj.weight", "decoder.code_embed.weight", "rows", pd),
            (M["dec_codes"] + ".proj.bias", "decoder.code_embed.bias", "rows", pd),
            (M["dec_mask"] + ".dropout_mask_token", "decoder.mask_token", "rows", pd),
            (NULL_KEY, "decoder.null_token", "rows", pd),
        ] + [(f"{M['dec_time']}.mlp.{i}.{n}", f"decoder.t_embedder.mlp.{i}.{n}", "", None)
             for i in (0, 2) for n in ("weight", "bias")]
        if fwd and NULL_KEY not in src:  # ZeroNullCond (no parameters): the null token is zeros
            src = {**src, NULL_KEY: torch.zeros(cfg.decoder_width)}
        for official, vtok, how, perm in pairs:
            t = src[official if fwd else vtok]
            t = _rows(t, perm) if how == "rows" else _cols(t, perm) if how == "cols" else t
            out[vtok if fwd else official] = t
        regpos = M["dec_regpos"] + ".posembs"
        if fwd:
            out["decoder.register_pos"] = _cols(src[regpos][0, 0].t(), pd).contiguous()
        else:
            out[regpos] = _cols(src["decoder.register_pos"], pd).t()[None, None].contiguous()
            g = cfg.grid
            out[M["enc_pos"] + ".posembs"] = official_sincos(cfg.encoder_width, g, g)
            out[M["dec_pos"] + ".posembs"] = official_sincos(cfg.decoder_width, g, g)
        self.blocks(src, out, M["enc_tf"], "encoder", cfg.encoder_depth, cfg.encoder_width, pe, adaln=False)
        self.blocks(src, out, M["dec_tf"], "decoder", cfg.decoder_depth, cfg.decoder_width, pd, adaln=True)
        self.final(src, out, cfg.decoder_width, pd)
        return out


@register_importer("flextok")
class FlexTokImporter(Importer):
    title = "FlexTok (apple/ml-flextok)"
    notes = NOTES

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Leaves out the bundled VAE; a decoder without a learned null condition (ZeroNullCond: no
        parameters) gets a null token of zeros, which is what ZeroNullCond feeds the decoder."""
        vae = [k for k in state if k.startswith("vae.")]
        out = {k: v for k, v in state.items() if not k.startswith("vae.")}
        patch = M["dec_patch"] + ".patch_proj.weight"
        if NULL_KEY not in out and patch in out:
            out[NULL_KEY] = out[patch].new_zeros(out[patch].shape[0])
        return out, ({"vae": len(vae)} if vae else {})

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        from vtok.models.registry import MODELS
        from vtok.models.tokenizers.flextok import FlexTok

        need = [M["enc_patch"] + ".patch_proj.weight", M["dec_patch"] + ".patch_proj.weight",
                M["enc_reg"] + ".registers", M["enc_head"] + ".proj.weight", M["dec_pos"] + ".posembs"]
        require_keys(state, need, "a FlexTok")
        enc_w, in_dim = (int(s) for s in state[need[0]].shape)
        dec_w = int(state[need[1]].shape[0])
        registers, code_dim = int(state[need[2]].shape[0]), int(state[need[3]].shape[0])
        enc_d, dec_d = _depth(state, M["enc_tf"]), _depth(state, M["dec_tf"])
        grid = int(state[need[4]].shape[-1])
        found = {"encoder_depth": enc_d, "encoder_width": enc_w, "decoder_depth": dec_d, "decoder_width": dec_w}
        entries = {n: e for n, e in MODELS.items() if e.model is FlexTok}
        candidates = [n for n, e in entries.items() if all(getattr(e.config, k) == v for k, v in found.items())]
        described = f"encoder {enc_d} x {enc_w}, decoder {dec_d} x {dec_w}, {registers} registers"
        if not candidates:
            raise ImporterError(f"the checkpoint is a FlexTok d{enc_d}-d{dec_d} ({described}): not a registered "
                                f"size ({', '.join(sorted(entries))})")
        arch = published_first(candidates)
        cfg = MODELS[arch].config
        p = cfg.patch_size
        if in_dim % (p * p):
            raise ImporterError(f"patch embedding input {in_dim} is not {p}x{p} patches of whole channels")
        if code_dim != len(cfg.fsq.levels):
            raise ImporterError(f"the checkpoint's FSQ has {code_dim} dimensions; {arch} has levels "
                                f"{list(cfg.fsq.levels)} ({len(cfg.fsq.levels)}); the levels are not in the weights")
        want = {"latent_channels": in_dim // (p * p), "latent_size": grid * p, "num_registers": registers,
                "norm_eps": OFFICIAL_NORM_EPS}  # vtok's default since the final-layer fix; kept for old configs
        return arch, {k: v for k, v in want.items() if getattr(cfg, k) != v}

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return _Mapper(model, fwd=True)(state)

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return _Mapper(model, fwd=False)(state)

    def fixed_keys(self, model: nn.Module) -> dict[str, torch.Tensor]:
        cfg = model.cfg
        return {M["enc_pos"] + ".posembs": official_sincos(cfg.encoder_width, cfg.grid, cfg.grid),
                M["dec_pos"] + ".posembs": official_sincos(cfg.decoder_width, cfg.grid, cfg.grid)}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        cfg = model.cfg
        vae, scaling, shift = "", 1.0, 0.0
        if options.vae:
            config = Path(options.vae) / "config.json"
            if not config.is_file():
                raise ImporterError(f"--vae {options.vae}: no config.json there; pass a local diffusers "
                                    "AutoencoderKL directory (FlexTok's: EPFL-VILAB/flextok_vae_c16)")
            info = json.loads(config.read_text())
            channels = int(info.get("latent_channels", 0))
            if channels != cfg.latent_channels:
                raise ImporterError(f"--vae {options.vae} makes {channels}-channel latents; this FlexTok "
                                    f"takes {cfg.latent_channels}")
            vae = str(Path(options.vae).resolve())
            scaling, shift = float(info.get("scaling_factor") or 1.0), float(info.get("shift_factor") or 0.0)
        return model.token_spec, {
            "source": "latents", "vae": vae, "latent_scaling": scaling, "latent_shift": shift,
            "latent_shape": [cfg.latent_channels, cfg.latent_size, cfg.latent_size],
            "official": f"FlexTok d{cfg.encoder_depth}-d{cfg.decoder_depth}", "import_notes": NOTES}


__all__ = ["FlexTokImporter", "M", "NULL_KEY", "official_sincos"]
