"""GPT-style autoregressive generator over token codes (LlamaGen), with FQGAN's FAR head.

Sequence layout (class-conditional; text-conditional puts the P projected caption tokens first)::

    input   [cls] t0  t1  ... t_{L-2}         (cls: class embedding; null class = num_classes)
    predict  t0   t1  t2  ... t_{L-1}
    input   [c_0 .. c_{P-1}] t0 ... t_{L-2}  (text: T5 embeddings -> MLP; padded caption positions
    predict             t0   t1 ... t_{L-1}   are masked as keys; dropped captions -> a learned null)

Each position's token may be factorized into ``k`` sub-codes (one per FQGAN sub-codebook). The input
embeds them separately, concatenates and projects (``merge``); the output is the FAR head, a small
causal transformer run per position over ``[h_t, e_0(c_t0), ..., e_{k-2}(c_t,k-2)]`` whose j-th
output predicts sub-code j, so sub-code j depends on the trunk state and sub-codes < j. With k = 1
and no head layers this is LlamaGen's GPT (RMSNorm, SwiGLU, 2D RoPE on the token grid, zero-initialised
output layer) with one known difference: the class token's RoPE rows are the identity here, while
LlamaGen's table (``precompute_freqs_cis_2d``) has zero rows there, which zeroes that token's query
and key. ``GPTConfig.prefix_rope="zero"`` builds LlamaGen's table (released LlamaGen weights need it). FQGAN's
FAR head rotates its k positions by the trunk table's first k rows (``head_rope="trunk"``: the class
row, then grid positions (0, 0), (0, 1)); vtok's default is 1D RoPE over 0..k-1.

1D tokenizers (FlexTok: ordered ids (1, R) over one 64,000-code FSQ codebook) get 1D RoPE over the R
positions and train on all R tokens; ``generate(num_tokens=K)`` stops after the first K (the KV
cache holds only prefix + K positions), since an ordered tokenizer decodes any prefix.

Shapes: codes (B, k, *grid) with grid (h, w) or (n,); labels (B,) or text (B, P, text_dim) + mask
(B, P); logits: k tensors (B, L, V_j).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vtok.models.api import Condition, TokenSpec
from vtok.models.generators.sampling import guidance_at, sample_logits
from vtok.models.layers import Block, KVCache, RMSNorm, causal_mask, check_prefix_rows, rope_1d, rope_for_shape

CONDITIONS = ("class", "text")


@dataclass
class GPTConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    vocab_sizes: tuple[int, ...] = (16384,)  # one per sub-codebook; k = len(vocab_sizes)
    token_shape: tuple[int, ...] = (16, 16)  # the token grid (h, w), or (n,) for 1D tokenizers
    head_layers: int = 0  # FAR head depth; required (>= 1) when k > 1
    num_classes: int = 1000
    class_dropout: float = 0.1  # labels / captions -> null during training, for classifier-free guidance
    condition: str = "class"  # "class" | "text" (T5 caption as a prefix, LlamaGen t2i's layout)
    text_dim: int = 4096  # text mode: width of the T5 embeddings
    text_len: int = 120  # text mode: caption tokens P (shorter captions are padded and masked)
    token_dropout: float = 0.1  # dropout on the input embeddings (LlamaGen's token_dropout_p)
    dropout: float = 0.1  # residual + FFN dropout
    rope_base: float = 10000.0
    # RoPE rows of the condition prefix: "identity" (vtok's default: unrotated), or "zero" (LlamaGen's
    # table, which zeroes the prefix tokens' queries and keys; released LlamaGen weights need it)
    prefix_rope: str = "identity"
    # RoPE of the FAR head's k positions [h_t, e_0, ...]: "sequence" (vtok's default: 1D RoPE over
    # 0..k-1), or "trunk" (FQGAN's FAR: the trunk table's first k rows, i.e. the class token's row,
    # then grid positions (0, 0), (0, 1), ...; released FAR weights need it)
    head_rope: str = "sequence"
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        self.vocab_sizes = tuple(int(v) for v in self.vocab_sizes)
        self.token_shape = tuple(int(s) for s in self.token_shape)
        if len(self.vocab_sizes) > 1 and self.head_layers < 1:
            raise ValueError(f"{len(self.vocab_sizes)} sub-codebooks need a FAR head: set head_layers >= 1")
        if self.condition not in CONDITIONS:
            raise ValueError(f"GPTConfig.condition={self.condition!r}: expected one of {', '.join(CONDITIONS)}")
        check_prefix_rows(self.prefix_rope, "GPTConfig.prefix_rope")
        if self.head_rope not in ("sequence", "trunk"):
            raise ValueError(f"GPTConfig.head_rope={self.head_rope!r}: expected 'sequence' or 'trunk'")
        if self.head_rope == "trunk" and len(self.vocab_sizes) > self.prefix_len + math.prod(self.token_shape):
            raise ValueError("GPTConfig.head_rope='trunk' needs a trunk table of at least k rows")

    @property
    def prefix_len(self) -> int:
        """Condition positions before the first token: 1 class token, or text_len caption tokens."""
        return self.text_len if self.condition == "text" else 1


def token_rope(token_shape: tuple[int, ...], head_dim: int, base: float, prefix: int,
               prefix_rows: str = "identity") -> torch.Tensor:
    """RoPE table for ``prefix`` rows (``prefix_rows``: identity or zero) + the token positions: 2D for
    an (h, w) grid, 1D over all pairs for a sequence. Singleton axes are dropped first, so a (1, R)
    shape (FlexTok's spec shape with its sub-code axis kept) is a 1D sequence of R, not a 2D grid whose
    row half never turns."""
    axes = tuple(s for s in token_shape if s != 1) or (1,)
    return rope_for_shape(axes, head_dim, base, prefix=prefix, prefix_rows=prefix_rows)


class GPT(nn.Module):
    """Class-conditional autoregressive transformer; see the module docstring."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        k, d = len(cfg.vocab_sizes), cfg.dim
        self.num_codebooks, self.seq_len = k, math.prod(cfg.token_shape)
        self.null_class = cfg.num_classes
        text = cfg.condition == "text"
        self.cls_embed = None if text else nn.Embedding(cfg.num_classes + 1, d)  # + the null class
        # LlamaGen t2i's caption embedder: MLP to the width, a learned null caption for CFG
        self.caption_proj = (nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                           nn.Linear(d, d)) if text else None)
        self.null_caption = nn.Parameter(torch.zeros(cfg.text_len, cfg.text_dim)) if text else None
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
        self.register_buffer("rope", token_rope(cfg.token_shape, head_dim, cfg.rope_base, cfg.prefix_len,
                                                cfg.prefix_rope), persistent=False)
        head_rope = self.rope[:k].clone() if cfg.head_rope == "trunk" else rope_1d(k, head_dim, cfg.rope_base)
        self.register_buffer("head_rope", head_rope, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linear and embedding weights, zero biases and output layers; the
        null caption ~ N(0, 1 / text_dim) (LlamaGen's uncond_embedding)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for out in self.out:
            nn.init.zeros_(out.weight)
        if self.null_caption is not None:
            nn.init.normal_(self.null_caption, std=self.cfg.text_dim ** -0.5)

    @functools.cached_property  # the config is fixed after construction; forward checks against it
    def token_spec(self) -> TokenSpec:
        """The tokens this generator models: (k, *token_shape) over ``vocab_sizes``, class-conditional.
        (The resolution belongs to the tokenizer; exports record the tokenizer's full spec.)"""
        cfg = self.cfg
        return TokenSpec(shape=(len(cfg.vocab_sizes), *cfg.token_shape), resolution=0,
                         vocab_sizes=cfg.vocab_sizes, condition=cfg.condition)

    def blocks(self) -> Iterable[nn.Module]:
        """The unit of FSDP sharding and activation checkpointing."""
        return [*self.layers, *self.head]

    # -- pieces ------------------------------------------------------------------------------
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, k, N) sub-codes -> (B, N, D) input embeddings."""
        return self.merge_embeddings([emb(codes[:, j]) for j, emb in enumerate(self.tok_embed)])

    def merge_embeddings(self, embs: list[torch.Tensor]) -> torch.Tensor:
        """k sub-code embeddings, each (B, N, D) -> the (B, N, D) input (concatenated + merged for k > 1)."""
        return embs[0] if self.merge is None else self.merge(torch.cat(embs, dim=-1))

    def embed_labels(self, labels: torch.Tensor, drop: bool = False) -> torch.Tensor:
        """(B,) class ids -> (B, 1, D); ``drop``: replace each by the null class w.p. class_dropout."""
        if self.cls_embed is None:
            raise ValueError("this GPT is text-conditional: condition it on text (B, L, text_dim) + text_mask")
        if drop and self.cfg.class_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return self.cls_embed(labels)[:, None]

    def caption(self, cond: Condition, drop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Text (B, L, text_dim) + mask (B, L) (None = all real), L <= text_len -> padded to text_len
        with the padding moved first (real tokens last) and zeroed: (text (B, P, text_dim), mask
        (B, P) bool); ``drop``: rows -> the null caption (all real) w.p. class_dropout."""
        cfg = self.cfg
        if cond.text is None:
            raise ValueError("this GPT is text-conditional: the Condition needs text (B, L, text_dim) + text_mask")
        b, length, width = cond.text.shape
        if length > cfg.text_len or width != cfg.text_dim:
            raise ValueError(f"text of shape {(length, width)} per sample; this GPT takes at most "
                             f"({cfg.text_len}, {cfg.text_dim}) (text_len, text_dim)")
        text = cond.text.to(self.null_caption.dtype)
        mask = (torch.ones(b, length, dtype=torch.bool, device=text.device) if cond.text_mask is None
                else cond.text_mask.bool())
        if length < cfg.text_len:  # pad to text_len; padded positions are masked
            text = torch.cat([text, text.new_zeros(b, cfg.text_len - length, width)], 1)
            mask = torch.cat([mask, mask.new_zeros(b, cfg.text_len - length)], 1)
        # Real tokens last (LlamaGen t2i left-pads): the first image token is predicted from the last
        # prefix position, which must be a real caption token; padded content is zeroed so it never matters.
        order = torch.argsort(mask.int(), dim=1, stable=True)
        text = text.masked_fill(~mask[..., None], 0.0).gather(1, order[..., None].expand(-1, -1, width))
        mask = mask.gather(1, order)
        if drop and cfg.class_dropout > 0:
            dropped = torch.rand(b, device=text.device) < cfg.class_dropout
            text = torch.where(dropped[:, None, None], self.null_caption.expand(b, -1, -1), text)
            mask = mask | dropped[:, None]
        return text, mask

    def embed_condition(self, cond: Condition, drop: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The condition prefix (B, P, D) and its key mask (B, P) bool (None for the class token)."""
        if self.cfg.condition == "class":
            return self.embed_labels(self._labels(cond), drop), None
        text, mask = self.caption(cond, drop)
        return self.caption_proj(text), mask

    def null_condition(self, batch: int, device: torch.device | str) -> Condition:
        """The unconditional rows for CFG: the null class, or the learned null caption (all real)."""
        if self.cfg.condition == "class":
            return Condition(labels=torch.full((batch,), self.null_class, dtype=torch.long, device=device))
        text = self.null_caption.detach()[None].expand(batch, -1, -1).to(device)
        return Condition(text=text, text_mask=torch.ones(text.shape[:2], dtype=torch.bool, device=device))

    def trunk(self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None,
              valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal transformer over input positions start..start+N-1: (B, N, D) -> (B, N, D).
        ``valid`` (B, >= start+N) bool: which positions may be attended to (padded caption tokens
        are not); None: all (the plain causal path)."""
        n = x.shape[1]
        rope = self.rope[start:start + n]
        mask = None if valid is None else padded_causal_mask(valid[:, :start + n], n)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rope=rope, causal=True, cache=None if caches is None else caches[i])
        return x

    def decode_step(self, x: torch.Tensor, index: torch.Tensor, caches: list[KVCache],
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """One new position through the trunk with every shape fixed (the form torch.compile wants, so
        one compiled graph serves every position): x (B, 1, D) at position ``index`` (1,) long;
        ``caches`` preallocated and in static mode (``cache.index is index``); keys after ``index`` are
        masked, as are ``valid`` (B, >= max_len) False ones -> (B, 1, D)."""
        keys = caches[0].max_len
        allowed = torch.arange(keys, device=x.device) <= index  # (max_len,)
        mask = allowed if valid is None else valid[:, :keys] & allowed
        mask = mask.view(-1, 1, 1, keys)
        rope = self.rope.index_select(0, index)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, mask, rope=rope, causal=True, cache=cache)
        return x

    def compiled_decode_step(self) -> Callable[..., torch.Tensor]:
        """``decode_step`` through torch.compile, as ``step(x, index, caches, valid)``. One compiled
        function for every model (the module is an argument, so nothing compiled is stored on it:
        copies and pickles stay plain); a new batch size, dtype or model compiles once more.
        Not CUDA graphs ("reduce-overhead"): the caches are fresh tensors each call, mutated in
        place, and cudagraph trees skip graphs that mutate such inputs."""
        return functools.partial(_compiled_decode_step(), self)

    def head_logits(self, h: torch.Tensor, codes: torch.Tensor, n: int | None = None,
                    last_only: bool = False, embs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Logits of the first ``n`` (default k) sub-codes: h (B, N, D), codes (B, k, N) (only
        sub-codes < n-1 are read) -> n tensors (B, N, V_j), float32; ``last_only``: just sub-code n-1's.
        ``embs``: the sub-codes' embeddings (B, N, D) when already computed (training reuses the input's)."""
        n = self.num_codebooks if n is None else n
        if not len(self.head):
            return [self.out[0](self.norm(h)).float()]
        b, length, d = h.shape
        seq = [h] + [embs[j] if embs is not None else self.tok_embed[j](codes[:, j]) for j in range(n - 1)]
        x = torch.stack(seq, dim=2).reshape(b * length, n, d)  # one short sequence per position
        for layer in self.head:
            x = layer(x, rope=self.head_rope[:n], causal=True)
        x = self.norm(x).view(b, length, n, d)
        return [self.out[j](x[:, :, j]).float() for j in range(n - 1 if last_only else 0, n)]

    # -- training ----------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, cond: Condition) -> list[torch.Tensor]:
        """Teacher-forced logits: codes (B, k, *grid), cond.labels (B,) or cond.text (B, L, text_dim)
        + text_mask (B, L) -> k tensors (B, L_tokens, V_j)."""
        codes = self._flat(codes)
        prefix, prefix_mask = self.embed_condition(cond, drop=self.training)
        embs = [emb(codes[:, j]) for j, emb in enumerate(self.tok_embed)]  # (B, L, D) each: input and FAR head
        x = torch.cat([prefix, self.merge_embeddings([e[:, :-1] for e in embs])], 1)
        valid = None if prefix_mask is None else _with_tokens(prefix_mask, codes.shape[-1] - 1)
        h = self.trunk(self.token_drop(x), valid=valid)[:, self.cfg.prefix_len - 1:]
        return self.head_logits(h, codes, embs=embs)

    def _labels(self, cond: Condition) -> torch.Tensor:
        if cond.labels is None:
            raise ValueError("GPT is class-conditional: the Condition needs labels (B,)")
        return cond.labels.long()

    def loss_from_logits(self, logits: list[torch.Tensor], codes: torch.Tensor, accuracy: bool = True
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean of the k sub-code cross-entropies (FAR) and per-codebook loss / accuracy, from
        ``forward``'s logits (callers run forward through their parallel wrapper). ``accuracy``
        False skips the accuracy (an argmax pass over the logits; the trainer wants it on log steps only)."""
        flat = self._flat(codes)
        losses, metrics = [], {}
        for j, lg in enumerate(logits):
            ce = F.cross_entropy(lg.flatten(0, 1), flat[:, j].flatten().long())
            losses.append(ce)
            metrics[f"ce{j}"] = ce.detach()
            if accuracy:
                metrics[f"acc{j}"] = (lg.argmax(-1) == flat[:, j]).float().mean().detach()
        return torch.stack(losses).mean(), metrics

    def _flat(self, codes: torch.Tensor) -> torch.Tensor:
        expected = (self.num_codebooks, *self.cfg.token_shape)
        if tuple(codes.shape[1:]) != expected:
            raise ValueError(f"codes of shape {tuple(codes.shape[1:])} per sample; this generator was "
                             f"built for {expected} (k sub-codes x token grid)")
        return codes.flatten(2).long()

    # -- sampling ----------------------------------------------------------------------------
    def sample_length(self, num_tokens: int | None) -> int:
        """Tokens to generate: all, or the first ``num_tokens`` (1..N) of a 1D token sequence."""
        if num_tokens is None or num_tokens == self.seq_len:
            return self.seq_len
        if sum(s != 1 for s in self.cfg.token_shape) > 1:
            raise ValueError(f"num_tokens={num_tokens}: this generator models a fixed {self.cfg.token_shape} "
                             f"token grid; it samples all {self.seq_len} tokens")
        if not 1 <= num_tokens <= self.seq_len:
            raise ValueError(f"num_tokens={num_tokens}: expected 1..{self.seq_len} (tokens per image)")
        return int(num_tokens)

    @torch.inference_mode()
    def generate(self, cond: Condition, num_tokens: int | None = None, *, guidance: float = 1.0,
                 guidance_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """Sample codes (B, k, *grid) for ``cond`` (class ids (B,), or text (B, L, text_dim) + mask);
        with ``num_tokens`` = K < N (1D sequences only: ordered tokenizers decode any prefix) just
        the first K tokens, (B, k, K): the loop and the KV cache stop there.

        Classifier-free guidance runs the conditional and the unconditional (null class / null
        caption) rows in one batch and mixes logits as ``u + s (c - u)``, with ``s`` from
        ``guidance_schedule`` ("constant", or "linear": 1 at the first token rising to ``guidance``
        at the last sampled one). With ``guidance == 1`` only the conditional rows run.
        ``use_cache=False`` recomputes the whole prefix at every step (the baseline the KV cache is
        measured against). ``compile=True`` (with the cache) runs every step after the prefill through
        ``compiled_decode_step`` (preallocated static KV cache, torch.compile; the first call pays
        the compilation): the same tokens as the eager path for a fixed ``generator``."""
        length = self.sample_length(num_tokens)
        b = len(cond)
        if b == 0:
            raise ValueError("generate needs a Condition with labels (B,) or text (B, L, text_dim)")
        was_training = self.training
        self.eval()
        k, device = self.num_codebooks, self.rope.device
        cfg = guidance != 1.0
        prefix, prefix_mask = self.embed_condition(cond.to(device))
        if cfg:
            null_prefix, null_mask = self.embed_condition(self.null_condition(b, device))
            prefix = torch.cat([prefix, null_prefix])
            prefix_mask = None if prefix_mask is None else torch.cat([prefix_mask, null_mask])
        rows = prefix.shape[0]
        valid = None if prefix_mask is None else _with_tokens(prefix_mask, length)
        caches = [KVCache(prefix.shape[1] + length - 1) for _ in self.layers] if use_cache else None
        out = torch.zeros(b, k, length, dtype=torch.long, device=device)
        new = seen = prefix  # the inputs not yet seen by the trunk / everything so far
        pos = 0
        step = self.compiled_decode_step() if compile and use_cache else None
        for t in range(length):
            if step is not None and t:
                if t == 1:  # after the prefill: the caches switch to fixed-shape writes at `index`
                    index = torch.zeros(1, dtype=torch.long, device=device)
                    for cache in caches:
                        cache.index = index
                h = step(new, index.fill_(pos), caches, valid)
            elif use_cache:
                h = self.trunk(new, start=pos, caches=caches, valid=valid)[:, -1:]
            else:
                h = self.trunk(seen, valid=valid)[:, -1:]
            pos += new.shape[1]
            sub = torch.zeros(rows, k, 1, dtype=torch.long, device=device)
            scale = guidance_at(guidance, guidance_schedule, t, length)
            for j in range(k):
                logits = self.head_logits(h, sub, j + 1, last_only=True)[-1][:, -1]  # (rows, V_j)
                if cfg:
                    cond_logits, uncond = logits.chunk(2)
                    logits = uncond + scale * (cond_logits - uncond)
                token = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
                out[:, j, t] = token
                sub[:, j, 0] = token.repeat(2) if cfg else token
            if t + 1 < length:  # the last token is never fed back: the cache ends at prefix + K - 1
                new = self.embed_codes(sub)
                if not use_cache:
                    seen = torch.cat([seen, new], dim=1)
        self.train(was_training)
        if length < self.seq_len:
            return out.view(b, k, *self.cfg.token_shape[:-1], length)
        return out.view(b, k, *self.cfg.token_shape)


@functools.cache
def _compiled_decode_step() -> Callable[..., torch.Tensor]:
    """GPT.decode_step through torch.compile, made once per process (on first use)."""
    return torch.compile(GPT.decode_step, dynamic=False)


def _with_tokens(prefix_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Key validity (B, P + tokens): the prefix's mask, then ``tokens`` always-valid token positions."""
    return torch.cat([prefix_mask, prefix_mask.new_ones(prefix_mask.shape[0], tokens)], 1)


def padded_causal_mask(valid: torch.Tensor, queries: int) -> torch.Tensor:
    """Attention mask (B, 1, queries, K) bool, True = attend: causal for the last ``queries`` of K
    positions, keys with ``valid`` (B, K) False masked; every query sees itself, so a padded caption
    position has a defined (and unread) output instead of an empty softmax."""
    keys = valid.shape[1]
    allowed = causal_mask(queries, keys, valid.device)[None] & valid[:, None, :]
    q = torch.arange(queries, device=valid.device)
    allowed[:, q, keys - queries + q] = True
    return allowed[:, None]
