"""Model sizes by name. A test walks this registry: each full-size entry builds on ``meta`` with its
published parameter count, and each tiny sibling runs forward + backward on CPU."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from vtok.config import RecipeError
from vtok.models.generators import GPT, DiT, DiTConfig, GPTConfig
from vtok.models.quant import FSQ, L2VectorQuantizer
from vtok.models.tokenizers.flextok import FlexTok, FlexTokConfig
from vtok.models.tokenizers.fqgan import FQGAN, FQGANConfig
from vtok.models.tokenizers.textok import TexTok, TexTokConfig
from vtok.models.tokenizers.vqgan import CNNConfig


@dataclass(frozen=True)
class Entry:
    """A registered size: ``model(config)`` builds it; ``params`` is the published count (official
    code, see shared/PAPERS.md), None for tiny sizes."""

    model: type[nn.Module]
    config: Any  # the model's config dataclass, filled in for this size
    params: int | None
    source: str = ""

    @property
    def kind(self) -> str:
        """"tokenizer" | "generator": the contract the model class implements (vtok.models.api)."""
        return "generator" if hasattr(self.model, "generate") else "tokenizer"

    def build(self, **overrides: Any) -> nn.Module:
        """The model with fresh weights; ``overrides``: fields of its config (nested dicts allowed)."""
        base = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        return self.model(config_from_dict(type(self.config), {**base, **overrides}))


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Dataclass ``cls`` from a JSON-style dict: nested dataclasses from dicts, tuples from lists,
    int dict keys from strings; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise RecipeError(f"{cls.__qualname__} has no field(s) {sorted(unknown)}")
    return cls(**{k: _convert(hints[k], v) for k, v in values.items()})


def _convert(tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    if origin is tuple and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        return tuple(_convert(item, v) for v in value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_convert(args[0], v) for v in value]
    if origin is dict and isinstance(value, dict):
        kt, vt = args
        return {(int(k) if kt is int else k): _convert(vt, v) for k, v in value.items()}
    return value


F16, F8 = CNNConfig(), CNNConfig(ch_mult=(1, 2, 2, 4))
DUAL_ALIGN = {1: 1024}  # semantic codebook -> CLIP ViT-L/14 (1024)
TRIPLE_ALIGN = {1: 384, 2: 768}  # mid -> DINOv2-S (384), high -> CLIP ViT-B/16 (768)
# Tiny siblings: same classes, sizes that run in a unit test or a CPU smoke run at 32-64 px.
TINY_CNN = CNNConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32)
TINY = dict(image_size=64, vq=L2VectorQuantizer.Config(codebook_size=256, dim=8), adapter_layers=1,
            adapter_heads=2, align_layers=1, align_heads=2)


def fqgan(cnn: CNNConfig, k: int, align: dict[int, int], params: int | None, source: str = "", **kw) -> Entry:
    return Entry(FQGAN, FQGANConfig(cnn=cnn, num_codebooks=k, align=dict(align), **kw), params, source)


def gpt(depth: int, dim: int, heads: int, params: int | None, source: str = "", k: int = 1,
        head_layers: int = 0, **kw) -> Entry:
    """LlamaGen GPT sizes (vocab 16,384 per sub-codebook, 16x16 tokens, 1,000 classes unless overridden);
    ``k`` > 1 with ``head_layers`` gives FQGAN's FAR."""
    cfg = GPTConfig(**{**dict(depth=depth, dim=dim, heads=heads, vocab_sizes=(16384,) * k,
                              head_layers=head_layers), **kw})
    return Entry(GPT, cfg, params, source)


DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}  # depth, width, heads


def dit(size: str, patch: int, params: int | None, source: str = "", **kw) -> Entry:
    """DiT sizes S/B/L/XL (facebookresearch/DiT models.py) at ``patch`` 2/4/8 on 32x32x4 SD-VAE latents,
    1,000 classes, learned sigma, unless ``kw`` overrides config fields."""
    depth, hidden, heads = DIT_SIZES[size]
    cfg = DiTConfig(**{**dict(depth=depth, hidden=hidden, heads=heads, patch_size=patch), **kw})
    return Entry(DiT, cfg, params, source)


def flextok(encoder_depth: int, decoder_depth: int, params: int | None, source: str = "", **kw) -> Entry:
    """FlexTok sizes d{enc}-d{dec} (apple/ml-flextok): width 64 x depth, head dim 64, on 32x32x16 VAE
    latents (256 px), 256 registers, FSQ [8, 8, 8, 5, 5, 5], REPA off (its projector is training-only
    and not in the published counts), unless ``kw`` overrides config fields."""
    cfg = FlexTokConfig(**{**dict(encoder_depth=encoder_depth, encoder_width=64 * encoder_depth,
                                  decoder_depth=decoder_depth, decoder_width=64 * decoder_depth), **kw})
    return Entry(FlexTok, cfg, params, source)


