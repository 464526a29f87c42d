"""FlexTok (Bachmann et al. 2025, "Resampling Images into 1D Token Sequences of Flexible Length"): VAE
latents -> 1..R ordered discrete tokens -> latents, with a rectified-flow decoder.

    latents (B, 16, 32, 32) --2x2 patches--> encoder [256 patches | 256 registers] (prefix-LM mask)
        --> LN + Linear(D, 6) --> FSQ [8, 8, 8, 5, 5, 5] --> ids (B, 1, 256) over 64,000 codes
    ids[:, :, :k] --> codes --> decoder [noised patches | registers, positions >= k masked]
        --> Euler from t = 1 (noise) to 0 --> latents (B, 16, 32, 32)

Input and output are latents of FlexTok's own frozen KL VAE (x8, 16 channels; ``vtok precompute
latents`` writes them, scaled by the VAE's scaling factor). The VAE is not part of this module, so
``encode`` / ``decode`` take and return latents, not pixels; ``token_spec.resolution`` is the image
resolution those latents come from (``latent_size * vae_downsample``), ``downsample`` is 0 (a fixed
count of 1D tokens) and ``resolutions`` holds only that resolution (the positional tables are sized
for it). ``input_shape`` gives the latent shape (C, S, S).

Training (``forward``): encode, draw keep_k (nested dropout), t (logit-normal) and noise, and
return the decoder's velocity prediction, the target ``noise - latents`` and the flow MSE. keep_k,
t and noise can all be passed in, so a task can draw them from its own seeded generators. A task
can equally use ``RectifiedFlow.loss(model.diffusion_net(), latents, model.condition(codes, keep_k))``.

Classifier-free guidance: the null condition is keep_k = 0, i.e. every register is one learned null
token (the official decoder's null condition replaces the whole register sequence after nested
dropout). Training sends a sample to it with probability ``null_prob``. Decoding with guidance
runs [cond; null] rows in one call and supports APG (``Guidance(scale=7.5, apg=True)``: momentum
-0.5, norm threshold 2.5, eta 0).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vtok.models.api import Condition, TokenSpec
from vtok.models.diffusion import Guidance, RectifiedFlow, as_guidance
from vtok.models.quant.base import QuantizerOutput
from vtok.models.quant.fsq import FSQ
from vtok.models.tokenizers.flextok_modules import FlexTokDecoder, FlexTokEncoder

NESTED_DROPOUT_MODES = ("uniform", "pow2", "uniform_pow2", "none")
# The official README's sampling setting (20 Euler steps, APG at scale 7.5); decode defaults to no guidance.
README_GUIDANCE = Guidance(scale=7.5, apg=True)


@dataclass
class FlexTokConfig:
    latent_channels: int = 16  # FlexTok's VAE
    latent_size: int = 32  # latent side S (256 px images at x8)
    vae_downsample: int = 8  # image pixels per latent pixel: token_spec.resolution = S * this
    patch_size: int = 2
    num_registers: int = 256  # R: tokens per image
    encoder_depth: int = 12
    encoder_width: int = 768
    decoder_depth: int = 12
    decoder_width: int = 768
    head_dim: int = 64  # heads = width / head_dim
    mlp_ratio: float = 4.0  # SwiGLU hidden int(2/3 * ratio * width) = int(8D/3)
    norm_eps: float = 1e-5  # official Fp32LayerNorm: nn.LayerNorm's default
    fsq: FSQ.Config = field(default_factory=FSQ.Config)
    nested_dropout: str = "pow2"  # keep_k per image: "uniform" 1..R | "pow2" | "uniform_pow2" | "none" (R)
    null_prob: float = 0.1  # training: P(keep_k = 0, the CFG null condition); unverified for FlexTok
    time_scale: float = 1000.0  # t in [0, 1] is embedded as t * time_scale (official: t in [0, 1000])
    time_max_period: float = 256.0
    flow_loc: float = 0.0  # logit-normal training times sigmoid(loc + scale * N(0, 1))
    flow_scale: float = 1.0
    flow_shift: float = 1.0
    repa_depth: int = 0  # REPA projector after this decoder block (1-based); 0 = off
    repa_dim: int = 0  # REPA target width (DINOv2-L: 1024)
    repa_hidden: int = 2048

    def __post_init__(self):
        if self.nested_dropout not in NESTED_DROPOUT_MODES:
            raise ValueError(f"FlexTokConfig.nested_dropout={self.nested_dropout!r}: expected one of "
                             f"{', '.join(NESTED_DROPOUT_MODES)}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent side {self.latent_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.null_prob < 1.0:
            raise ValueError(f"FlexTokConfig.null_prob={self.null_prob}: expected 0 <= p < 1")

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size


@dataclass
class FlexTokOutput:
    """Training forward: ``prediction`` / ``target`` velocities (B, C, S, S); ``losses`` {"flow": MSE};
    ``quant`` the FSQ output (codes (B, R, d), ids (B, R), usage metrics); ``keep_k`` (B,) int64 and
    ``t`` (B,) as used; ``repa`` (B, P, repa_dim) patch features or None."""

    prediction: torch.Tensor
    target: torch.Tensor
    losses: dict[str, torch.Tensor]
    quant: QuantizerOutput
    keep_k: torch.Tensor
    t: torch.Tensor
    repa: torch.Tensor | None = None


def powers_of_two(limit: int) -> list[int]:
    """[1, 2, 4, ...] up to ``limit`` (inclusive), plus ``limit`` itself if it is not a power of two."""
    out = [1 << i for i in range(limit.bit_length()) if (1 << i) <= limit]
    return out if out[-1] == limit else out + [limit]


def sample_keep_k(batch: int, num_registers: int, mode: str, *, null_prob: float = 0.0,
                  device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nested-dropout keep counts (batch,) int64: "uniform" in 1..R, "pow2" uniform over powers of two
    <= R, "uniform_pow2" uniform in 1..R rounded up to a power of two (capped at R), "none" all R;
    then 0 (the null condition) with probability ``null_prob``."""
    r = num_registers
    if mode == "uniform":
        k = torch.randint(1, r + 1, (batch,), device=device, generator=generator)
    elif mode == "pow2":
        choices = torch.tensor(powers_of_two(r), device=device)
        k = choices[torch.randint(0, len(choices), (batch,), device=device, generator=generator)]
    elif mode == "uniform_pow2":
        u = torch.randint(1, r + 1, (batch,), device=device, generator=generator)
        k = torch.clamp(2 ** torch.ceil(torch.log2(u.double())).long(), max=r)
    elif mode == "none":
        k = torch.full((batch,), r, device=device, dtype=torch.long)
    else:
        raise ValueError(f"nested dropout mode {mode!r}: expected one of {', '.join(NESTED_DROPOUT_MODES)}")
    if null_prob > 0:
        null = torch.rand(batch, device=device, generator=generator) < null_prob
        k = torch.where(null, torch.zeros_like(k), k)
    return k.long()


