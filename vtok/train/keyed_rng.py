"""Per-sample random draws keyed by the sample, so any split of a global batch draws the same numbers.

Diffusion-style tasks draw noise, timesteps and condition dropout for every sample. With one
generator per rank, 2 ranks x 4 samples draw different numbers than 1 process x 8 samples, and a
multi-rank run cannot be checked against the single-process trajectory. Here every sample gets its own
generator seeded from ``(seed, step, key)``: the draws for a sample at a step are the same whichever
rank, batch position or world size it lands on, and they change from step to step (a sample seen in
two epochs gets new noise).

    draws = KeyedDraws(batch["__key__"], step, seed=recipe.seed, device=x.device)
    t = draws.uniform()                  # (B,)
    noise = draws.normal(x.shape[1:])    # (B, *shape)

Draws are made on the CPU in float32 (a few µs per sample) and moved to ``device``; each call
consumes the next numbers of every sample's stream, so the order of calls is part of the recipe.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def sample_seed(key: str, step: int, seed: int = 0) -> int:
    """A 63-bit seed from (seed, step, key), stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}\x1f{step}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class KeyedDraws:
    """One CPU generator per sample key; each method returns a (B, ...) batch of draws on ``device``."""

    def __init__(self, keys: Sequence[str], step: int, seed: int = 0, device: torch.device | str = "cpu"):
        if not len(keys):
            raise ValueError("KeyedDraws needs the batch's sample keys (batch['__key__'])")
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(str(k), step, seed)) for k in keys]

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draw, shape: Sequence[int]) -> torch.Tensor:
        out = torch.stack([draw(tuple(shape), g) for g in self.generators])
        return out.to(self.device, non_blocking=True)

    def normal(self, shape: Sequence[int] = ()) -> torch.Tensor:
        """Standard normal draws (B, *shape), float32."""
        return self._stack(lambda s, g: torch.randn(s, generator=g), shape)

    def uniform(self, shape: Sequence[int] = ()) -> torch.Tensor:
        """Uniform [0, 1) draws (B, *shape), float32."""
        return self._stack(lambda s, g: torch.rand(s, generator=g), shape)

    def integers(self, high: int, shape: Sequence[int] = ()) -> torch.Tensor:
        """Uniform integers in [0, high) (B, *shape), int64."""
        return self._stack(lambda s, g: torch.randint(0, high, s, generator=g), shape)


__all__ = ["KeyedDraws", "sample_seed"]
