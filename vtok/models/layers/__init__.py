"""Shared transformer pieces (attention via SDPA with masks / RoPE / KV cache, MLPs, norms, blocks),
used by the tokenizers' adapters and heads and by the generators."""
from vtok.models.layers.attention import Attention, KVCache, causal_mask
from vtok.models.layers.mlp import Mlp, SwiGLU, swiglu_hidden
from vtok.models.layers.norms import RMSNorm, make_norm
from vtok.models.layers.rope import apply_rope, rope_1d, rope_2d, rope_for_shape
from vtok.models.layers.transformer import Block

__all__ = ["Attention", "Block", "KVCache", "Mlp", "RMSNorm", "SwiGLU", "apply_rope", "causal_mask",
           "make_norm", "rope_1d", "rope_2d", "rope_for_shape", "swiglu_hidden"]