class FlexTok(nn.Module):
    """Latents (B, C, S, S) <-> ordered 1D token ids (B, 1, R); see the module docstring."""

    def __init__(self, cfg: FlexTokConfig):
        super().__init__()
        self.cfg = cfg
        self.quantizer = FSQ(cfg.fsq)
        in_dim = cfg.patch_size ** 2 * cfg.latent_channels
        common = dict(in_dim=in_dim, grid=cfg.grid, num_registers=cfg.num_registers, code_dim=self.quantizer.dim,
                      head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio, eps=cfg.norm_eps)
        self.encoder = FlexTokEncoder(width=cfg.encoder_width, depth=cfg.encoder_depth, **common)
        self.decoder = FlexTokDecoder(width=cfg.decoder_width, depth=cfg.decoder_depth, time_scale=cfg.time_scale,
                                      time_max_period=cfg.time_max_period, repa_depth=cfg.repa_depth,
                                      repa_dim=cfg.repa_dim, repa_hidden=cfg.repa_hidden, **common)
        self.flow = RectifiedFlow(cfg.flow_loc, cfg.flow_scale, cfg.flow_shift)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.decoder.reset_parameters()

    @functools.cached_property  # the config is fixed after construction
    def token_spec(self) -> TokenSpec:
        """Discrete ordered tokens (1, R) over one FSQ codebook, decodable from any prefix 1..R."""
        cfg = self.cfg
        resolution = cfg.latent_size * cfg.vae_downsample
        return TokenSpec(shape=(1, cfg.num_registers), resolution=resolution,
                         vocab_sizes=(self.quantizer.codebook_size,), resolutions=(resolution,),
                         ordered=True, variable_length=True)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The latent shape (C, S, S) that ``encode`` takes and ``decode`` returns."""
        return self.cfg.latent_channels, self.cfg.latent_size, self.cfg.latent_size

    def stale_state(self, state: dict[str, torch.Tensor]) -> str:
        """'' unless ``state`` (an export's weights) comes from a vtok older than the learned null token
        (``decoder.null_token``): then one line saying so and what to do. Such a decoder was trained
        with the null condition as "every register masked" and the mask token plus register positions
        at masked positions, which this decoder cannot express, so the file is not loaded at all."""
        if "decoder.null_token" in state:
            return ""
        from vtok.models.weights import key_names

        missing = [k for k in self.state_dict() if k not in state]
        return (f"missing keys: {len(missing)} ({key_names(missing)}): written by a vtok before FlexTok's "
                "learned null token and bare mask token, whose decoder conditions differently and cannot be "
                "loaded faithfully; re-export with this vtok (`vtok export RECIPE --out DIR`) from a checkpoint "
                "trained with it (checkpoints from before the change lack the key too: retrain)")

    def blocks(self) -> list[nn.Module]:
        """Units for FSDP sharding and activation checkpointing."""
        return [*self.encoder.layers, *self.decoder.layers]

    # -- patches -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, P, p*p*C), row-major patches, each flattened as (p, q, C) (DiT's order)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"latents of shape {tuple(x.shape[1:])}; this FlexTok takes {self.input_shape} "
                             f"(VAE latents of {self.token_spec.resolution} px images)")
        b, c, g, p = x.shape[0], x.shape[1], self.cfg.grid, self.cfg.patch_size
        return x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, p*p*C) -> (B, C, S, S); the inverse of ``patchify``."""
        b, g, p, c = x.shape[0], self.cfg.grid, self.cfg.patch_size, self.cfg.latent_channels
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    # -- encoding ------------------------------------------------------------------------------
    def encode_codes(self, latents: torch.Tensor) -> QuantizerOutput:
        """latents (B, C, S, S) -> FSQ output: codes (B, R, d) in [-1, 1] (straight-through), ids (B, R)."""
        return self.quantizer(self.encoder(self.patchify(latents)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """VAE latents (B, C, S, S) (named ``images`` by the Tokenizer contract) -> ids (B, 1, R),
        coarse to fine; ``cond`` is unused."""
        return self.encode_codes(images).indices[:, None]

    # -- decoder as a diffusion net ------------------------------------------------------------
    def condition(self, codes: torch.Tensor, keep_k: torch.Tensor) -> Condition:
        """The decoder's condition for ``vtok.models.diffusion``: codes (B, R', d), keep_k (B,)."""
        return Condition(extra={"codes": codes, "keep_k": keep_k.long()})

    def null_condition(self, batch: int, device: torch.device | str | None = None) -> Condition:
        """The CFG null condition: keep_k = 0, every register the null token."""
        device = device if device is not None else self.decoder.mask_token.device
        codes = torch.zeros(batch, self.cfg.num_registers, self.quantizer.dim, device=device)
        return self.condition(codes, torch.zeros(batch, dtype=torch.long, device=device))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, keep_k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_t (B, C, S, S), t (B,) in [0, 1], codes (B, R', d), keep_k (B,) -> (v (B, C, S, S),
        REPA features (B, P, repa_dim) or None)."""
        pred, features = self.decoder(self.patchify(x_t), t, codes, keep_k)
        return self.unpatchify(pred), features

    def diffusion_net(self) -> Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]:
        """``net(x_t, t, cond) -> v`` for ``RectifiedFlow`` (cond from ``condition``); REPA dropped."""
        def net(x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
            return self.velocity(x_t, t, cond.extra["codes"], cond.extra["keep_k"])[0]
        return net

    # -- training ------------------------------------------------------------------------------
    def sample_keep_k(self, batch: int, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """keep_k (batch,) by the configured nested-dropout mode, 0 w.p. ``null_prob``."""
        return sample_keep_k(batch, self.cfg.num_registers, self.cfg.nested_dropout, null_prob=self.cfg.null_prob,
                             device=device, generator=generator)

    def forward(self, latents: torch.Tensor, keep_k: torch.Tensor | None = None, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> FlexTokOutput:
        """Training step on latents (B, C, S, S). Missing ``keep_k`` (B,) is drawn in training mode (all
        R registers in eval mode), missing ``t`` (B,) from the logit-normal, missing ``noise`` ~ N(0, I)."""
        b, device = latents.shape[0], latents.device
        quant = self.encode_codes(latents)
        if keep_k is None:
            keep_k = (self.sample_keep_k(b, device) if self.training
                      else torch.full((b,), self.cfg.num_registers, dtype=torch.long, device=device))
        t = self.flow.sample_t(b, device) if t is None else t.to(device)
        noise = torch.randn_like(latents) if noise is None else noise
        pred, features = self.velocity(self.flow.interpolate(latents, noise, t), t, quant.quantized, keep_k)
        target = self.flow.target(latents, noise)
        loss = (pred.float() - target.float()).pow(2).mean()
        return FlexTokOutput(pred, target, {"flow": loss}, quant, keep_k.long(), t, features)

    # -- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cond: Condition | None = None, *, num_tokens: int | None = None,
               steps: int = 25, guidance: Guidance | float | None = None, solver: str = "euler",
               generator: torch.Generator | None = None, seed: int = 0, noise: torch.Tensor | None = None
               ) -> torch.Tensor:
        """ids (B, 1, n) or (B, n), n <= R, -> latents (B, C, S, S) by integrating the flow from t = 1
        to 0 (``steps`` Euler / Heun steps) conditioned on the first ``num_tokens`` ids (default n);
        the rest are masked. ``guidance``: CFG scale or ``Guidance`` (APG: ``README_GUIDANCE``)
        against the all-masked null condition. Noise comes from ``noise``, else ``generator``,
        else a generator seeded with ``seed`` (so decoding is reproducible); ``cond`` is unused."""
        ids = tokens[:, 0] if tokens.dim() == 3 else tokens
        if ids.dim() != 2 or ids.shape[1] > self.cfg.num_registers:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}; expected (B, 1, n) or (B, n) with "
                             f"n <= {self.cfg.num_registers}")
        b, n = ids.shape
        k = n if num_tokens is None else int(num_tokens)
        if not 0 <= k <= n:
            raise ValueError(f"num_tokens={num_tokens}: expected 0..{n} (the number of tokens given)")
        device = self.decoder.mask_token.device
        codes = self.quantizer.indices_to_codes(ids.to(device))
        if n < self.cfg.num_registers:  # pad to R (masked anyway) so the rows stack with the null ones
            codes = torch.cat([codes, codes.new_zeros(b, self.cfg.num_registers - n, codes.shape[-1])], 1)
        cond = self.condition(codes, torch.full((b,), k, dtype=torch.long, device=device))
        if noise is None:
            if generator is None:
                generator = torch.Generator(device).manual_seed(seed)
            noise = torch.randn((b, *self.input_shape), generator=generator, device=device)
        return self.flow.sample(self.diffusion_net(), noise.shape, cond, steps=steps, solver=solver,
                                guidance=as_guidance(guidance), null_cond=self.null_condition(b, device),
                                noise=noise.to(device).float())


__all__ = ["FlexTok", "FlexTokConfig", "FlexTokOutput", "NESTED_DROPOUT_MODES", "README_GUIDANCE",
           "powers_of_two", "sample_keep_k"]
