"""Frozen pretrained encoders behind one factory: a ``PretrainedSpec`` names the family (``kind``),
the model, the local weights file and which feature to return.

    encoder = build_pretrained(PretrainedSpec(kind="clip", model="ViT-L-14", weights="clip.pt"))
    feats = encoder(images)            # (B, 3, H, W) in [-1, 1] -> (B, C), frozen, no grad

Families register a loader with ``@register_pretrained("kind")``; today CLIP (open_clip) and DINOv2
(timm) image encoders (``vtok.models.teachers``); DINOv2 also gives patch tokens (REPA targets). Weights always come from a local path (no hub).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from vtok.config import RecipeError

FEATURES = ("cls", "embedding", "tokens")


@dataclass
class PretrainedSpec:
    """A frozen pretrained encoder: ``kind`` (a registered family), ``model`` (its model name),
    ``weights`` (local file), ``feature`` ("cls": the pooled CLS feature before any projection,
    "embedding": CLIP's projected embedding, "tokens": per-patch features (B, N, D); DINOv2 only),
    ``tag`` (open_clip's pretrained tag of the file, which fixes mean/std and QuickGELU, e.g.
    "openai"), ``image_size`` (DINOv2's input side; position embeddings are resampled to it)."""

    kind: str = "clip"
    model: str = "ViT-L-14"
    weights: str = ""
    feature: str = "cls"
    tag: str = ""
    image_size: int = 0  # the encoder's input size (0 = its default; DINOv2: 224); dinov2 only


PRETRAINED: dict[str, Callable[[PretrainedSpec], nn.Module]] = {}


def register_pretrained(kind: str) -> Callable[[Callable], Callable]:
    """Decorator: ``loader(spec) -> frozen nn.Module`` becomes available as ``kind``."""
    def deco(loader: Callable[[PretrainedSpec], nn.Module]) -> Callable[[PretrainedSpec], nn.Module]:
        PRETRAINED[kind] = loader
        return loader
    return deco


def build_pretrained(spec: PretrainedSpec, where: str = "model.teachers") -> nn.Module:
    """The frozen encoder ``spec`` names; one-line ``RecipeError`` for an unknown kind or feature."""
    if spec.kind not in PRETRAINED:
        close = difflib.get_close_matches(spec.kind, list(PRETRAINED), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"{where}: kind={spec.kind!r} is not a pretrained encoder{hint}; "
                          f"known: {', '.join(sorted(PRETRAINED))}")
    if spec.feature not in FEATURES:
        raise RecipeError(f"{where}: feature={spec.feature!r}: expected one of {', '.join(FEATURES)}")
    return PRETRAINED[spec.kind](spec)


def _unsupported(spec: PretrainedSpec, where: str, supported: tuple[str, ...]) -> RecipeError:
    return RecipeError(f"{where}: kind={spec.kind} gives feature {'/'.join(supported)}, not {spec.feature!r}")


@register_pretrained("clip")
def _clip(spec: PretrainedSpec) -> nn.Module:
    from vtok.models import teachers

    if spec.feature not in ("cls", "embedding"):
        raise _unsupported(spec, "model.teachers", ("cls", "embedding"))
    return teachers.load_clip_teacher(spec.model, spec.weights, pretrained_tag=spec.tag or None,
                                      feature=spec.feature)


@register_pretrained("dinov2")
def _dinov2(spec: PretrainedSpec) -> nn.Module:
    from vtok.models import teachers

    if spec.feature not in ("cls", "tokens"):
        raise _unsupported(spec, "model.teachers", ("cls", "tokens"))
    size = {"img_size": spec.image_size} if spec.image_size else {}
    return teachers.load_dinov2_teacher(spec.model, spec.weights, feature=spec.feature, **size)


__all__ = ["FEATURES", "PRETRAINED", "PretrainedSpec", "build_pretrained", "register_pretrained"]
