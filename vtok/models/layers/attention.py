"""Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels where the device has them), with optional RoPE, boolean or additive masks, causal masking
and a key/value cache for incremental decoding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.layers.rope import apply_rope


class KVCache:
    """Keys and values of one attention layer for up to ``max_len`` positions, allocated on the
    first ``append`` with that call's batch, heads, head dim, dtype and device:
    (B, heads, max_len, head_dim) each. ``append`` returns views of everything cached so far."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k = k.new_zeros(*k.shape[:2], self.max_len, k.shape[3])
            self.v = v.new_zeros(*v.shape[:2], self.max_len, v.shape[3])
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
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
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(qkv[:2], rope).unbind(0)  # queries and keys in one call
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        is_causal = causal and mask is None
        if cache is not None:
            k, v = cache.append(k, v)
            if is_causal and n > 1 and k.shape[2] > n:  # chunk after a prefix: offset causal mask
                mask, is_causal = causal_mask(n, k.shape[2], x.device), False
            elif n == 1:
                is_causal = False  # one new query sees the whole cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, N, hd)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention of queries over a context (PixArt-alpha's layout: ``q`` on the
    queries, one ``kv`` projection on the context, ``proj`` out):
    x (B, N, D), context (B, L, D_ctx), mask (B, L) bool (True = attend) -> (B, N, D).

    A row whose mask is all False has nothing to attend to; its output is zero (not NaN)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask, empty = None, None
        if mask is not None:
            mask = mask.bool()
            empty = ~mask.any(-1)  # (B,): SDPA would give NaN for these rows
            attn_mask = (mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, hd)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d))
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out
