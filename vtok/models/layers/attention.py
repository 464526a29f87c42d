"""Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels where the device has them), with optional RoPE, boolean or additive masks, causal masking
and a key/value cache for incremental decoding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.layers.norms import make_norm
from vtok.models.layers.rope import apply_rope


class KVCache:
    """Keys and values of one attention layer for up to ``max_len`` positions, allocated on the
    first ``append`` with that call's batch, heads, head dim, dtype and device:
    (B, heads, max_len, head_dim) each. ``append`` returns views of everything cached so far.

    Static mode (fixed shapes, for torch.compile): with ``index`` set to a (N,) long
    tensor of positions, ``append`` writes the N new entries there and returns the whole buffers
    (B, heads, max_len, head_dim); the caller masks the positions not yet written. The caller moves
    ``index`` in place (``index.fill_(pos)``), so a compiled step sees the same tensor every call."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is not None:
            self.k.index_copy_(2, self.index, k)
            self.v.index_copy_(2, self.index, v)
            return self.k, self.v
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


def prefix_lm_mask(prefix: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (length, length) prefix-LM mask, True where attention is allowed: the first ``prefix``
    positions attend to each other in both directions (never to later ones); every later position
    attends to the whole prefix and causally to itself and the later positions before it.
    (FlexTok's encoder "causal_last": [patches | registers], register i sees patches and registers <= i.)"""
    mask = causal_mask(length, length, device)
    mask[:, :prefix] = True
    mask[:prefix, prefix:] = False
    return mask


class Attention(nn.Module):
    """Multi-head self-attention: (B, N, D) -> (B, N, D).

    ``qk_norm``: a ``make_norm`` kind applied per head to queries and keys before the dot product
    (QK-norm; FlexTok uses "layer_fp32"); None (default) leaves them as projected."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0, *,
                 qk_norm: str | None = None, qk_norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        # None by default, so models without QK-norm keep their module tree and state dict
        self.q_norm = make_norm(qk_norm, self.head_dim, qk_norm_eps) if qk_norm is not None else None
        self.k_norm = make_norm(qk_norm, self.head_dim, qk_norm_eps) if qk_norm is not None else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, rope: torch.Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """``rope``: (N, head_dim // 2, 2) rows for these N positions; ``causal``: each position sees
        itself and earlier ones (with a ``cache``, earlier includes everything cached)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:  # QK-norm (per head), before any rotary embedding
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(torch.stack([q, k]), rope).unbind(0)
        elif rope is not None:
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
