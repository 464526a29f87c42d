"""GPT-style autoregressive generator over token codes (LlamaGen), with FQGAN's FAR head.

Sequence layout (class-conditional)::

    input   [cls] t0  t1  ... t_{L-2}         (cls: class embedding; null class = num_classes)
    predict  t0   t1  t2  ... t_{L-1}

Each position's token may be factorized into ``k`` sub-codes (one per FQGAN sub-codebook). The input
embeds them separately, concatenates and projects (``merge``); the output is the FAR head, a small
causal transformer run per position over ``[h_t, e_0(c_t0), ..., e_{k-2}(c_t,k-2)]`` whose j-th
output predicts sub-code j, so sub-code j depends on the trunk state and sub-codes < j. With k = 1
and no head layers this is exactly LlamaGen's GPT (RMSNorm, SwiGLU, 2D RoPE on the token grid, class
token with identity rotation, zero-initialised output layer).

Shapes: codes (B, k, *grid) with grid (h, w) or (n,); labels (B,); logits: k tensors (B, L, V_j).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.api import Condition, TokenSpec
from vtok.models.generators.sampling import guidance_at, sample_logits
from vtok.models.layers import Block, KVCache, RMSNorm, rope_1d, rope_for_shape


@dataclass
class GPTConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    vocab_sizes: tuple[int, ...] = (16384,)  # one per sub-codebook; k = len(vocab_sizes)
    token_shape: tuple[int, ...] = (16, 16)  # the token grid (h, w), or (n,) for 1D tokenizers
    head_layers: int = 0  # FAR head depth; required (>= 1) when k > 1
    num_classes: int = 1000
    class_dropout: float = 0.1  # labels -> null class during training, for classifier-free guidance
    token_dropout: float = 0.1  # dropout on the input embeddings (LlamaGen's token_dropout_p)
    dropout: float = 0.1  # residual + FFN dropout
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        self.vocab_sizes = tuple(int(v) for v in self.vocab_sizes)
        self.token_shape = tuple(int(s) for s in self.token_shape)
        if len(self.vocab_sizes) > 1 and self.head_layers < 1:
            raise ValueError(f"{len(self.vocab_sizes)} sub-codebooks need a FAR head: set head_layers >= 1")


class GPT(nn.Module):
    """Class-conditional autoregressive transformer; see the module docstring."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        k, d = len(cfg.vocab_sizes), cfg.dim
        self.num_codebooks, self.seq_len = k, math.prod(cfg.token_shape)
        self.null_class = cfg.num_classes
        self.cls_embed = nn.Embedding(cfg.num_classes + 1, d)  # + the null class
        self.tok_embed = nn.ModuleList(nn.Embedding(v, d) for v in cfg.vocab_sizes)
        self.merge = nn.Linear(k * d, d) if k > 1 else None
        self.token_drop = nn.Dropout(cfg.token_dropout)

        def block() -> Block:
            return Block(d, cfg.heads, norm="rms", mlp="swiglu", bias=False, dropout=cfg.dropout,
                         eps=cfg.norm_eps)

        self.layers = nn.ModuleList(block() for _ in range(cfg.depth))
        self.head = nn.ModuleList(block() for _ in range(cfg.head_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.out = nn.ModuleList(nn.Linear(d, v, bias=False) for v in cfg.vocab_sizes)
        head_dim = d // cfg.heads
        self.register_buffer("rope", rope_for_shape(cfg.token_shape, head_dim, cfg.rope_base, prefix=1),
                             persistent=False)
        self.register_buffer("head_rope", rope_1d(k, head_dim, cfg.rope_base), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linear and embedding weights, zero biases and output layers."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for out in self.out:
            nn.init.zeros_(out.weight)

    @functools.cached_property  # the config is fixed after construction; forward checks against it
    def token_spec(self) -> TokenSpec:
        """The tokens this generator models: (k, *token_shape) over ``vocab_sizes``, class-conditional.
        (The resolution belongs to the tokenizer; exports record the tokenizer's full spec.)"""
        cfg = self.cfg
        return TokenSpec(shape=(len(cfg.vocab_sizes), *cfg.token_shape), resolution=0,
                         vocab_sizes=cfg.vocab_sizes, condition="class")

    def blocks(self) -> Iterable[nn.Module]:
        """The unit of FSDP sharding and activation checkpointing."""
        return [*self.layers, *self.head]

    # -- pieces ------------------------------------------------------------------------------
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, k, N) sub-codes -> (B, N, D) input embeddings."""
        embs = [emb(codes[:, j]) for j, emb in enumerate(self.tok_embed)]
        return embs[0] if self.merge is None else self.merge(torch.cat(embs, dim=-1))

    def embed_labels(self, labels: torch.Tensor, drop: bool = False) -> torch.Tensor:
        """(B,) class ids -> (B, 1, D); ``drop``: replace each by the null class w.p. class_dropout."""
        if drop and self.cfg.class_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return self.cls_embed(labels)[:, None]

    def trunk(self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Causal transformer over input positions start..start+N-1: (B, N, D) -> (B, N, D)."""
        rope = self.rope[start:start + x.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, causal=True, cache=None if caches is None else caches[i])
        return x

    def head_logits(self, h: torch.Tensor, codes: torch.Tensor, n: int | None = None,
                    last_only: bool = False) -> list[torch.Tensor]:
        """Logits of the first ``n`` (default k) sub-codes: h (B, N, D), codes (B, k, N) (only
        sub-codes < n-1 are read) -> n tensors (B, N, V_j), float32; ``last_only``: just sub-code n-1's."""
        n = self.num_codebooks if n is None else n
        if not len(self.head):
            return [self.out[0](self.norm(h)).float()]
        b, length, d = h.shape
        seq = [h] + [self.tok_embed[j](codes[:, j]) for j in range(n - 1)]
        x = torch.stack(seq, dim=2).reshape(b * length, n, d)  # one short sequence per position
        for layer in self.head:
            x = layer(x, rope=self.head_rope[:n], causal=True)
        x = self.norm(x).view(b, length, n, d)
        return [self.out[j](x[:, :, j]).float() for j in range(n - 1 if last_only else 0, n)]

    # -- training ----------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, cond: Condition) -> list[torch.Tensor]:
        """Teacher-forced logits: codes (B, k, *grid), cond.labels (B,) -> k tensors (B, L, V_j)."""
        codes = self._flat(codes)
        labels = self._labels(cond)
        x = torch.cat([self.embed_labels(labels, drop=self.training), self.embed_codes(codes[:, :, :-1])], 1)
        return self.head_logits(self.trunk(self.token_drop(x)), codes)

    def _labels(self, cond: Condition) -> torch.Tensor:
        if cond.labels is None:
            raise ValueError("GPT is class-conditional: the Condition needs labels (B,)")
        return cond.labels.long()

    def loss_from_logits(self, logits: list[torch.Tensor], codes: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean of the k sub-code cross-entropies (FAR) and per-codebook loss / accuracy, from
        ``forward``'s logits (callers run forward through their parallel wrapper)."""
        flat = self._flat(codes)
        losses, metrics = [], {}
        for j, lg in enumerate(logits):
            ce = F.cross_entropy(lg.flatten(0, 1), flat[:, j].flatten().long())
            losses.append(ce)
            metrics[f"ce{j}"] = ce.detach()
            metrics[f"acc{j}"] = (lg.argmax(-1) == flat[:, j]).float().mean().detach()
        return torch.stack(losses).mean(), metrics

    def _flat(self, codes: torch.Tensor) -> torch.Tensor:
        expected = (self.num_codebooks, *self.cfg.token_shape)
        if tuple(codes.shape[1:]) != expected:
            raise ValueError(f"codes of shape {tuple(codes.shape[1:])} per sample; this generator was "
                             f"built for {expected} (k sub-codes x token grid)")
        return codes.flatten(2).long()

    # -- sampling ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, cond: Condition, num_tokens: int | None = None, *, guidance: float = 1.0,
                 guidance_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Sample codes (B, k, *grid) for class ids ``cond.labels`` (B,); ``num_tokens`` must be None
        or the full grid (this generator is fixed-length).

        Classifier-free guidance runs the conditional and the unconditional (null-class) rows in
        one batch and mixes logits as ``u + s (c - u)``, with ``s`` from ``guidance_schedule``
        ("constant", or "linear": 1 at the first token rising to ``guidance`` at the last). With
        ``guidance == 1`` only the conditional rows run. ``use_cache=False`` recomputes the whole
        prefix at every step (the baseline the KV cache is measured against)."""
        if num_tokens not in (None, self.seq_len):
            raise ValueError(f"num_tokens={num_tokens}: this generator always samples {self.seq_len} tokens")
        labels = self._labels(cond)
        was_training = self.training
        self.eval()
        b, k, length = labels.shape[0], self.num_codebooks, self.seq_len
        cfg = guidance != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if cfg else labels
        caches = [KVCache(length) for _ in self.layers] if use_cache else None
        out = torch.zeros(b, k, length, dtype=torch.long, device=labels.device)
        new = self.embed_labels(rows)  # (R, 1, D): the inputs not yet seen by the trunk
        seen = new
        for t in range(length):
            if use_cache:
                h = self.trunk(new, start=t, caches=caches)[:, -1:]
            else:
                h = self.trunk(seen)[:, -1:]
            sub = torch.zeros(len(rows), k, 1, dtype=torch.long, device=labels.device)
            scale = guidance_at(guidance, guidance_schedule, t, length)
            for j in range(k):
                logits = self.head_logits(h, sub, j + 1, last_only=True)[-1][:, -1]  # (R, V_j)
                if cfg:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + scale * (cond - uncond)
                token = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
                out[:, j, t] = token
                sub[:, j, 0] = token.repeat(2) if cfg else token
            new = self.embed_codes(sub)
            if not use_cache:
                seen = torch.cat([seen, new], dim=1)
        self.train(was_training)
        return out.view(b, k, *self.cfg.token_shape)

