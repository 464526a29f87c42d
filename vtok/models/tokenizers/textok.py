"""TexTok (Zha et al., CVPR 2025, "Language-Guided Image Tokenization for Generation"): a ViT
tokenizer and detokenizer that both read the caption's frozen T5 embeddings in context.

    images (B, 3, H, W) --p x p patches, Linear + learned positions--> P patch tokens
    tokenizer   [P patch tokens | N learned image tokens | L text tokens] --ViT--> N image tokens
        --> LN + Linear(D, 8) --> continuous tokens (B, N, 8)
    detokenizer [P mask tokens + learned positions | Linear(8, D)(tokens) + learned positions | L text tokens]
        --ViT--> P patch tokens --> LN + Linear(D, p*p*3) --> unpatchify --> images (B, 3, H, W)

Text: precomputed T5 embeddings ``Condition.text`` (B, L, Dt) with ``Condition.text_mask`` (B, L)
bool (True = real token; None = all real). Each side projects them with its own Linear(Dt, D) (no
text positions: T5's outputs already carry their order). Padded text positions are masked out of
attention as keys (a (B, 1, 1, S) boolean SDPA mask); queries at those positions compute something
that is dropped, so padding never changes the tokens or the pixels. The **no-text baseline** is this
class with ``text_dim=0``: no text tokens, no text projections, and any condition is ignored.

Blocks: vtok's pre-LN ``Block`` in its ViT flavour (LayerNorm eps 1e-6, GELU MLP ratio 4, qkv and
MLP biases), a final LayerNorm on each side. FlexTok's blocks are SwiGLU without biases and with
QK-norm, so the two families do not share a block configuration (only the ``Block`` class).
Positions are learned (std 0.02, as ViT / TiTok); the paper does not say which it uses.

Parameter count of TexTok-B (width 768, depth 12, heads 12 per side) at 256 px, patch 8, N = 128,
T5-XL text (2048): 175,338,440 (the paper: ~176M "for tokenizer + detokenizer"). Included: both
12-block ViTs (2 x 85,054,464) with their final LayerNorms, the patch embedding Linear(192, 768),
1,024 learned patch positions per side, the 128 learned image tokens, the detokenizer's mask token
and 128 token positions, Linear(8, 768), both text projections Linear(2048, 768), the token head
Linear(768, 8) and the pixel head Linear(768, 192). Excluded: the frozen T5 encoder, the
discriminator and the LPIPS network (training-only).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from vtok.config import RecipeError
from vtok.models.api import Condition, TokenSpec
from vtok.models.layers import Block


@dataclass
class TexTokConfig:
    image_size: int = 256
    patch_size: int = 8  # 8 at 256 px, 16 at 512 px
    num_tokens: int = 128  # N continuous tokens per image
    token_dim: int = 8  # d of each token
    width: int = 768  # ViT-B, both sides
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    text_dim: int = 2048  # T5-XL 2048 (256 px), T5-XXL 4096 (512 px); 0 = the no-text baseline
    text_len: int = 128  # T5 tokens per caption the model is trained with (precompute pads to this)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"TexTokConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"TexTokConfig: width {self.width} is not divisible by {self.heads} heads")
        if self.num_tokens < 1 or self.token_dim < 1 or self.text_dim < 0:
            raise ValueError("TexTokConfig: num_tokens and token_dim must be >= 1 and text_dim >= 0")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def use_text(self) -> bool:
        return self.text_dim > 0


@dataclass
class TexTokOutput:
    """Training forward: ``reconstruction`` (B, 3, H, W) and the continuous ``tokens`` (B, N, d)."""

    reconstruction: torch.Tensor
    tokens: torch.Tensor


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), row-major patches flattened as (p, q, C) (DiT's order)."""
    b, c, h, w = images.shape
    return images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: int, channels: int = 3) -> torch.Tensor:
    """(B, grid*grid, p*p*C) -> (B, C, grid*p, grid*p); the inverse of ``patchify``."""
    b = patches.shape[0]
    x = patches.reshape(b, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * p, grid * p)


