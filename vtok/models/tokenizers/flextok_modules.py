"""FlexTok's encoder and rectified-flow decoder (Bachmann et al. 2025; layout of apple/ml-flextok, see
shared/PAPERS.md "FlexTok"). ``vtok.models.tokenizers.flextok`` assembles them into the tokenizer.

Both work on 2x2 patches of VAE latents, (B, P, p*p*C) with P = (S/p)^2, plus fixed 2D sin-cos
positions. Blocks: head dim 64, SwiGLU MLP (hidden int(8D/3)), no biases in qkv / proj / MLP,
affine-free LayerNorm computed in fp32, QK-norm with the same norm, xavier init.

Encoder: [patches | R learned registers] under the prefix-LM mask (patches see only patches;
register i sees every patch and registers <= i, so a register never depends on later ones), then
affine-free LN + zero-initialised Linear(D, code_dim) on the registers (the FSQ input).

Decoder: [noised patches + positions | Linear(code_dim, D)(register codes) + learned register
positions], full attention, adaLN-Zero with one modulation head for the patches and one for the
registers (``GroupedAdaLNBlock``), DiT time embedding with max_period 256 on ``t * time_scale``,
adaLN output layer (zero-initialised; its affine-free fp32 LayerNorm has the blocks' eps, as the
official ``ToPatchesLinearHead``) to p*p*C per patch. As in the official decoder (module order
positions -> ``MaskedNestedDropout`` -> null condition), the register positions are added first and
then registers at positions >= keep_k (per sample) become ONE learned mask token, with no position;
keep_k = 0 is the null condition for classifier-free guidance: every register is one learned null
token (the official ``LearnedNullCond``; a null token of zeros is its ``ZeroNullCond``).
Optional REPA projector (Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, z)) on
the patch tokens after decoder block ``repa_depth``.
"""
from __future__ import annotations

import torch
from torch import nn

from vtok.models.layers import (Block, FinalLayer, GroupedAdaLNBlock, TimestepEmbedder, make_norm,
                                prefix_lm_mask, sincos_2d)

