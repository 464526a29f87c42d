"""Model sizes by name. A test walks this registry: each full-size entry builds on ``meta`` with its
published parameter count, and each tiny sibling runs forward + backward on CPU."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from vtok.models.quant import L2VectorQuantizer
from vtok.models.tokenizers.fqgan import FQGAN, FQGANConfig
from vtok.models.tokenizers.vqgan import CNNConfig


@dataclass(frozen=True)
class Entry:
    build: Callable[..., nn.Module]  # keyword overrides of the model's config, e.g. align={}
    params: int | None  # published count (official code, see shared/PAPERS.md); None for tiny sizes
    source: str = ""


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
}


def build_model(name: str, **overrides) -> nn.Module:
    """The registered model ``name`` with fresh weights (``overrides``: fields of its config)."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; registered: {', '.join(MODELS)}")
    return MODELS[name].build(**overrides)


__all__ = ["MODELS", "Entry", "build_model"]
