"""A pre-norm transformer block: x + Attn(Norm(x)), then x + MLP(Norm(x)).

One class for the ViT flavour (LayerNorm, GELU MLP, biases: FQGAN adapters, feature heads) and the
LLaMA flavour (RMSNorm, SwiGLU, no biases, RoPE: GPT / FAR generators)."""
from __future__ import annotations

import torch
from torch import nn

from vtok.models.layers.attention import Attention, KVCache
from vtok.models.layers.mlp import Mlp, SwiGLU, swiglu_hidden
from vtok.models.layers.norms import make_norm


class Block(nn.Module):
    """Pre-norm block: (B, N, D) -> (B, N, D).

    ``norm``: "layer" | "rms" | "layer_fp32" (affine-free, fp32); ``mlp``: "gelu" (hidden
    ``mlp_ratio * dim``) | "swiglu" (hidden ``swiglu_hidden(dim, mlp_ratio, swiglu_multiple_of)``:
    LLaMA rounds up to 256, FlexTok uses 1, i.e. int(2/3 * ratio * dim)); ``qk_norm``: a norm kind
    for per-head QK-norm (None: off); ``dropout`` applies to both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, norm: str = "layer",
                 mlp: str = "gelu", bias: bool = True, dropout: float = 0.0, eps: float = 1e-5,
                 qk_norm: str | None = None, swiglu_multiple_of: int = 256):
        super().__init__()
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(dim, num_heads, bias, dropout, qk_norm=qk_norm, qk_norm_eps=eps)
        self.norm2 = make_norm(norm, dim, eps)
        if mlp == "gelu":
            self.mlp = Mlp(dim, mlp_ratio, bias)
        elif mlp == "swiglu":
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, swiglu_multiple_of), bias)
        else:
            raise ValueError(f"mlp {mlp!r} is not 'gelu' or 'swiglu'")
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, rope: torch.Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, rope=rope, causal=causal, cache=cache)
        return x + self.drop(self.mlp(self.norm2(x)))
