"""Shared transformer pieces (attention via SDPA with masks / RoPE / KV cache, cross-attention, MLPs,
norms, blocks, and the adaLN-Zero pieces of diffusion transformers), used by the tokenizers' adapters
and heads and by the generators."""
from vtok.models.layers.adaln import (AdaLNZeroBlock, FinalLayer, TimestepEmbedder, modulate, sincos_1d,
                                      sincos_2d, timestep_embedding)
from vtok.models.layers.attention import Attention, CrossAttention, KVCache, causal_mask, prefix_lm_mask
from vtok.models.layers.grouped_adaln import GroupedAdaLNBlock
from vtok.models.layers.mlp import Mlp, SwiGLU, swiglu_hidden
from vtok.models.layers.norms import FP32LayerNorm, RMSNorm, make_norm
from vtok.models.layers.rope import apply_rope, check_prefix_rows, rope_1d, rope_2d, rope_for_shape
from vtok.models.layers.transformer import Block

__all__ = ["AdaLNZeroBlock", "Attention", "Block", "CrossAttention", "FP32LayerNorm", "FinalLayer",
           "GroupedAdaLNBlock", "KVCache", "Mlp", "RMSNorm", "SwiGLU", "TimestepEmbedder", "apply_rope",
           "causal_mask", "check_prefix_rows", "make_norm", "modulate", "prefix_lm_mask", "rope_1d", "rope_2d",
           "rope_for_shape", "sincos_1d", "sincos_2d", "swiglu_hidden", "timestep_embedding"]