def textok(resolution: int, n: int, params: int | None = None, source: str = "", **kw) -> Entry:
    """TexTok-B (ViT-B tokenizer + detokenizer) at ``resolution`` px with ``n`` tokens of d = 8: patch 8
    and T5-XL text (2048) at 256 px, patch 16 and T5-XXL (4096) at 512 px (shared/PAPERS.md); ``kw``
    overrides config fields (``text_dim=0``: the no-text baseline)."""
    patch, text_dim = {256: (8, 2048), 512: (16, 4096)}[resolution]
    cfg = TexTokConfig(**{**dict(image_size=resolution, patch_size=patch, num_tokens=n, text_dim=text_dim), **kw})
    return Entry(TexTok, cfg, params, source)


def textok_pair(name: str, resolution: int, n: int, params: int | None = None, source: str = "", **kw
                ) -> dict[str, Entry]:
    """``name`` (text-conditioned) and ``name-notext`` (the same class with ``text_dim=0``)."""
    baseline = f"{source} no-text baseline".strip()
    return {name: textok(resolution, n, params, source, **kw),
            f"{name}-notext": textok(resolution, n, None, baseline, **{**kw, "text_dim": 0})}


# 64 px in 8x8 patches, 32 tokens of d = 8 (dit-tiny-1d's token shape), a 32-wide random-T5 text
TINY_TEXTOK = dict(width=64, depth=2, heads=2, text_dim=32, text_len=16)
TEXTOK_B = 175_338_440  # TexTok-B 256 px N=128 T5-XL, counted here (paper: ~176M; see textok.py)

# 8x8x4 latents (64 px at x8) in 2x2 patches, 16 registers over FSQ [8, 5, 5, 5] (1,000 codes)
TINY_FLEXTOK = dict(encoder_width=64, decoder_width=64, head_dim=32, latent_channels=4, latent_size=8,
                    num_registers=16, fsq=FSQ.Config(levels=(8, 5, 5, 5)), nested_dropout="uniform")
TINY_DIT = dict(depth=2, hidden=64, heads=4, num_classes=24)
TINY_1D = dict(token_mode="1d", input_size=32, in_channels=8)
TINY_GPT = dict(depth=4, dim=128, heads=4, token_shape=(8, 8), num_classes=24)

