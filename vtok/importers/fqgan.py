"""FQGAN (showlab/FQGAN at dc34256) -> vtok: the tokenizers (``vtok import fqgan``) and the FAR
generators (``vtok import far``).

Tokenizers (tokenizer/vq_model_dual.py / vq_model_triple.py) -> vtok's ``FQGAN``; Dual and Triple
are told apart by their codebooks.

The CNN trunk, decoder and post-quant conv are LlamaGen's (``llamagen.VQ_RENAMES``). Each factor
(Dual: vis, sem; Triple: vis, sem_mid, sem_high, in the order the decoder concatenates them) has::

    encoder.<adapter>.0.*                  heads.I.0.*   FactorizedAdapter (512 wide, 6 blocks, 8 heads)
        positional_embedding / ln_pre / ln_post    pos / norm_pre / norm_post
        transformer.L.ln_1 / ln_2                  layers.L.norm1 / norm2
        transformer.L.attn.in_proj_{weight,bias}   layers.L.attn.qkv.*   (nn.MultiheadAttention: q | k | v)
        transformer.L.attn.out_proj.*              layers.L.attn.proj.*
        transformer.L.mlp.c_fc / c_proj            layers.L.mlp.0 / 2   (exact GELU)
    encoder.norm_out_<s>, encoder.conv_out_<s>    heads.I.1, heads.I.3
    quant_conv_<s>                          heads.I.4
    quantize_<s>.embedding.weight           quantizer.quantizers.I.codebook.weight

and each feature-prediction head (Dual: ``feat_pred_head`` on sem; Triple: ``mid_sem_feat_pred`` /
``high_sem_feat_pred``) maps onto ``align_heads.I`` (``upscale`` -> ``lift``, ``class_embedding``
(1, W) -> ``cls`` (1, 1, W), the rest as the adapters). A checkpoint trained without representation
supervision has no such head: it is imported with ``align = {}``. The codebook-usage buffers are
left out. Released files are vq_train.py checkpoints (``model`` / ``ema`` entries).

FAR (autoregressive/models/far_dual.py / far_triple.py ``Transformer``, c2i) -> vtok's ``GPT`` with
k sub-codebooks and a FAR head: LlamaGen's trunk (``llamagen.RENAMES``) plus
``tok_embeddings_J`` -> ``tok_embed.J-1``, ``aggregation_layer`` -> ``merge``, ``ar_head.N`` ->
``head.N`` (LlamaGen blocks), ``output_J`` -> ``out.J-1``. Two facts of the official forward set the
config: the class token's RoPE rows are zero (``prefix_rope="zero"``, as LlamaGen), and the head
rotates its k positions [h_t, e_1(c_t1), ...] by the TRUNK table's first k rows (``freqs_cis[:k]``:
the zero class row, then grid positions (0, 0), (0, 1)), in training and in ``decode_subtoken``
alike (``head_rope="trunk"``). The token grid is not in the weights (``--image-size`` or the file
name, as for LlamaGen GPTs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtok.importers import (Checkpoint, Importer, ImporterError, ImportOptions, count_indexed, drop_usage_buffers,
                            names, published_first, register_importer, rename, require_keys)
from vtok.importers.llamagen import INVERSE, RENAMES, VQ_INVERSE, VQ_RENAMES, LlamaGenGPTImporter, cnn_shape
from vtok.models.api import TokenSpec

# k -> (factor suffixes, adapter module names, {codebook index: feature-prediction head name})
LAYOUTS = {2: (("vis", "sem"), ("visual_head", "semantic_head"), {1: "feat_pred_head"}),
           3: (("vis", "sem_mid", "sem_high"), ("visual_head", "semantic_head_mid", "semantic_head_high"),
               {1: "mid_sem_feat_pred", 2: "high_sem_feat_pred"})}
BLOCK = [(r"\.positional_embedding$", ".pos"), (r"\.class_embedding$", ".cls"), (r"\.ln_pre\.", ".norm_pre."),
         (r"\.ln_post\.", ".norm_post."), (r"\.transformer\.(\d+)\.ln_1\.", r".layers.\1.norm1."),
         (r"\.transformer\.(\d+)\.ln_2\.", r".layers.\1.norm2."),
         (r"\.transformer\.(\d+)\.attn\.in_proj_(weight|bias)$", r".layers.\1.attn.qkv.\2"),
         (r"\.transformer\.(\d+)\.attn\.out_proj\.", r".layers.\1.attn.proj."),
         (r"\.transformer\.(\d+)\.mlp\.c_fc\.", r".layers.\1.mlp.0."),
         (r"\.transformer\.(\d+)\.mlp\.c_proj\.", r".layers.\1.mlp.2."), (r"\.upscale\.", ".lift.")]
BLOCK_INVERSE = [(r"\.pos$", ".positional_embedding"), (r"\.cls$", ".class_embedding"), (r"\.norm_pre\.", ".ln_pre."),
                 (r"\.norm_post\.", ".ln_post."), (r"\.layers\.(\d+)\.norm1\.", r".transformer.\1.ln_1."),
                 (r"\.layers\.(\d+)\.norm2\.", r".transformer.\1.ln_2."),
                 (r"\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", r".transformer.\1.attn.in_proj_\2"),
                 (r"\.layers\.(\d+)\.attn\.proj\.", r".transformer.\1.attn.out_proj."),
                 (r"\.layers\.(\d+)\.mlp\.0\.", r".transformer.\1.mlp.c_fc."),
                 (r"\.layers\.(\d+)\.mlp\.2\.", r".transformer.\1.mlp.c_proj."), (r"\.lift\.", ".upscale.")]


def rules(k: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(official -> vtok, vtok -> official) renaming rules for k factors."""
    suffixes, adapters, heads = LAYOUTS[k]
    fwd, inv = [], []
    for i, (s, a) in enumerate(zip(suffixes, adapters)):
        fwd += [(rf"^encoder\.{a}\.0\.", f"heads.{i}.0."), (rf"^encoder\.norm_out_{s}\.", f"heads.{i}.1."),
                (rf"^encoder\.conv_out_{s}\.", f"heads.{i}.3."), (rf"^quant_conv_{s}\.", f"heads.{i}.4."),
                (rf"^quantize_{s}\.embedding\.", f"quantizer.quantizers.{i}.codebook.")]
        inv += [(rf"^heads\.{i}\.0\.", f"encoder.{a}.0."), (rf"^heads\.{i}\.1\.", f"encoder.norm_out_{s}."),
                (rf"^heads\.{i}\.3\.", f"encoder.conv_out_{s}."), (rf"^heads\.{i}\.4\.", f"quant_conv_{s}."),
                (rf"^quantizer\.quantizers\.{i}\.codebook\.", f"quantize_{s}.embedding.")]
    for j, name in heads.items():
        fwd.append((rf"^{name}\.", f"align_heads.{j}."))
        inv.append((rf"^align_heads\.{j}\.", f"{name}."))
    return fwd + BLOCK + VQ_RENAMES, inv + BLOCK_INVERSE + VQ_INVERSE


