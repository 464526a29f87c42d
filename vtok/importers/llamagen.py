"""LlamaGen (FoundationVision/LlamaGen at ce98ec4) -> vtok: the class-conditional GPTs
(``llamagen-gpt``) and the VQ tokenizers VQ-16 / VQ-8 (``llamagen-vq``).

GPT (autoregressive/models/gpt.py) -> vtok's ``GPT``.

Official layout (``Transformer`` with ``model_type='c2i'``, ``cls_token_num=1``)::

    tok_embeddings.weight                     (V, D)
    cls_embedding.embedding_table.weight      (num_classes + 1, D)   the last row is the CFG null class
    layers.N.attention.wqkv.weight            (3D, D)    q | k | v, each heads x head_dim (no biases)
    layers.N.attention.wo.weight              (D, D)
    layers.N.feed_forward.w1 / w3 / w2.weight SwiGLU w2(silu(w1 x) * w3 x), hidden find_multiple(8D/3, 256)
    layers.N.attention_norm / ffn_norm.weight RMSNorm (eps 1e-5) before attention / the FFN
    norm.weight, output.weight                (D,), (V, D)

The 2D RoPE table (``freqs_cis``) is not saved: it is a plain attribute built from ``block_size``
(the token grid, which the weights do not hold) with ZERO rows for the class token, so that token's
query and key are zero. The import therefore asks for the image size (``--image-size``, or the
``_256`` / ``_384`` in the released file names: c2i_B_256.pt ... c2i_3B_384.pt, VQ-16 tokens, so the
grid is image_size / 16) and sets ``prefix_rope="zero"``; the rest of vtok's GPT is LlamaGen's
forward (same chunk order in wqkv, same SwiGLU, same pair-wise rotation), so the mapping is a
renaming. Released files are training checkpoints ``{"model", "optimizer", "steps", "args"}``
(train_c2i.py; no EMA is kept); ``read_checkpoint`` takes ``model``.

Not covered: t2i GPTs (their caption MLP has no biases; vtok's does) and grouped-query attention
(``n_kv_head`` < ``n_head``; no released c2i model uses it).

VQ (tokenizer/tokenizer_image/vq_model.py ``VQModel``) -> vtok's ``FQGAN`` with one codebook, whose
CNN is LlamaGen's (same blocks, same order, same asymmetric-pad downsample, same l2-normalised
lookup). The mapping is a renaming::

    encoder.conv_blocks.I.{res,attn}.J.*      levels.I.{res,attn}.J.*  (nin_shortcut -> skip, proj_out -> proj)
    encoder.conv_blocks.I.downsample.conv.*   levels.I.resample.conv.*
    encoder.mid.N.* / encoder.conv_in.*       mid.N.* / conv_in.*
    encoder.norm_out / conv_out, quant_conv   heads.0.0 / heads.0.2, heads.0.3   (the factor head)
    quantize.embedding.weight                 quantizer.quantizers.0.codebook.weight  (16,384 x 8)
    post_quant_conv.*                         post_quant.*
    decoder.conv_blocks.I.upsample.conv.*     decoder.levels.I.resample.conv.*   (the rest as the encoder)

``quantize.codebook_used`` (a usage-statistics buffer) is left out. Released files
(vq_ds16_c2i.pt, vq_ds8_c2i.pt) are vq_train.py checkpoints ``{"model", "optimizer", "discriminator",
...}`` (+ ``"ema"`` when trained with EMA, taken by default).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtok.importers import (Checkpoint, Importer, ImporterError, ImportOptions, count_indexed, drop_usage_buffers,
                            published_first, register_importer, rename, require_keys)
from vtok.models.api import TokenSpec

DOWNSAMPLE = 16  # the released c2i GPTs model VQ-16 tokens
SIZE_NAMES = {(12, 768): "GPT-B", (24, 1024): "GPT-L", (36, 1280): "GPT-XL", (48, 1536): "GPT-XXL",
              (48, 2560): "GPT-XXXL", (22, 2048): "GPT-1B", (24, 3200): "GPT-3B", (32, 4096): "GPT-7B"}

RENAMES = [(r"^tok_embeddings\.", "tok_embed.0."), (r"^cls_embedding\.embedding_table\.", "cls_embed."),
           (r"^output\.", "out.0."), (r"\.attention\.wqkv\.", ".attn.qkv."), (r"\.attention\.wo\.", ".attn.proj."),
           (r"\.feed_forward\.", ".mlp."), (r"\.attention_norm\.", ".norm1."), (r"\.ffn_norm\.", ".norm2.")]
INVERSE = [(r"^tok_embed\.0\.", "tok_embeddings."), (r"^cls_embed\.", "cls_embedding.embedding_table."),
           (r"^out\.0\.", "output."), (r"\.attn\.qkv\.", ".attention.wqkv."), (r"\.attn\.proj\.", ".attention.wo."),
           (r"\.mlp\.", ".feed_forward."), (r"\.norm1\.", ".attention_norm."), (r"\.norm2\.", ".ffn_norm.")]


VQ_RENAMES = [(r"^encoder\.norm_out\.", "heads.0.0."), (r"^encoder\.conv_out\.", "heads.0.2."),
              (r"^quant_conv\.", "heads.0.3."), (r"^quantize\.embedding\.", "quantizer.quantizers.0.codebook."),
              (r"^post_quant_conv\.", "post_quant."), (r"^encoder\.", ""), (r"\.?conv_blocks\.", ".levels."),
              (r"^\.", ""), (r"\.(down|up)sample\.", ".resample."), (r"\.nin_shortcut\.", ".skip."),
              (r"\.proj_out\.", ".proj.")]
VQ_INVERSE = [(r"^heads\.0\.0\.", "encoder.norm_out."), (r"^heads\.0\.2\.", "encoder.conv_out."),
              (r"^heads\.0\.3\.", "quant_conv."), (r"^quantizer\.quantizers\.0\.codebook\.", "quantize.embedding."),
              (r"^post_quant\.", "post_quant_conv."), (r"^(conv_in|levels|mid)\.", r"encoder.\1."),
              (r"\.levels\.", ".conv_blocks."), (r"^encoder\.(conv_blocks\.\d+)\.resample\.", r"encoder.\1.downsample."),
              (r"^decoder\.(conv_blocks\.\d+)\.resample\.", r"decoder.\1.upsample."), (r"\.skip\.", ".nin_shortcut."),
              (r"\.proj\.", ".proj_out.")]
VQ_NAMES = {(128, (1, 1, 2, 2, 4)): "VQ-16", (128, (1, 2, 2, 4)): "VQ-8"}


def cnn_shape(state: dict[str, torch.Tensor], conv_out: str) -> dict[str, Any]:
    """The LlamaGen CNN trunk's ``CNNConfig`` fields the official weights say (ch, ch_mult, num_res_blocks,
    z_channels; ``conv_out``: the encoder output conv's weight key), for matching registry sizes."""
    ch = int(state["encoder.conv_in.weight"].shape[0])
    levels = count_indexed(state, "encoder.conv_blocks.")
    mult = tuple(int(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) // ch for i in range(levels))
    return dict(ch=ch, ch_mult=mult, num_res_blocks=count_indexed(state, "encoder.conv_blocks.0.res."),
                z_channels=int(state[conv_out].shape[0]))


def official_name(depth: int, dim: int) -> str:
    return SIZE_NAMES.get((depth, dim), f"GPT d{depth}-w{dim}")


def image_size_of(options: ImportOptions, path: str) -> int:
    """The image size the GPT was trained at: ``--image-size``, else the ``_256`` / ``_384`` of the
    released file name; neither is a one-line error asking for the flag."""
    if options.image_size:
        size = options.image_size
    else:
        found = re.findall(r"(?:^|[_\-])(\d{3,4})(?=[_\-.]|$)", Path(path).stem)
        if not found:
            raise ImporterError(f"{path}: the token grid is not in LlamaGen's weights and the file name does not "
                                "say the image size; pass --image-size (256 or 384 for the released c2i files)")
        size = int(found[-1])
    if size % DOWNSAMPLE:
        raise ImporterError(f"--image-size {size} is not a multiple of {DOWNSAMPLE} (VQ-16 tokens)")
    return size


@register_importer("llamagen-gpt")
class LlamaGenGPTImporter(Importer):
    title = "LlamaGen c2i GPT (FoundationVision/LlamaGen)"
    notes = ("the class token's RoPE rows are zero (LlamaGen's table; prefix_rope='zero'); the token grid "
             "comes from --image-size / the file name")

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Leaves out KV-cache buffers (present when a model was saved after ``setup_caches``)."""
        cache = [k for k in state if ".kv_cache." in k]
        return {k: v for k, v in state.items() if ".kv_cache." not in k}, ({"kv_cache": len(cache)} if cache else {})

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        from vtok.models.generators.gpt import GPT
        from vtok.models.registry import MODELS

        if "cls_embedding.cap_proj.fc1.weight" in state:
            raise ImporterError("a LlamaGen t2i GPT (caption MLP cls_embedding.cap_proj): only the class-"
                                "conditional (c2i) GPTs are importable")
        need = ["tok_embeddings.weight", "cls_embedding.embedding_table.weight", "output.weight",
                "layers.0.attention.wqkv.weight"]
        require_keys(state, need, "a LlamaGen GPT")
        vocab, dim = (int(s) for s in state["tok_embeddings.weight"].shape)
        depth = count_indexed(state, "layers.")
        qkv = int(state["layers.0.attention.wqkv.weight"].shape[0])
        if qkv != 3 * dim:
            raise ImporterError(f"layers.0.attention.wqkv.weight has {qkv} rows for width {dim}: grouped-query "
                                "attention (n_kv_head < n_head), which vtok's GPT does not have")
        num_classes = int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1
        candidates = [n for n, e in MODELS.items() if e.model is GPT and e.config.condition == "class"
                      and len(e.config.vocab_sizes) == 1 and e.config.head_layers == 0
                      and (e.config.depth, e.config.dim) == (depth, dim)]
        if not candidates:
            sizes = sorted(n for n, e in MODELS.items() if e.model is GPT and len(e.config.vocab_sizes) == 1
                           and e.config.condition == "class")
            raise ImporterError(f"the checkpoint is a LlamaGen {official_name(depth, dim)} (depth {depth}, width "
                                f"{dim}): not a registered size ({', '.join(sizes)})")
        arch = published_first(candidates)
        cfg = MODELS[arch].config
        want = {"vocab_sizes": (vocab,), "num_classes": num_classes, "prefix_rope": "zero"}
        return arch, {k: v for k, v in want.items() if getattr(cfg, k) != v}

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {rename(k, RENAMES): v for k, v in state.items()}

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {rename(k, INVERSE): v for k, v in state.items()}

    def unsaved_config(self, options: ImportOptions, path: str) -> dict[str, Any]:
        """The token grid from the image size (not in the weights): ``token_shape`` (g, g)."""
        g = image_size_of(options, path) // DOWNSAMPLE
        return {"token_shape": (g, g)}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        from vtok.models.export import ExportError, read_export_config

        cfg = model.cfg
        g = cfg.token_shape[0]
        spec = TokenSpec(shape=(len(cfg.vocab_sizes), *cfg.token_shape), resolution=g * DOWNSAMPLE,
                         vocab_sizes=cfg.vocab_sizes, downsample=DOWNSAMPLE)
        tokenizer = ""
        if options.tokenizer:
            from vtok.eval.sample import check_pair
            try:
                check_pair(spec, TokenSpec.from_dict(read_export_config(options.tokenizer, "tokenizer")["token_spec"]))
            except (ExportError, ValueError) as e:
                raise ImporterError(f"--tokenizer {options.tokenizer}: {e}") from None
            tokenizer = str(Path(options.tokenizer).resolve())
        return spec, {"tokenizer": tokenizer, "condition": "class",
                      "official": f"LlamaGen {official_name(cfg.depth, cfg.dim)} c2i, {g}x{g} tokens "
                                  f"({g * DOWNSAMPLE} px)", "import_notes": self.notes}


@register_importer("llamagen-vq")
class LlamaGenVQImporter(Importer):
    title = "LlamaGen VQ (FoundationVision/LlamaGen)"

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Leaves out ``quantize.codebook_used`` (usage statistics, not a weight)."""
        return drop_usage_buffers(state)

    def recognise(self, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        from vtok.models.quant import L2VectorQuantizer
        from vtok.models.registry import MODELS
        from vtok.models.tokenizers.fqgan import FQGAN

        if any(k.startswith(("quantize_sem.", "quantize_vis.")) for k in state):
            raise ImporterError("a factorized (FQGAN) tokenizer with quantize_sem / quantize_vis codebooks: not a "
                                "LlamaGen VQ")
        need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight",
                "encoder.conv_blocks.0.res.0.conv1.weight"]
        require_keys(state, need, "a LlamaGen VQ")
        size, dim = (int(s) for s in state["quantize.embedding.weight"].shape)
        found = cnn_shape(state, "encoder.conv_out.weight")
        entries = {n: e for n, e in MODELS.items() if e.model is FQGAN and e.config.num_codebooks == 1}
        candidates = [n for n, e in entries.items() if all(getattr(e.config.cnn, k) == v for k, v in found.items())]
        if not candidates:
            desc = ", ".join(f"{k} {v}" for k, v in found.items())
            raise ImporterError(f"the checkpoint is a VQ with {desc}: not a registered size ({', '.join(sorted(entries))})")
        arch = published_first(candidates)
        vq = MODELS[arch].config.vq
        want = L2VectorQuantizer.Config(**{**vq.__dict__, "codebook_size": size, "dim": dim})
        return arch, ({"vq": want} if want != vq else {})

    def unsaved_config(self, options: ImportOptions, path: str) -> dict[str, Any]:
        return {"image_size": options.image_size} if options.image_size else {}

    def to_vtok(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {rename(k, VQ_RENAMES): v for k, v in state.items()}

    def to_official(self, state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {rename(k, VQ_INVERSE): v for k, v in state.items()}

    def metadata(self, model: nn.Module, arch: str, ckpt: Checkpoint, options: ImportOptions
                 ) -> tuple[TokenSpec, dict[str, Any]]:
        cnn = model.cfg.cnn
        name = VQ_NAMES.get((cnn.ch, tuple(cnn.ch_mult)), f"VQ x{cnn.downsample}")
        return model.token_spec, {"official": f"LlamaGen {name} ({model.cfg.vq.codebook_size} x {model.cfg.vq.dim} "
                                              f"codebook, {model.cfg.image_size} px)"}


__all__ = ["LlamaGenGPTImporter", "LlamaGenVQImporter", "cnn_shape", "image_size_of"]
