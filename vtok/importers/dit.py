"""DiT (facebookresearch/DiT, models.py at ed81ce2) -> vtok's ``DiT``.

Official layout (class ``DiT``; timm ``PatchEmbed`` / ``Attention`` / ``Mlp``)::

    pos_embed                               (1, T, D)   fixed 2D sin-cos, saved (a frozen Parameter)
    x_embedder.proj.{weight,bias}           (D, C, p, p), (D,)
    t_embedder.mlp.{0,2}.{weight,bias}      (D, 256), (D, D)
    y_embedder.embedding_table.weight       (num_classes + 1, D)   the last row is the CFG null class
    blocks.N.attn.qkv.{weight,bias}         (3D, D)     timm's fused qkv
    blocks.N.attn.proj.{weight,bias}        (D, D)
    blocks.N.mlp.fc1 / fc2.{weight,bias}    (4D, D), (D, 4D)   tanh GELU
    blocks.N.adaLN_modulation.1.{weight,bias}  (6D, D)  shift, scale, gate (msa), shift, scale, gate (mlp)
    final_layer.linear.{weight,bias}        (p*p*C', D)   C' = 2C with learned sigma
    final_layer.adaLN_modulation.1.{weight,bias}  (2D, D)

vtok's DiT keeps that layout (same chunk orders, same unpatchify order, same sin-cos table), so the
mapping is a renaming: ``x_embedder.proj.`` -> ``x_embedder.``, ``y_embedder.embedding_table.`` ->
``y_embedder.``, ``blocks.N.`` -> ``layers.N.``, ``mlp.fc1`` / ``mlp.fc2`` -> ``mlp.0`` / ``mlp.2``.

Released files (download.py): ``DiT-XL-2-256x256.pt`` / ``DiT-XL-2-512x512.pt`` are raw state dicts
(the EMA weights); train.py checkpoints are ``{"model", "ema", "opt", "args"}``. Both are handled
(``read_checkpoint``). The objective is DDPM: 1000 linear steps, epsilon + learned sigma, on SD-VAE
latents scaled by 0.18215 (sample.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtok.importers import (Checkpoint, Importer, ImporterError, ImportOptions, count_indexed, published_first,
                            register_importer, rename, require_keys)
from vtok.models.api import TokenSpec

SD_VAE_SCALE = 0.18215  # DiT sample.py / train.py: latents = vae.encode(x).sample() * 0.18215
VAE_DOWNSAMPLE = 8
SIZE_NAMES = {(12, 384): "S", (12, 768): "B", (24, 1024): "L", (28, 1152): "XL"}  # (depth, width)

# official -> vtok renames, applied in order (each rule at most once per key), and the inverse
RENAMES = [(r"^x_embedder\.proj\.", "x_embedder."), (r"^y_embedder\.embedding_table\.", "y_embedder."),
           (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.mlp.0."), (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.mlp.2."),
           (r"^blocks\.(\d+)\.", r"layers.\1.")]
INVERSE = [(r"^x_embedder\.(weight|bias)$", r"x_embedder.proj.\1"),
           (r"^y_embedder\.weight$", "y_embedder.embedding_table.weight"),
           (r"^layers\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."), (r"^layers\.(\d+)\.mlp\.2\.", r"blocks.\1.mlp.fc2."),
           (r"^layers\.(\d+)\.", r"blocks.\1.")]


def official_to_vtok_key(key: str) -> str:
    return rename(key, RENAMES)


def vtok_to_official_key(key: str) -> str:
    return rename(key, INVERSE)


def official_name(depth: int, width: int, patch: int, input_size: int) -> str:
    size = SIZE_NAMES.get((depth, width), f"d{depth}-w{width}")
    return f"DiT-{size}/{patch} at {input_size * VAE_DOWNSAMPLE} px ({input_size}x{input_size} latents)"


@register_importer("dit")
class DiTImporter(Importer):
    title = "DiT (facebookresearch/DiT)"

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        from vtok.models.generators.dit import DiT
        from vtok.models.registry import MODELS

        need = ["x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight"]
        require_keys(state, need, "a DiT")
        w = state["x_embedder.proj.weight"]
        if w.dim() != 4 or w.shape[2] != w.shape[3]:
            raise ImporterError(f"x_embedder.proj.weight has shape {tuple(w.shape)}; a DiT patch "
                                "embedding is (D, C, p, p)")
        width, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        depth = count_indexed(state, "blocks.")
        tokens = int(state["pos_embed"].shape[-2])
        grid = int(round(tokens ** 0.5))
        if grid * grid != tokens:
            raise ImporterError(f"pos_embed has {tokens} positions, not a square grid")
        input_size = grid * patch
        out = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
        table = state.get("y_embedder.embedding_table.weight")
        num_classes = int(table.shape[0]) - 1 if table is not None else 0
        found = {"depth": depth, "hidden": width, "patch_size": patch}
        candidates = [name for name, e in MODELS.items() if e.model is DiT and e.config.token_mode == "2d"
                      and e.config.condition == "class"
                      and all(getattr(e.config, k) == v for k, v in found.items())]
        if not candidates:
            sizes = sorted(n for n, e in MODELS.items() if e.model is DiT and e.config.token_mode == "2d"
                           and e.config.condition == "class")
            raise ImporterError(f"the checkpoint is a DiT of depth {depth}, width {width}, patch {patch} "
                                f"({official_name(depth, width, patch, input_size)}): not a registered size "
                                f"({', '.join(sizes)})")
        arch = published_first(candidates)
        cfg = MODELS[arch].config
        want = {"input_size": input_size, "in_channels": channels, "num_classes": num_classes,
                "learn_sigma": out == 2 * channels}
        if out not in (channels, 2 * channels):
            raise ImporterError(f"final_layer.linear.weight gives {out} output channels per position for "
                                f"{channels} input channels (expected {channels} or {2 * channels})")
        return arch, {k: v for k, v in want.items() if getattr(cfg, k) != v}

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {official_to_vtok_key(k): v for k, v in state.items()}

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {vtok_to_official_key(k): v for k, v in state.items()}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        cfg = model.cfg
        s, c = cfg.input_size, cfg.in_channels
        spec = TokenSpec(shape=(c, s, s), resolution=s * VAE_DOWNSAMPLE, dim=c, downsample=VAE_DOWNSAMPLE,
                         condition="class" if cfg.num_classes > 0 else "none")
        vae = ""
        if options.vae:
            if not (Path(options.vae) / "config.json").is_file():
                raise ImporterError(f"--vae {options.vae}: no config.json there; pass a local diffusers "
                                    "AutoencoderKL directory (e.g. stabilityai/sd-vae-ft-ema)")
            vae = str(Path(options.vae).resolve())
        # sample.py's forward_with_cfg guides only the first 3 of the 4 latent channels ("for exact
        # reproducibility"); the published FIDs were sampled that way
        diffusion = {"objective": "ddpm", "flow_loc": 0.0, "flow_scale": 1.0, "flow_shift": 1.0,
                     "num_timesteps": 1000, "learn_sigma": bool(cfg.learn_sigma),
                     "guided_channels": min(3, c)}
        return spec, {"source": "latents", "diffusion": diffusion, "vae": vae, "latent_scaling": SD_VAE_SCALE,
                      "latent_shift": 0.0,
                      "official": official_name(cfg.depth, cfg.hidden, cfg.patch_size, cfg.input_size)}


__all__ = ["DiTImporter", "official_to_vtok_key", "vtok_to_official_key"]