def _is_cls(key: str) -> bool:
    return key.endswith(".class_embedding") or key.endswith(".cls")


@register_importer("fqgan")
class FQGANImporter(Importer):
    title = "FQGAN (showlab/FQGAN)"

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return drop_usage_buffers(state)

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        from vtok.models.registry import MODELS
        from vtok.models.tokenizers.fqgan import FQGAN

        k = 3 if "quantize_sem_high.embedding.weight" in state else 2 if "quantize_sem.embedding.weight" in state else 0
        if not k or "quantize_vis.embedding.weight" not in state or "encoder.conv_in.weight" not in state:
            raise ImporterError(f"not an FQGAN checkpoint: no quantize_vis / quantize_sem codebooks (its keys start "
                                f"{names(sorted(state))}); a single-codebook VQ is `vtok import llamagen-vq`")
        _, adapters, heads = LAYOUTS[k]
        size, dim = (int(s) for s in state["quantize_vis.embedding.weight"].shape)
        pos = state.get(f"encoder.{adapters[0]}.0.positional_embedding")
        grid = int(pos.shape[0]) if pos is not None else 0
        align = {j: int(state[f"{name}.class_embedding"].shape[-1]) for j, name in heads.items()
                 if f"{name}.class_embedding" in state}
        entries = {n: e for n, e in MODELS.items() if e.model is FQGAN and e.config.num_codebooks == k}
        found = cnn_shape(state, "encoder.conv_out_vis.weight")
        candidates = [n for n, e in entries.items() if all(getattr(e.config.cnn, a) == v for a, v in found.items())]
        kind = {2: "Dual", 3: "Triple"}[k]
        if not candidates:
            raise ImporterError(f"the checkpoint is an FQGAN-{kind} with ch {found['ch']}, ch_mult {found['ch_mult']}, "
                                f"z {found['z_channels']}: not a registered size ({', '.join(sorted(entries))})")
        arch = published_first(candidates)
        cfg = MODELS[arch].config
        want: dict[str, Any] = {"align": align}
        if (size, dim) != (cfg.vq.codebook_size, cfg.vq.dim):
            want["vq"] = type(cfg.vq)(**{**cfg.vq.__dict__, "codebook_size": size, "dim": dim})
        if grid:
            side = int(round(grid ** 0.5))
            want["image_size"] = side * cfg.cnn.downsample
        return arch, {a: v for a, v in want.items() if getattr(cfg, a) != v}

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        fwd, _ = rules(model.cfg.num_codebooks)
        return {rename(k, fwd): (v.reshape(1, 1, -1) if _is_cls(k) else v) for k, v in state.items()}

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        _, inv = rules(model.cfg.num_codebooks)
        return {rename(k, inv): (v.reshape(1, -1) if _is_cls(k) else v) for k, v in state.items()}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        cfg = model.cfg
        kind = {2: "Dual", 3: "Triple"}[cfg.num_codebooks]
        heads = ", ".join(f"{i} -> {w}" for i, w in cfg.align.items()) or "none"
        return model.token_spec, {"official": f"FQGAN-{kind} x{cfg.cnn.downsample} ({cfg.num_codebooks} x "
                                              f"{cfg.vq.codebook_size} x {cfg.vq.dim} codebooks, {cfg.image_size} px, "
                                              f"feature heads {heads})"}