class _ViT(nn.Module):
    """Blocks + final LayerNorm over a token sequence: (B, S, D), key mask (B, 1, 1, S) -> (B, S, D)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, eps=cfg.norm_eps)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class TexTokEncoder(nn.Module):
    """images (B, 3, H, W), text (B, L, D) projected (or None), key mask -> tokens (B, N, d)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch_size ** 2 * 3, cfg.width)
        self.patch_pos = nn.Parameter(torch.empty(cfg.grid ** 2, cfg.width))
        self.image_tokens = nn.Parameter(torch.empty(cfg.num_tokens, cfg.width))
        self.text_proj = nn.Linear(cfg.text_dim, cfg.width) if cfg.use_text else None
        self.vit = _ViT(cfg)
        self.head = nn.Linear(cfg.width, cfg.token_dim)  # after the ViT's final LayerNorm
        self.patch_size = cfg.patch_size

    def forward(self, images: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(patchify(images, self.patch_size)) + self.patch_pos
        n = self.image_tokens.shape[0]
        parts = [x, self.image_tokens.expand(x.shape[0], -1, -1).to(x.dtype)]
        if self.text_proj is not None and text is not None:
            parts.append(self.text_proj(text))
        x = self.vit(torch.cat(parts, 1), mask)
        p = self.patch_pos.shape[0]
        return self.head(x[:, p:p + n])


class TexTokDecoder(nn.Module):
    """tokens (B, N, d), text (B, L, Dt) (or None), key mask -> images (B, 3, H, W)."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.mask_token = nn.Parameter(torch.empty(cfg.width))
        self.patch_pos = nn.Parameter(torch.empty(cfg.grid ** 2, cfg.width))
        self.token_embed = nn.Linear(cfg.token_dim, cfg.width)
        self.token_pos = nn.Parameter(torch.empty(cfg.num_tokens, cfg.width))
        self.text_proj = nn.Linear(cfg.text_dim, cfg.width) if cfg.use_text else None
        self.vit = _ViT(cfg)
        self.head = nn.Linear(cfg.width, cfg.patch_size ** 2 * 3)
        self.patch_size, self.grid = cfg.patch_size, cfg.grid

    def forward(self, tokens: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        b = tokens.shape[0]
        z = self.token_embed(tokens) + self.token_pos
        patches = (self.mask_token + self.patch_pos).expand(b, -1, -1).to(z.dtype)
        parts = [patches, z]
        if self.text_proj is not None and text is not None:
            parts.append(self.text_proj(text))
        x = self.vit(torch.cat(parts, 1), mask)
        return unpatchify(self.head(x[:, : self.grid ** 2]), self.patch_size, self.grid)


class TexTok(nn.Module):
    """images (B, 3, S, S) in [-1, 1] <-> continuous tokens (B, N, d), both sides conditioned on the
    caption's T5 embeddings (``text_dim > 0``) or on nothing (``text_dim = 0``, the no-text
    baseline); see the module docstring."""

    def __init__(self, cfg: TexTokConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = TexTokEncoder(cfg)
        self.decoder = TexTokDecoder(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights truncated-normal (std 0.02), biases 0, LayerNorms 1 / 0, learned tokens and
        positions normal (std 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.encoder.patch_pos, self.encoder.image_tokens, self.decoder.mask_token,
                  self.decoder.patch_pos, self.decoder.token_pos):
            nn.init.normal_(p, std=0.02)

    @functools.cached_property  # the config is fixed after construction
    def token_spec(self) -> TokenSpec:
        """Continuous 1D tokens (N, d) of ``image_size`` px images (the positional tables fix it);
        decoding needs the caption ("text") unless this is the no-text baseline ("none")."""
        cfg = self.cfg
        return TokenSpec(shape=(cfg.num_tokens, cfg.token_dim), resolution=cfg.image_size, dim=cfg.token_dim,
                         resolutions=(cfg.image_size,), condition="text" if cfg.use_text else "none")

    def blocks(self) -> list[nn.Module]:
        """Units for FSDP sharding and activation checkpointing."""
        return [*self.encoder.vit.layers, *self.decoder.vit.layers]

    # -- text ----------------------------------------------------------------------------------
    def _text(self, cond: Condition | None, batch: int, lead: int
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The raw text (B, L, Dt) and the key mask (B, 1, 1, lead + L) for a sequence whose first
        ``lead`` positions are image-side tokens; (None, None) for the no-text model or no padding."""
        if not self.cfg.use_text:
            return None, None
        if cond is None or cond.text is None:
            raise RecipeError("this TexTok reads captions: pass Condition(text=<T5 embeddings (B, L, "
                              f"{self.cfg.text_dim})>, text_mask=...) (the shards' text_emb / text_mask), "
                              "or use a no-text model (text_dim=0)")
        text = cond.text
        if text.dim() != 3 or text.shape[0] != batch or text.shape[-1] != self.cfg.text_dim:
            raise RecipeError(f"text embeddings of shape {tuple(text.shape)}: this TexTok expects "
                              f"({batch}, L, {self.cfg.text_dim}); encode captions with the T5 it was trained with")
        param = self.encoder.text_proj.weight
        text = text.to(device=param.device, dtype=param.dtype)
        if cond.text_mask is None:
            return text, None
        keep = cond.text_mask.to(param.device).bool()
        if tuple(keep.shape) != tuple(text.shape[:2]):
            raise RecipeError(f"text_mask of shape {tuple(keep.shape)} does not match text embeddings "
                              f"{tuple(text.shape)}; pass the (B, L) mask written with them")
        if bool(keep.all()):
            return text, None
        mask = torch.cat([keep.new_ones(batch, lead), keep], 1)
        return text, mask[:, None, None, :]

    # -- the two halves --------------------------------------------------------------------------
    def tokenize(self, images: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> tokens (B, N, d), with gradients (training)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images of shape {tuple(images.shape)}; expected (B, 3, H, W)")
        self.token_spec.check_resolution(images.shape[-1])
        if images.shape[-2] != images.shape[-1]:
            raise ValueError(f"images of shape {tuple(images.shape)}: TexTok takes square images")
        lead = self.cfg.grid ** 2 + self.cfg.num_tokens
        text, mask = self._text(cond, images.shape[0], lead)
        return self.encoder(images.to(self.encoder.patch_embed.weight.dtype), text, mask)

    def detokenize(self, tokens: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """tokens (B, N, d) -> images (B, 3, S, S) in [-1, 1] (not clamped), with gradients."""
        shape = (self.cfg.num_tokens, self.cfg.token_dim)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != shape:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}; this TexTok decodes (B, {shape[0]}, {shape[1]})")
        lead = self.cfg.grid ** 2 + self.cfg.num_tokens
        text, mask = self._text(cond, tokens.shape[0], lead)
        tokens = tokens.to(self.decoder.token_embed.weight.dtype)
        return self.decoder(tokens, text, mask)

    def forward(self, images: torch.Tensor, cond: Condition | None = None) -> TexTokOutput:
        """Training forward: images (B, 3, S, S) -> reconstruction and tokens (``TexTokOutput``)."""
        tokens = self.tokenize(images, cond)
        return TexTokOutput(self.detokenize(tokens, cond), tokens)

    # -- the Tokenizer contract ------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> continuous tokens (B, N, d); ``cond``: the captions'
        T5 embeddings (ignored by the no-text baseline)."""
        return self.tokenize(images, cond)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cond: Condition | None = None, **sampling) -> torch.Tensor:
        """tokens (B, N, d) -> images (B, 3, S, S) in [-1, 1] (not clamped); a deterministic decoder,
        so ``sampling`` is unused; ``cond`` as for ``encode``."""
        return self.detokenize(tokens, cond)


__all__ = ["TexTok", "TexTokConfig", "TexTokDecoder", "TexTokEncoder", "TexTokOutput", "patchify", "unpatchify"]