MODELS: dict[str, Entry] = {
    "vqgan-f16": fqgan(F16, 1, {}, 71_883_403, "LlamaGen VQ-16"),
    "fqgan-dual-f16": fqgan(F16, 2, DUAL_ALIGN, 150_410_131, "FQGAN-Dual VQ-16 with head"),
    "fqgan-triple-f16": fqgan(F16, 3, TRIPLE_ALIGN, 159_295_515, "FQGAN-Triple VQ-16 with heads"),
    "vqgan-f8": fqgan(F8, 1, {}, None, "LlamaGen VQ-8 layout (no published count here)"),
    "fqgan-dual-f8": fqgan(F8, 2, DUAL_ALIGN, None, "FQGAN-Dual x8"),
    "fqgan-triple-f8": fqgan(F8, 3, TRIPLE_ALIGN, None, "FQGAN-Triple x8"),
    "vqgan-tiny": fqgan(TINY_CNN, 1, {}, None, **TINY),
    "fqgan-dual-tiny": fqgan(TINY_CNN, 2, {1: 32}, None, **TINY),
    "fqgan-triple-tiny": fqgan(TINY_CNN, 3, {1: 16, 2: 32}, None, **TINY),
    # FlexTok (apple/ml-flextok classes counted on meta, encoder + decoder to 10k, VAE excluded; PAPERS.md)
    "flextok-d12-d12": flextok(12, 12, 257_440_000, "FlexTok d12-d12: 85.19M + 172.25M"),
    "flextok-d18-d18": flextok(18, 18, 865_320_000, "FlexTok d18-d18: 287.03M + 578.29M"),
    "flextok-d18-d28": flextok(18, 28, 2_456_310_000, "FlexTok d18-d28: 287.03M + 2169.28M"),
    "flextok-tiny": flextok(2, 2, None, **TINY_FLEXTOK),
    # TexTok (no official code; layout and count in vtok/models/tokenizers/textok.py), each with its no-text twin
    **textok_pair("textok-b-256-n32", 256, 32, source="TexTok-B 256 px N=32"),
    **textok_pair("textok-b-256-n64", 256, 64, source="TexTok-B 256 px N=64"),
    **textok_pair("textok-b-256-n128", 256, 128, TEXTOK_B, "TexTok-B 256 px N=128 (paper: ~176M)"),
    **textok_pair("textok-b-256-n256", 256, 256, source="TexTok-B 256 px N=256"),
    **textok_pair("textok-b-512-n32", 512, 32, source="TexTok-B 512 px N=32"),
    **textok_pair("textok-b-512-n128", 512, 128, source="TexTok-B 512 px N=128"),
    **textok_pair("textok-tiny", 256, 32, image_size=64, patch_size=8, **TINY_TEXTOK),
    # generators (LlamaGen autoregressive/models/gpt.py; FQGAN autoregressive/models/far_*.py)
    "gpt-b": gpt(12, 768, 12, 110_888_448, "LlamaGen GPT-B"),
    "gpt-l": gpt(24, 1024, 16, 342_910_976, "LlamaGen GPT-L"),
    "gpt-xl": gpt(36, 1280, 20, 774_699_520, "LlamaGen GPT-XL"),
    "gpt-xxl": gpt(48, 1536, 24, 1_410_972_672, "LlamaGen GPT-XXL"),
    "gpt-3b": gpt(24, 3200, 32, 3_096_659_200, "LlamaGen GPT-3B"),
    "far-b-dual": gpt(24, 1024, 16, 417_104_896, "FAR-B: GPT-L + 3 head layers", k=2, head_layers=3),
    "far-l-dual": gpt(36, 1280, 20, 901_195_520, "FAR-L: GPT-XL + 4 head layers", k=2, head_layers=4),
    "far-b-triple": gpt(24, 1024, 16, 451_707_904, "FAR-B (triple)", k=3, head_layers=3),
    "far-l-triple": gpt(36, 1280, 20, 944_776_960, "FAR-L (triple)", k=3, head_layers=4),
    "gpt-tiny": gpt(**TINY_GPT, params=None),
    "far-dual-tiny": gpt(**TINY_GPT, params=None, k=2, head_layers=1),
    "far-triple-tiny": gpt(**TINY_GPT, params=None, k=3, head_layers=1),
    # DiT (facebookresearch/DiT models.py, counted from its layout incl. the frozen sin-cos table;
    # /2 counts published in shared/PAPERS.md; /4 and /8 computed from the same layout)
    "dit-s-2": dit("s", 2, 32_963_360, "DiT-S/2"),
    "dit-b-2": dit("b", 2, 130_512_416, "DiT-B/2"),
    "dit-l-2": dit("l", 2, 458_102_816, "DiT-L/2"),
    "dit-xl-2": dit("xl", 2, 675_129_632, "DiT-XL/2"),
    "dit-s-4": dit("s", 4, 32_945_024, "DiT-S/4 (official layout)"),
    "dit-b-4": dit("b", 4, 130_475_648, "DiT-B/4 (official layout)"),
    "dit-l-4": dit("l", 4, 458_053_760, "DiT-L/4 (official layout)"),
    "dit-xl-4": dit("xl", 4, 675_074_432, "DiT-XL/4 (official layout)"),
    "dit-s-8": dit("s", 8, 33_148_160, "DiT-S/8 (official layout)"),
    "dit-b-8": dit("b", 8, 130_881_536, "DiT-B/8 (official layout)"),
    "dit-l-8": dit("l", 8, 458_594_816, "DiT-L/8 (official layout)"),
    "dit-xl-8": dit("xl", 8, 675_683_072, "DiT-XL/8 (official layout)"),
    "dit-tiny": dit("s", 2, None, **TINY_DIT, input_size=8),  # 8x8x4 latents
    "dit-tiny-1d": dit("s", 1, None, **TINY_DIT, **TINY_1D),  # 32 x 8 TexTok-style tokens
    "dit-t2i-tiny": dit("s", 1, None, **{**TINY_DIT, "num_classes": 0}, **TINY_1D, condition="text",
                        text_dim=32, text_len=16),
}


def build_model(name: str, **overrides) -> nn.Module:
    """The registered model ``name`` with fresh weights (``overrides``: fields of its config)."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"unknown model {name!r}{hint}; registered: {', '.join(MODELS)}")
    return MODELS[name].build(**overrides)


__all__ = ["MODELS", "Entry", "build_model", "config_from_dict"]
