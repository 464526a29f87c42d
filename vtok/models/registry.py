"""Model sizes by name. A test walks this registry: each full-size entry builds on ``meta`` with its
published parameter count, and each tiny sibling runs forward + backward on CPU."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from vtok.models.generators import GPT, GPTConfig
from vtok.models.quant import L2VectorQuantizer
from vtok.models.tokenizers.fqgan import FQGAN, FQGANConfig
from vtok.models.tokenizers.vqgan import CNNConfig


@dataclass(frozen=True)
class Entry:
    build: Callable[..., nn.Module]  # keyword overrides of the model's config, e.g. align={}
    params: int | None  # published count (official code, see shared/PAPERS.md); None for tiny sizes
    source: str = ""
    kind: str = "tokenizer"  # "tokenizer" | "generator"


F16, F8 = CNNConfig(), CNNConfig(ch_mult=(1, 2, 2, 4))
DUAL_ALIGN = {1: 1024}  # semantic codebook -> CLIP ViT-L/14 (1024)
TRIPLE_ALIGN = {1: 384, 2: 768}  # mid -> DINOv2-S (384), high -> CLIP ViT-B/16 (768)
# Tiny siblings: same classes, sizes that run in a unit test or a CPU smoke run at 32-64 px.
TINY_CNN = CNNConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32)
TINY = dict(image_size=64, vq=L2VectorQuantizer.Config(codebook_size=256, dim=8), adapter_layers=1,
            adapter_heads=2, align_layers=1, align_heads=2)


def fqgan(cnn: CNNConfig, k: int, align: dict[int, int], **kw) -> Callable[..., nn.Module]:
    return lambda **over: FQGAN(FQGANConfig(**{"cnn": cnn, "num_codebooks": k, "align": dict(align),
                                               **kw, **over}))


def gpt(depth: int, dim: int, heads: int, k: int = 1, head_layers: int = 0, **kw) -> Callable[..., nn.Module]:
    """LlamaGen GPT sizes (vocab 16,384 per sub-codebook, 16x16 tokens, 1,000 classes unless overridden);
    ``k`` > 1 with ``head_layers`` gives FQGAN's FAR."""
    base = dict(depth=depth, dim=dim, heads=heads, vocab_sizes=(16384,) * k, head_layers=head_layers, **kw)
    return lambda **over: GPT(GPTConfig(**{**base, **over}))


def generator(build: Callable[..., nn.Module], params: int | None, source: str = "") -> Entry:
    return Entry(build, params, source, kind="generator")


TINY_GPT = dict(depth=4, dim=128, heads=4, token_shape=(8, 8), num_classes=24)

MODELS: dict[str, Entry] = {
    "vqgan-f16": Entry(fqgan(F16, 1, {}), 71_883_403, "LlamaGen VQ-16"),
    "fqgan-dual-f16": Entry(fqgan(F16, 2, DUAL_ALIGN), 150_410_131, "FQGAN-Dual VQ-16 with head"),
    "fqgan-triple-f16": Entry(fqgan(F16, 3, TRIPLE_ALIGN), 159_295_515, "FQGAN-Triple VQ-16 with heads"),
    "vqgan-f8": Entry(fqgan(F8, 1, {}), None, "LlamaGen VQ-8 layout (no published count here)"),
    "fqgan-dual-f8": Entry(fqgan(F8, 2, DUAL_ALIGN), None, "FQGAN-Dual x8"),
    "fqgan-triple-f8": Entry(fqgan(F8, 3, TRIPLE_ALIGN), None, "FQGAN-Triple x8"),
    "vqgan-tiny": Entry(fqgan(TINY_CNN, 1, {}, **TINY), None),
    "fqgan-dual-tiny": Entry(fqgan(TINY_CNN, 2, {1: 32}, **TINY), None),
    "fqgan-triple-tiny": Entry(fqgan(TINY_CNN, 3, {1: 16, 2: 32}, **TINY), None),
    # generators (LlamaGen autoregressive/models/gpt.py; FQGAN autoregressive/models/far_*.py)
    "gpt-b": generator(gpt(12, 768, 12), 110_888_448, "LlamaGen GPT-B"),
    "gpt-l": generator(gpt(24, 1024, 16), 342_910_976, "LlamaGen GPT-L"),
    "gpt-xl": generator(gpt(36, 1280, 20), 774_699_520, "LlamaGen GPT-XL"),
    "gpt-xxl": generator(gpt(48, 1536, 24), 1_410_972_672, "LlamaGen GPT-XXL"),
    "gpt-3b": generator(gpt(24, 3200, 32), 3_096_659_200, "LlamaGen GPT-3B"),
    "far-b-dual": generator(gpt(24, 1024, 16, k=2, head_layers=3), 417_104_896, "FAR-B: GPT-L + 3 head layers"),
    "far-l-dual": generator(gpt(36, 1280, 20, k=2, head_layers=4), 901_195_520, "FAR-L: GPT-XL + 4 head layers"),
    "far-b-triple": generator(gpt(24, 1024, 16, k=3, head_layers=3), 451_707_904, "FAR-B (triple)"),
    "far-l-triple": generator(gpt(36, 1280, 20, k=3, head_layers=4), 944_776_960, "FAR-L (triple)"),
    "gpt-tiny": generator(gpt(**TINY_GPT), None),
    "far-dual-tiny": generator(gpt(**TINY_GPT, k=2, head_layers=1), None),
    "far-triple-tiny": generator(gpt(**TINY_GPT, k=3, head_layers=1), None),
}


def build_model(name: str, **overrides) -> nn.Module:
    """The registered model ``name`` with fresh weights (``overrides``: fields of its config)."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; registered: {', '.join(MODELS)}")
    return MODELS[name].build(**overrides)


__all__ = ["MODELS", "Entry", "build_model"]
