"""DiT: a diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023, facebookresearch/DiT), for
2D latents or 1D continuous tokens, class- or text-conditioned, with optional REPA features.

Layout (DiT's ``models.py``; parameter counts match it exactly)::

    2D  x (B, C, S, S) -> Conv2d(C, D, p, stride p) -> (B, (S/p)^2, D) + fixed 2D sin-cos positions
    1D  x (B, N, C)    -> Linear(C, D) per token ("patch 1", TexTok)  + fixed 1D sin-cos positions
    c = TimestepEmbedder(t) [+ label embedding (num_classes + 1 rows; the last is the null class)]
    depth x AdaLNZeroBlock(x, c [, caption])   -> FinalLayer (adaLN + Linear) -> unpatchify
    out: (B, C', S, S) or (B, N, C') with C' = 2C when ``learn_sigma`` (eps/velocity, then sigma)

DiT-T2I (``condition="text"``, PixArt-alpha's layout): every block gets a cross-attention layer over
the caption, self-attn -> cross-attn (plain residual) -> MLP; the T5 embeddings (B, L, text_dim) go
through Linear -> GELU(tanh) -> Linear to the model width; a learned null caption (text_len, text_dim)
replaces the caption w.p. ``class_dropout`` during training and is the unconditional branch of CFG
(it is attended in full: its mask is all True). Modulation stays DiT's per-block adaLN-Zero.

Time: ``forward(x_t, cond, t)``. A floating ``t`` is continuous time in [0, 1] and the embedding sees
``t * time_scale`` (1000: DiT's range); an integer ``t`` is a DDPM step 0..999 and is embedded as is.
``generate`` integrates the rectified flow of minRF / FlexTok with ``vtok.models.diffusion``
(x_t = (1 - t) x_0 + t noise, the first C output channels predict v = noise - x_0, Euler / Heun
from t = 1 (noise) to t = 0); ``diffusion_net`` adapts the model to that package's DDPM as well.

REPA (Yu et al. 2025, sihyun-yu/REPA): with ``repa_depth`` = k > 0 the hidden tokens after block k go
through Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, repa_dim), one feature
per patch, to align with frozen DINOv2 patch features; only in 2D mode (1D tokens have no patch
correspondence).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vtok.models.api import Condition, TokenSpec
from vtok.models.diffusion import Guidance, RectifiedFlow, as_guidance, guided
from vtok.models.layers import AdaLNZeroBlock, FinalLayer, TimestepEmbedder, sincos_1d, sincos_2d


@dataclass
class DiTConfig:
    input_size: int = 32  # latent side (2D) or number of tokens (1D)
    in_channels: int = 4  # latent channels (2D) or token width (1D)
    patch_size: int = 2  # 2D patch side; 0 or 1 in 1D mode
    hidden: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class mode; 0 = unconditional
    class_dropout: float = 0.1  # label / caption -> null w.p. this in training (CFG)
    learn_sigma: bool = True  # output 2C channels (prediction, then the DDPM variance interpolation)
    condition: str = "class"  # "class" | "text"
    text_dim: int = 4096  # T5 width (text mode)
    text_len: int = 120  # caption tokens (text mode): the null caption's length, longer captions error
    repa_depth: int = 0  # REPA projector after this block (1-based); 0 = off
    repa_dim: int = 0  # REPA target width (DINOv2-B: 768)
    repa_hidden: int = 2048
    token_mode: str = "2d"  # "2d" latents (B, C, S, S) | "1d" tokens (B, N, C)
    time_scale: float = 1000.0  # float t in [0, 1] -> t * time_scale for the timestep embedding
    time_max_period: float = 10000.0

    def __post_init__(self):
        if self.token_mode not in ("2d", "1d"):
            raise ValueError(f"DiTConfig.token_mode={self.token_mode!r}: expected '2d' or '1d'")
        if self.condition not in ("class", "text"):
            raise ValueError(f"DiTConfig.condition={self.condition!r}: expected 'class' or 'text'")
        if self.token_mode == "1d" and self.patch_size not in (0, 1):
            raise ValueError(f"1D tokens take no patches: patch_size must be 0 or 1, got {self.patch_size}")
        if self.token_mode == "2d" and (self.patch_size < 1 or self.input_size % self.patch_size):
            raise ValueError(f"latent side {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.repa_depth and self.token_mode != "2d":
            raise ValueError("REPA aligns per-patch features: it needs spatial tokens (token_mode='2d')")
        if self.repa_depth and (self.repa_depth > self.depth or self.repa_dim < 1):
            raise ValueError(f"repa_depth={self.repa_depth} must be in 1..depth ({self.depth}) with repa_dim >= 1")


class DiT(nn.Module):
    """Diffusion transformer; see the module docstring. ``forward`` returns the prediction
    (B, C', *grid) or, with REPA on, ``(prediction, features (B, num_patches, repa_dim))``."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, c = cfg.hidden, cfg.in_channels
        self.out_channels = 2 * c if cfg.learn_sigma else c
        self.spatial = cfg.token_mode == "2d"
        self.patch = cfg.patch_size if self.spatial else 1
        if self.spatial:
            self.grid = cfg.input_size // self.patch
            self.num_patches = self.grid ** 2
            self.x_embedder: nn.Module = nn.Conv2d(c, d, self.patch, stride=self.patch)
        else:
            self.grid, self.num_patches = 0, cfg.input_size
            self.x_embedder = nn.Linear(c, d)
        # fixed sin-cos table; a frozen Parameter as in DiT (so its count includes it)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, d), requires_grad=False)
        self.t_embedder = TimestepEmbedder(d, max_period=cfg.time_max_period)
        text = cfg.condition == "text"
        self.null_class = cfg.num_classes
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d) if not text and cfg.num_classes > 0 else None
        self.caption_proj = (nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                           nn.Linear(d, d)) if text else None)
        self.null_caption = nn.Parameter(torch.zeros(cfg.text_len, cfg.text_dim)) if text else None
        self.layers = nn.ModuleList(AdaLNZeroBlock(d, cfg.heads, cfg.mlp_ratio, cross_attention=text)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, self.patch ** 2 * self.out_channels)
        self.repa_projector = (nn.Sequential(nn.Linear(d, cfg.repa_hidden), nn.SiLU(),
                                             nn.Linear(cfg.repa_hidden, cfg.repa_hidden), nn.SiLU(),
                                             nn.Linear(cfg.repa_hidden, cfg.repa_dim)) if cfg.repa_depth else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init: xavier-uniform Linear weights (the patch conv as a flattened Linear), zero biases,
        sin-cos positions, label table and timestep MLP ~ N(0, 0.02), zero adaLN modulations and zero
        output layer (so a fresh DiT predicts exactly 0). PixArt-alpha: caption MLP ~ N(0, 0.02), zero
        cross-attention output; null caption ~ N(0, 1 / text_dim). REPA projector: xavier (its repo's
        basic init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        d = self.cfg.hidden
        pos = sincos_2d(d, self.grid) if self.spatial else sincos_1d(d, torch.arange(self.num_patches))
        with torch.no_grad():
            self.pos_embed.copy_(pos[None])
        self.t_embedder.reset_parameters()
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.caption_proj is not None:
            nn.init.normal_(self.caption_proj[0].weight, std=0.02)
            nn.init.normal_(self.caption_proj[2].weight, std=0.02)
            nn.init.normal_(self.null_caption, std=self.cfg.text_dim ** -0.5)
        for layer in self.layers:
            layer.reset_parameters()
        self.final_layer.reset_parameters()

    @functools.cached_property  # the config is fixed after construction; forward checks against it
    def token_spec(self) -> TokenSpec:
        """Continuous tokens: (C, S, S) latents in 2D mode, (N, C) tokens in 1D mode; ``dim`` = C."""
        cfg = self.cfg
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size) if self.spatial else (cfg.input_size, cfg.in_channels)
        if cfg.condition == "text":
            condition = "text"
        else:
            condition = "class" if cfg.num_classes > 0 else "none"
        return TokenSpec(shape=shape, resolution=0, dim=cfg.in_channels, condition=condition)

    def blocks(self) -> list[nn.Module]:
        """The unit of FSDP sharding and activation checkpointing."""
        return list(self.layers)

    # -- conditioning --------------------------------------------------------------------------
    def null_condition(self, batch: int, device: torch.device | str | None = None) -> Condition:
        """The unconditional condition for ``batch`` rows: the null class, or the null caption with
        an all-True mask; ``Condition()`` for an unconditional model."""
        device = device if device is not None else self.pos_embed.device
        if self.null_caption is not None:
            text = self.null_caption[None].expand(batch, -1, -1).to(device)
            return Condition(text=text, text_mask=torch.ones(text.shape[:2], dtype=torch.bool, device=device))
        if self.y_embedder is not None:
            return Condition(labels=torch.full((batch,), self.null_class, dtype=torch.long, device=device))
        return Condition()

    def _drop(self, cond: Condition, b: int, device: torch.device) -> torch.Tensor | None:
        """(B,) bool: rows replaced by the null condition (training only, w.p. class_dropout).
        ``cond.extra["dropout_u"]`` (B,) uniform [0, 1) draws replace the model's own (keyed
        per-sample randomness, so multi-rank runs drop the same rows as one process)."""
        if not self.training or self.cfg.class_dropout <= 0:
            return None
        u = cond.extra.get("dropout_u")
        u = torch.rand(b, device=device) if u is None else u.to(device)
        return u < self.cfg.class_dropout

    def _labels(self, cond: Condition, b: int, device: torch.device) -> torch.Tensor:
        """Class embeddings (B, D); missing labels -> the null class."""
        labels = cond.labels
        if labels is None:
            labels = torch.full((b,), self.null_class, dtype=torch.long, device=device)
        labels = labels.long()
        drop = self._drop(cond, b, device)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.y_embedder(labels)

    def _pad_caption(self, text: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption (B, L, text_dim) and mask (B, L) (None = all real) -> padded (masked) to text_len."""
        b, length, width = text.shape
        if length > self.cfg.text_len:
            raise ValueError(f"caption of {length} tokens; this DiT takes at most text_len={self.cfg.text_len}")
        if width != self.cfg.text_dim:
            raise ValueError(f"caption width {width}; this DiT was built for text_dim={self.cfg.text_dim}")
        mask = torch.ones(b, length, dtype=torch.bool, device=text.device) if mask is None else mask.bool()
        pad = self.cfg.text_len - length
        if pad:
            text = torch.cat([text, text.new_zeros(b, pad, width)], 1)
            mask = torch.cat([mask, mask.new_zeros(b, pad)], 1)
        return text, mask

    def _caption(self, cond: Condition, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected caption (B, text_len, D) and its mask (B, text_len) bool; captions shorter than
        ``text_len`` are padded (masked), missing or dropped ones are the null caption."""
        null = self.null_condition(b, device)
        if cond.text is None:
            text, mask = null.text, null.text_mask
        else:
            text, mask = self._pad_caption(cond.text.to(null.text.dtype), cond.text_mask)
            drop = self._drop(cond, b, device)
            if drop is not None:
                text = torch.where(drop[:, None, None], null.text, text)
                mask = mask | drop[:, None]
        return self.caption_proj(text), mask

    # -- training ------------------------------------------------------------------------------
    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S) or (B, N, C) -> (B, num_patches, D) with positions added."""
        expected = self.token_spec.shape
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"tokens of shape {tuple(x.shape[1:])} per sample; this DiT was built for {expected}")
        h = self.x_embedder(x)
        if self.spatial:
            h = h.flatten(2).transpose(1, 2)
        return h + self.pos_embed.to(h.dtype)

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """(B, num_patches, p*p*C') -> (B, C', S, S) in 2D mode (per-patch order p, q, C' as DiT);
        1D mode returns (B, N, C') unchanged."""
        if not self.spatial:
            return out
        b, g, p, c = out.shape[0], self.grid, self.patch, self.out_channels
        return out.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def _time(self, t: torch.Tensor | float, b: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        t = t * self.cfg.time_scale if t.is_floating_point() else t
        return t.expand(b) if t.dim() == 0 else t

    def forward(self, x_t: torch.Tensor, cond: Condition, t: torch.Tensor | float
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Diffusion prediction for noisy tokens x_t (B, *token_spec.shape) at times t (B,) (float in
        [0, 1], or int DDPM steps; see the module docstring) under ``cond`` (labels (B,) or text
        (B, L, text_dim) + text_mask (B, L); missing = unconditional).

        Returns the prediction (B, C', S, S) / (B, N, C') (C' = 2C with learn_sigma: the first C
        channels are the prediction), or with REPA on ``(prediction, features (B, num_patches,
        repa_dim))``. In training, conditions go null w.p. ``class_dropout``."""
        b, device = x_t.shape[0], x_t.device
        h = self.embed_tokens(x_t)
        c = self.t_embedder(self._time(t, b, device))
        context = context_mask = None
        if self.caption_proj is not None:
            context, context_mask = self._caption(cond, b, device)
        elif self.y_embedder is not None:
            c = c + self._labels(cond, b, device)
        features = None
        for i, layer in enumerate(self.layers):
            h = layer(h, c, context, context_mask)
            if self.repa_projector is not None and i + 1 == self.cfg.repa_depth:
                features = self.repa_projector(h)
        out = self.unpatchify(self.final_layer(h, c))
        return out if features is None else (out, features)

    @property
    def channel_dim(self) -> int:
        """The axis of the output channels: 1 for (B, C', S, S) latents, -1 for (B, N, C') tokens."""
        return 1 if self.spatial else -1

    def prediction(self, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The first C channels of ``forward``'s output (drops the learned-sigma channels and REPA)."""
        out = out[0] if isinstance(out, tuple) else out
        return out.narrow(self.channel_dim, 0, self.cfg.in_channels)

    def diffusion_net(self, learned_sigma: bool = False) -> Callable[[torch.Tensor, torch.Tensor, Condition],
                                                                      torch.Tensor]:
        """This model as the ``net(x_t, t, cond) -> prediction`` of ``vtok.models.diffusion``: the
        first C channels, or all C' with ``learned_sigma`` (for ``GaussianDiffusion(channel_dim=
        self.channel_dim)``); REPA features are dropped. Float t in [0, 1] (flow), int t (DDPM)."""
        def net(x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
            out = self(x_t, cond, t)
            out = out[0] if isinstance(out, tuple) else out
            return out if learned_sigma else self.prediction(out)
        return net

    # -- sampling ------------------------------------------------------------------------------
    def full_condition(self, cond: Condition, b: int, device: torch.device) -> Condition:
        """``cond`` with missing fields filled by the null ones (so it concatenates with them)."""
        null = self.null_condition(b, device)
        if self.null_caption is not None:
            if cond.text is None:
                return null
            text, mask = self._pad_caption(cond.text, cond.text_mask)
            return Condition(text=text, text_mask=mask)
        if self.y_embedder is not None:
            return Condition(labels=null.labels if cond.labels is None else cond.labels)
        return null

    def guided_prediction(self, x: torch.Tensor, cond: Condition, t: torch.Tensor,
                          guidance: Guidance | float | None = None) -> torch.Tensor:
        """Guided prediction (B, *shape) at x (B, *shape), t (B,) float in [0, 1]: CFG u + s (c - u)
        (or APG with a ``Guidance``), the conditional and null rows in ONE forward on 2B rows."""
        b = x.shape[0]
        return guided(self.diffusion_net(), x, t, self.full_condition(cond, b, x.device),
                      self.null_condition(b, x.device),
                      guidance)

    @torch.no_grad()
    def generate(self, cond: Condition, num_tokens: int | None = None, *, steps: int = 50,
                 guidance: Guidance | float | None = 1.0, solver: str = "euler", shift: float = 1.0,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample tokens (B, *token_spec.shape) for ``cond`` (B = len(cond) rows) by integrating the
        rectified flow from t = 1 (noise) to t = 0 with ``vtok.models.diffusion.RectifiedFlow``
        (``solver`` "euler" | "heun", ``steps``, timestep ``shift``).

        ``guidance``: a CFG scale (1 = off) or a ``Guidance`` (interval, APG); when on, every step
        runs one forward on 2B rows (conditional + null). ``temperature`` scales the starting noise
        (0: deterministic). ``generator`` seeds the noise; ``noise`` (B, *shape) replaces it.
        ``num_tokens`` must be None or the fixed count (S*S latent positions, or N tokens)."""
        spec = self.token_spec
        positions = self.cfg.input_size ** 2 if self.spatial else self.cfg.input_size
        if num_tokens not in (None, positions, self.num_patches):
            raise ValueError(f"num_tokens={num_tokens}: this DiT always samples {positions} token positions")
        b = len(cond)
        if b == 0:
            raise ValueError("generate needs the batch size: give labels (B,) or text (B, L, D) in the Condition")
        g = as_guidance(guidance)
        if g is not None and g.enabled and self.y_embedder is None and self.null_caption is None:
            raise ValueError("classifier-free guidance needs a conditional model (num_classes > 0 or text)")
        device = self.pos_embed.device
        cond = self.full_condition(cond.to(device), b, device)
        if noise is None:
            noise = torch.randn((b, *spec.shape), generator=generator, device=device)
        was_training = self.training
        self.eval()
        try:
            return RectifiedFlow(shift=shift).sample(
                self.diffusion_net(), noise.shape, cond, steps=steps, solver=solver, guidance=g,
                null_cond=self.null_condition(b, device), noise=temperature * noise.to(device).float())
        finally:
            self.train(was_training)


__all__ = ["DiT", "DiTConfig"]
