"""The output every quantizer returns (VQ, factorized VQ, FSQ alike)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class QuantizerOutput:
    """``quantized``: straight-through codes, shaped like the input (B, D, H, W) or (B, N, D).
    ``indices``: int64 code ids, (B, H, W) / (B, N), with a leading codebook axis (B, K, ...) for
    factorized quantizers. ``losses``: weighted scalar losses to add to the objective.
    ``metrics``: detached scalars to log (never back-propagated)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def code_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Fraction of the codebook used by ``indices`` and the perplexity of their histogram.

    Perplexity = exp(entropy of the code frequencies): 1 when one code is used, ``codebook_size``
    when all are used equally.
    """
    if indices.is_meta:  # a histogram needs values (`vtok plan` runs models on meta): shapes only
        counts = indices.new_empty(codebook_size, dtype=torch.float32)
    else:
        counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device (nothing to turn off on ``meta``, where `vtok plan` runs models)."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)
