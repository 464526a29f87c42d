"""FQGAN tokenizer (Bai et al. 2024): a VQGAN whose encoder ends in k factor heads, each quantized by
its own sub-codebook; the decoder sees the k sub-codes concatenated. k = 1 without adapters is
LlamaGen's VQGAN.

Per head (k >= 2): shared CNN trunk -> FactorAdapter (6-layer transformer at the trunk width) ->
GroupNorm, SiLU, conv to ``z_channels`` -> 1x1 conv to the codebook dim -> l2-normalised VQ.
Feature-prediction heads (MLP + 3-layer transformer + CLS token) read chosen sub-codes and predict a
frozen teacher's global feature for representation alignment. Head order follows the official
code: Dual = [visual, semantic]; Triple = [visual, semantic-mid (DINOv2), semantic-high (CLIP)].
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from vtok.models.api import Condition, TokenSpec
from vtok.models.layers import Block
from vtok.models.quant import FactorizedQuantizer, L2VectorQuantizer, QuantizerOutput
from vtok.models.tokenizers.vqgan import CNNConfig, Decoder, Encoder, norm


@dataclass
class FQGANConfig:
    cnn: CNNConfig = field(default_factory=CNNConfig)
    image_size: int = 256  # sets the adapters' positional grid
    num_codebooks: int = 1
    vq: L2VectorQuantizer.Config = field(default_factory=L2VectorQuantizer.Config)
    disentangle_weight: float = 0.1
    adapter_layers: int = 6  # 0: no adapters (plain VQGAN heads)
    adapter_heads: int = 8
    # One feature-prediction head per aligned codebook: codebook index -> teacher feature width.
    align: dict[int, int] = field(default_factory=dict)
    align_layers: int = 3
    align_heads: int = 8

    @property
    def grid(self) -> int:
        return self.image_size // self.cnn.downsample


class TokenGrid(nn.Module):
    """Learned positions + pre/post LayerNorm around transformer blocks, over an (H*W, D) grid."""

    def __init__(self, width: int, tokens: int, layers: int, heads: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(tokens, width) * width ** -0.5)
        self.norm_pre, self.norm_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(x + self.pos[: x.shape[1]])
        for layer in self.layers:
            x = layer(x)
        return self.norm_post(x)


class FactorAdapter(TokenGrid):
    """(B, C, H, W) -> (B, C, H, W): a transformer over the trunk's feature grid, one per factor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = super().forward(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)


class FeaturePredictionHead(TokenGrid):
    """Sub-codes (B, D, H, W) -> predicted teacher global feature (B, width) from a CLS token."""

    def __init__(self, code_dim: int, width: int, grid_tokens: int, layers: int, heads: int):
        super().__init__(width, grid_tokens + 1, layers, heads)
        self.lift = nn.Sequential(nn.Linear(code_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.cls = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.lift(codes.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return super().forward(x)[:, 0]


class EncoderHead(nn.Sequential):
    """Trunk features -> (adapter) -> GroupNorm, SiLU, conv to z -> 1x1 conv to the codebook dim."""

    def __init__(self, cfg: FQGANConfig, adapter: bool):
        top = cfg.cnn.ch * cfg.cnn.ch_mult[-1]
        parts = [FactorAdapter(top, cfg.grid ** 2, cfg.adapter_layers, cfg.adapter_heads)] if adapter else []
        parts += [norm(top), nn.SiLU(), nn.Conv2d(top, cfg.cnn.z_channels, 3, padding=1),
                  nn.Conv2d(cfg.cnn.z_channels, cfg.vq.dim, 1)]
        super().__init__(*parts)


@dataclass
class TokenizerOutput:
    """``reconstruction`` (B, 3, H, W); ``quant`` the quantizer's output; ``aligned`` predicted
    teacher features by codebook index, each (B, width)."""

    reconstruction: torch.Tensor
    quant: QuantizerOutput
    aligned: dict[int, torch.Tensor]


class FQGAN(nn.Module):
    """images (B, 3, H, W) in [-1, 1] <-> codes (B, k, H/f, W/f) over k sub-codebooks."""

    def __init__(self, cfg: FQGANConfig):
        super().__init__()
        self.cfg = cfg
        trunk = Encoder(cfg.cnn)
        self.conv_in, self.levels, self.mid = trunk.conv_in, trunk.levels, trunk.mid  # heads replace its output
        self.heads = nn.ModuleList(EncoderHead(cfg, self.uses_adapters) for _ in range(cfg.num_codebooks))
        self.quantizer = FactorizedQuantizer(FactorizedQuantizer.Config(
            num_codebooks=cfg.num_codebooks, vq=cfg.vq, disentangle_weight=cfg.disentangle_weight))
        self.post_quant = nn.Conv2d(cfg.num_codebooks * cfg.vq.dim, cfg.cnn.z_channels, 1)
        self.decoder = Decoder(cfg.cnn)
        self.align_heads = nn.ModuleDict({
            str(i): FeaturePredictionHead(cfg.vq.dim, width, cfg.grid ** 2, cfg.align_layers, cfg.align_heads)
            for i, width in cfg.align.items()})

    @functools.cached_property  # the config is fixed after construction; forward checks against it
    def token_spec(self) -> TokenSpec:
        """Codes (k, H/f, W/f) over k sub-codebooks at ``image_size``. With factor adapters (learned
        positions over the grid) only ``image_size`` is accepted; a plain VQGAN takes any multiple of f."""
        cfg = self.cfg
        grid = cfg.grid
        return TokenSpec(shape=(cfg.num_codebooks, grid, grid), resolution=cfg.image_size,
                         vocab_sizes=(cfg.vq.codebook_size,) * cfg.num_codebooks, downsample=cfg.cnn.downsample,
                         resolutions=(cfg.image_size,) if self.uses_adapters else ())

    @property
    def uses_adapters(self) -> bool:
        return self.cfg.num_codebooks > 1 and self.cfg.adapter_layers > 0

    def blocks(self) -> list[nn.Module]:
        """Units for FSDP sharding and activation checkpointing."""
        return [*self.levels, self.mid, *self.heads, *self.decoder.blocks()]

    def _quantize(self, images: torch.Tensor) -> QuantizerOutput:
        self.token_spec.check_resolution(images.shape[-1])
        h = self.conv_in(images)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.quantizer([head(h) for head in self.heads])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Concatenated sub-codes (B, k*D, h, w) -> images (B, 3, H, W)."""
        return self.decoder(self.post_quant(codes))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        quant = self._quantize(images)
        d = self.cfg.vq.dim
        aligned = {int(i): head(quant.quantized[:, int(i) * d:(int(i) + 1) * d])
                   for i, head in self.align_heads.items()}
        return TokenizerOutput(self.decode_codes(quant.quantized), quant, aligned)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> indices (B, k, H/f, W/f); ``cond`` is unused."""
        return self._quantize(images).indices

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cond: Condition | None = None, **sampling) -> torch.Tensor:
        """indices (B, k, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (not clamped); a deterministic
        decoder, so ``cond`` and ``sampling`` are unused."""
        return self.decode_codes(self.quantizer.lookup(tokens))