FAR_RENAMES = [(r"^tok_embeddings_(\d+)\.", lambda m: f"tok_embed.{int(m.group(1)) - 1}."),
               (r"^output_(\d+)\.", lambda m: f"out.{int(m.group(1)) - 1}."), (r"^aggregation_layer\.", "merge."),
               (r"^ar_head\.", "head.")] + RENAMES
FAR_INVERSE = [(r"^tok_embed\.(\d+)\.", lambda m: f"tok_embeddings_{int(m.group(1)) + 1}."),
               (r"^out\.(\d+)\.", lambda m: f"output_{int(m.group(1)) + 1}."), (r"^merge\.", "aggregation_layer."),
               (r"^head\.", "ar_head.")] + INVERSE
FAR_NAMES = {(24, 1024, 3): "FAR-B", (36, 1280, 4): "FAR-L"}  # (depth, width, head layers)


@register_importer("far")
class FARImporter(LlamaGenGPTImporter):
    """FQGAN's FAR: LlamaGen's c2i GPT with k sub-code embeddings merged and a FAR head."""

    title = "FAR (showlab/FQGAN)"
    notes = ("the class token's RoPE rows are zero and the FAR head uses the trunk table's first k rows "
             "(prefix_rope='zero', head_rope='trunk'); the token grid comes from --image-size / the file name")

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        from vtok.models.generators.gpt import GPT
        from vtok.models.registry import MODELS

        k = count_indexed(state, "tok_embeddings_")
        need = ["tok_embeddings_1.weight", "tok_embeddings_2.weight", "aggregation_layer.weight",
                "ar_head.0.attention.wqkv.weight", "cls_embedding.embedding_table.weight"]
        require_keys(state, need, "a FAR", hint="a one-codebook GPT is `vtok import llamagen-gpt`")
        dim = int(state["tok_embeddings_1.weight"].shape[1])
        depth, head = count_indexed(state, "layers."), count_indexed(state, "ar_head.")
        if int(state["layers.0.attention.wqkv.weight"].shape[0]) != 3 * dim:
            raise ImporterError("grouped-query attention (n_kv_head < n_head), which vtok's GPT does not have")
        found = (depth, dim, head, k)
        candidates = [n for n, e in MODELS.items() if e.model is GPT and e.config.condition == "class"
                      and (e.config.depth, e.config.dim, e.config.head_layers, len(e.config.vocab_sizes)) == found]
        name = FAR_NAMES.get(found[:3], f"FAR d{depth}-w{dim}-h{head}") + ("-dual" if k == 2 else f"-k{k}")
        if not candidates:
            sizes = sorted(n for n, e in MODELS.items() if e.model is GPT and e.config.head_layers > 0)
            raise ImporterError(f"the checkpoint is a {name} (depth {depth}, width {dim}, {head} head layers, k {k}): "
                                f"not a registered size ({', '.join(sizes)})")
        arch = published_first(candidates)
        cfg = MODELS[arch].config
        want = {"vocab_sizes": tuple(int(state[f"tok_embeddings_{j + 1}.weight"].shape[0]) for j in range(k)),
                "num_classes": int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1,
                "prefix_rope": "zero", "head_rope": "trunk"}
        return arch, {key: v for key, v in want.items() if getattr(cfg, key) != v}

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {rename(k, FAR_RENAMES): v for k, v in state.items()}

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {rename(k, FAR_INVERSE): v for k, v in state.items()}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        spec, meta = super().metadata(model, arch, ckpt, options)
        cfg = model.cfg
        k = len(cfg.vocab_sizes)
        name = FAR_NAMES.get((cfg.depth, cfg.dim, cfg.head_layers), f"FAR d{cfg.depth}-w{cfg.dim}")
        g = cfg.token_shape[0]
        return spec, {**meta, "official": f"{name} ({'dual' if k == 2 else f'{k} codebooks'}), {g}x{g} tokens"}


__all__ = ["FARImporter", "FQGANImporter", "LAYOUTS", "rules"]
