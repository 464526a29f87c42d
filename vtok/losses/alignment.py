"""Representation-alignment losses: a model's predicted features vs a frozen encoder's.

- ``infonce_alignment`` (FQGAN): batch InfoNCE over cosine similarities of global features, so each
  prediction must be closest to its own image's teacher feature among the batch.
- ``cosine_alignment`` (REPA, used by FlexTok's decoder and DiT): minus the mean cosine similarity of
  per-token features, matched position by position.
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
