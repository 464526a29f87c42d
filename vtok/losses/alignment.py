"""Representation-alignment losses: a model's predicted features vs a frozen encoder's.

- ``infonce_alignment`` (FQGAN): batch InfoNCE over cosine similarities of global features, so each
  prediction must be closest to its own image's teacher feature among the batch.
- ``cosine_alignment`` (REPA, used by FlexTok's decoder and DiT): minus the mean cosine similarity of
  per-token features, matched position by position.
- ``build_repa_teacher`` / ``tokens_on_grid``: REPA's frozen teacher (patch tokens at the student's
  grid x 14 px) and its tokens resampled onto the student's patch grid (DiT and FlexTok tasks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_alignment(pred: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the cosine-similarity matrix against the diagonal; pred, target: (B, C).
    FQGAN uses no temperature (1.0)."""
    logits = F.normalize(pred.float(), dim=-1) @ F.normalize(target.float(), dim=-1).t() / temperature
    return F.cross_entropy(logits, torch.arange(len(pred), device=pred.device))


def cosine_alignment(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean cos(pred_n, target_n) over tokens n and the batch; pred, target: (B, N, C)."""
    if pred.shape != target.shape:
        raise ValueError(f"cosine_alignment: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def tokens_on_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (B, N, C) of a square N = side^2 grid, bilinearly resampled to ``grid`` x ``grid``
    (B, grid^2, C) when the sides differ (REPA: a teacher's grid onto the student's)."""
    if tokens.shape[1] == grid * grid:
        return tokens
    side = int(round(tokens.shape[1] ** 0.5))
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


def build_repa_teacher(spec, *, grid: int, dim: int, fields, depth: int) -> torch.nn.Module:
    """The frozen encoder whose patch tokens REPA predicts (``spec``: a ``PretrainedSpec`` with
    feature "tokens"), by default at the student's ``grid`` x 14 px so teacher and student tokens
    match one to one (REPA: 224 px for a 16 x 16 grid). ``fields``: the recipe's data.fields (the
    teacher needs `image`); ``dim``: the student's projector width; ``depth``: model.repa_depth (for
    the messages). One-line RecipeErrors name the fix."""
    from dataclasses import replace

    from vtok.config import RecipeError
    from vtok.models.pretrained import build_pretrained

    if "image" not in fields:
        raise RecipeError(f"model.repa_depth={depth}: REPA needs the images for its teacher; "
                          "add `image` to data.fields")
    if spec.feature != "tokens":
        raise RecipeError("model.repa_teacher.feature must be `tokens` (per-patch features)")
    teacher = build_pretrained(replace(spec, image_size=spec.image_size or grid * 14), where="model.repa_teacher")
    if teacher.feature_dim != dim:
        raise RecipeError(f"model.repa_teacher gives {teacher.feature_dim}-d tokens but model.repa_dim="
                          f"{dim}; set model.repa_dim={teacher.feature_dim}")
    return teacher
