"""Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels where the device has them), with optional RoPE, boolean or additive masks, causal masking
and a key/value cache for incremental decoding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.layers.rope import apply_rope


class KVCache:
    """Pre-allocated keys and values of one attention layer: (B, heads, max_len, head_dim) each.

    ``append`` writes the new positions and returns views of everything cached so far."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {end} requested")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(queries: int, keys: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (queries, keys) mask, True where attention is allowed; the queries are the last
    ``queries`` of the ``keys`` positions."""
    q = torch.arange(keys - queries, keys, device=device)[:, None]
    return torch.arange(keys, device=device)[None, :] <= q


class Attention(nn.Module):
    """Multi-head self-attention: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, rope: torch.Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """``rope``: (N, head_dim // 2, 2) rows for these N positions; ``causal``: each position sees
        itself and earlier ones (with a ``cache``, earlier includes everything cached)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        is_causal = causal and mask is None
        if cache is not None:
            k, v = cache.append(k, v)
            if is_causal and n > 1 and k.shape[2] > n:  # chunk after a prefix: offset causal mask
                mask, is_causal = causal_mask(n, k.shape[2], x.device), False
            elif n == 1:
                is_causal = False  # one new query sees the whole cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, N, hd)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))