NORM = "layer_fp32"  # affine-free LayerNorm in fp32, for blocks, QK-norm and heads


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FlexTokEncoder(nn.Module):
    """patches (B, P, in_dim) -> pre-quantization register codes (B, R, code_dim)."""

    def __init__(self, *, in_dim: int, grid: int, num_registers: int, code_dim: int, width: int, depth: int,
                 head_dim: int = 64, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"encoder width {width} is not a multiple of the head dim {head_dim}")
        self.grid, self.num_patches, self.num_registers = grid, grid * grid, num_registers
        self.patch_embed = nn.Linear(in_dim, width)
        self.register_buffer("pos_embed", torch.zeros(self.num_patches, width), persistent=False)
        self.registers = nn.Parameter(torch.zeros(num_registers, width))
        self.layers = nn.ModuleList(
            Block(width, width // head_dim, mlp_ratio, norm=NORM, mlp="swiglu", bias=False, eps=eps,
                  qk_norm=NORM, swiglu_multiple_of=1) for _ in range(depth))
        self.norm = make_norm(NORM, width, eps)
        self.head = nn.Linear(width, code_dim)

    def reset_parameters(self) -> None:
        """xavier Linear weights, zero biases, registers ~ N(0, 0.02), sin-cos positions, zero head."""
        _xavier(self)
        nn.init.normal_(self.registers, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[1], self.grid))

    def attention_mask(self, device: torch.device | str) -> torch.Tensor:
        """(P + R, P + R) bool, True = attend: the prefix-LM mask over [patches | registers]."""
        return prefix_lm_mask(self.num_patches, self.num_patches + self.num_registers, device)

    def hidden(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, P, in_dim) -> last hidden states (B, P + R, D) of [patches | registers]."""
        b = patches.shape[0]
        x = self.patch_embed(patches) + self.pos_embed.to(patches.dtype)
        x = torch.cat([x, self.registers.to(x.dtype)[None].expand(b, -1, -1)], dim=1)
        mask = self.attention_mask(x.device)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.hidden(patches)[:, self.num_patches:]))


class FlexTokDecoder(nn.Module):
    """Velocity of the rectified flow: x_t patches (B, P, in_dim), t (B,) float in [0, 1], register
    codes (B, R', code_dim) (R' <= R; missing positions count as masked), keep_k (B,) int ->
    (prediction (B, P, in_dim), REPA features (B, P, repa_dim) or None)."""

    def __init__(self, *, in_dim: int, grid: int, num_registers: int, code_dim: int, width: int, depth: int,
                 head_dim: int = 64, mlp_ratio: float = 4.0, eps: float = 1e-5, time_scale: float = 1000.0,
                 time_max_period: float = 256.0, repa_depth: int = 0, repa_dim: int = 0, repa_hidden: int = 2048):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"decoder width {width} is not a multiple of the head dim {head_dim}")
        if repa_depth and not (1 <= repa_depth <= depth and repa_dim >= 1):
            raise ValueError(f"repa_depth={repa_depth} must be in 1..{depth} with repa_dim >= 1")
        self.grid, self.num_patches, self.num_registers = grid, grid * grid, num_registers
        self.time_scale, self.repa_depth = time_scale, repa_depth
        self.patch_embed = nn.Linear(in_dim, width)
        self.register_buffer("pos_embed", torch.zeros(self.num_patches, width), persistent=False)
        self.code_embed = nn.Linear(code_dim, width)
        self.register_pos = nn.Parameter(torch.zeros(num_registers, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.null_token = nn.Parameter(torch.zeros(width))
        self.t_embedder = TimestepEmbedder(width, max_period=time_max_period)
        self.layers = nn.ModuleList(GroupedAdaLNBlock(width, width // head_dim, 2, mlp_ratio=mlp_ratio, eps=eps)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(width, in_dim)
        self.final_layer.norm_final = make_norm(NORM, width, eps)  # official: Fp32LayerNorm, eps as the blocks
        self.repa_projector = (nn.Sequential(nn.Linear(width, repa_hidden), nn.SiLU(),
                                             nn.Linear(repa_hidden, repa_hidden), nn.SiLU(),
                                             nn.Linear(repa_hidden, repa_dim)) if repa_depth else None)

    def reset_parameters(self) -> None:
        """xavier Linear weights (time MLP included, as the official embedder), zero biases; register
        positions, mask and null tokens ~ N(0, 0.02); zero adaLN modulations and output layer."""
        _xavier(self)
        for p in (self.register_pos, self.mask_token, self.null_token):
            nn.init.normal_(p, std=0.02)
        for layer in self.layers:
            layer.reset_parameters()
        self.final_layer.reset_parameters()
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[1], self.grid))

    def embed_registers(self, codes: torch.Tensor, keep_k: torch.Tensor) -> torch.Tensor:
        """codes (B, R', code_dim), keep_k (B,) -> register tokens (B, R, D): Linear(codes) + the
        register positions at positions < keep_k, the bare mask token elsewhere (nested dropout after
        the positions, as the official decoder); keep_k = 0 (the null condition): the null token at
        every position."""
        b, n = codes.shape[:2]
        if n > self.num_registers:
            raise ValueError(f"{n} register codes; this decoder takes at most {self.num_registers}")
        h = self.code_embed(codes.to(self.code_embed.weight.dtype))
        if n < self.num_registers:
            h = torch.cat([h, h.new_zeros(b, self.num_registers - n, h.shape[-1])], dim=1)
        h = h + self.register_pos.to(h.dtype)
        keep_k = keep_k.to(h.device).view(-1, 1)
        keep = torch.arange(self.num_registers, device=h.device)[None] < keep_k
        h = torch.where(keep[..., None], h, self.mask_token.to(h.dtype))
        return torch.where((keep_k == 0)[..., None], self.null_token.to(h.dtype), h)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, keep_k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.t_embedder(t.float() * self.time_scale)
        patches = self.patch_embed(x_t.to(c.dtype)) + self.pos_embed.to(c.dtype)
        x = torch.cat([patches, self.embed_registers(codes, keep_k).to(patches.dtype)], dim=1)
        sizes = (self.num_patches, self.num_registers)
        features = None
        for i, layer in enumerate(self.layers):
            x = layer(x, c, sizes)  # full attention: no mask
            if self.repa_projector is not None and i + 1 == self.repa_depth:
                features = self.repa_projector(x[:, :self.num_patches])
        return self.final_layer(x[:, :self.num_patches], c), features


__all__ = ["FlexTokDecoder", "FlexTokEncoder"]
