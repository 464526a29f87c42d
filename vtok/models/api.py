"""The contracts every model family implements: ``TokenSpec``, ``Condition``, ``Tokenizer``, ``Generator``.

A tokenizer maps images to tokens and back; a generator models the tokens of a frozen tokenizer.
Everything downstream (``vtok precompute``, ``vtok sample``, ``vtok eval``, the generator tasks,
``vtok.models.export``) talks to models only through these, so a new family is new model files plus
registry entries::

    spec = tokenizer.token_spec                    # what the tokens look like
    tokens = tokenizer.encode(images)              # (B, 3, H, W) in [-1, 1] -> (B, *spec.shape)
    images = tokenizer.decode(tokens)              # -> (B, 3, H, W) in [-1, 1] (not clamped)
    logits = generator(tokens, Condition(labels=y))
    tokens = generator.generate(Condition(labels=y), temperature=1.0)

Discrete tokens are integer ids ``(B, *shape)``; FQGAN's are ``(B, k, h, w)`` over ``k`` sub-codebooks.
Continuous tokens (TexTok) are floats ``(B, n, dim)``. Ordered, variable-length tokenizers (FlexTok)
decode any prefix of ``1..max_tokens`` tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch

from vtok.config import RecipeError

CONDITIONS = ("none", "class", "text")


class ResolutionError(RecipeError):
    """A model asked to work at a resolution it cannot take (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class TokenSpec:
    """What a tokenizer's tokens look like (and so what a generator on them must model).

    ``shape``: tokens per image at ``resolution``: discrete (k, h, w) or (k, n) with k sub-codes per
    position (k = len(vocab_sizes)); continuous 1D tokens (n, dim); continuous 2D latents (C, h, w).
    ``vocab_sizes``: one per sub-codebook for discrete tokens; empty for continuous ones.
    ``dim``: width of a continuous token (0 for discrete). ``downsample``: pixels per token side for
    spatial grids (the grid follows the resolution); 0 for 1D tokenizers (a fixed count).
    ``resolutions``: the resolutions the model takes; empty means any multiple of ``downsample``.
    ``ordered`` / ``variable_length``: coarse-to-fine 1D tokens that decode from any prefix (FlexTok).
    ``condition``: what decoding needs besides the tokens ("none" | "class" | "text").
    """

    shape: tuple[int, ...]
    resolution: int
    vocab_sizes: tuple[int, ...] = ()
    dim: int = 0
    downsample: int = 0
    resolutions: tuple[int, ...] = ()
    ordered: bool = False
    variable_length: bool = False
    condition: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "vocab_sizes", tuple(int(v) for v in self.vocab_sizes))
        object.__setattr__(self, "resolutions", tuple(int(r) for r in self.resolutions))
        if self.condition not in CONDITIONS:
            raise ValueError(f"TokenSpec.condition={self.condition!r}: expected one of {CONDITIONS}")
        if bool(self.vocab_sizes) == bool(self.dim):
            raise ValueError("TokenSpec: give vocab_sizes (discrete tokens) or dim (continuous), not both")
        if self.vocab_sizes and self.shape[0] != len(self.vocab_sizes):
            raise ValueError(f"TokenSpec: discrete shape {self.shape} must start with k = {len(self.vocab_sizes)}")

    @property
    def discrete(self) -> bool:
        return bool(self.vocab_sizes)

    @property
    def num_tokens(self) -> int:
        """Token positions per image (sub-codes of one position count once; continuous width excluded)."""
        if self.discrete or len(self.shape) == 3:  # (k, *grid) sub-codes, or (C, h, w) latents
            return math.prod(self.shape[1:])
        return math.prod(self.shape[:-1])  # (n, dim) continuous 1D tokens

    def check_resolution(self, resolution: int) -> None:
        """Raise a one-line ``ResolutionError`` when the model cannot take ``resolution`` px images."""
        if self.resolutions and resolution not in self.resolutions:
            allowed = ", ".join(map(str, self.resolutions))
            raise ResolutionError(f"resolution {resolution} px: this tokenizer was trained at {self.resolution} "
                                  f"px and takes only {allowed} px (its positional tables are sized for that); "
                                  f"pass --resolution {self.resolution}")
        if self.downsample and resolution % self.downsample:
            raise ResolutionError(f"resolution {resolution} px is not a multiple of the tokenizer's "
                                  f"downsampling factor {self.downsample} (trained at {self.resolution} px)")

    def at(self, resolution: int) -> TokenSpec:
        """This spec for ``resolution`` px images (the grid follows it for spatial tokenizers)."""
        self.check_resolution(resolution)
        if not self.downsample or resolution == self.resolution:
            return self
        grid = resolution // self.downsample
        return _replace(self, shape=(*self.shape[:-2], grid, grid), resolution=resolution)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def _replace(spec: TokenSpec, **changes: Any) -> TokenSpec:
    return TokenSpec(**{**{f.name: getattr(spec, f.name) for f in fields(spec)}, **changes})


@dataclass
class Condition:
    """What a sample is conditioned on, batched: class ids and/or text embeddings.

    ``labels``: (B,) int64 class ids. ``text``: (B, L, D) frozen text-encoder embeddings with
    ``text_mask`` (B, L) bool, True for real tokens. Empty fields mean unconditional.
    """

    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> Condition:
        """The condition fields of a loader batch (``cls``, ``text_emb``, ``text_mask``)."""
        return cls(labels=batch.get("cls"), text=batch.get("text_emb"), text_mask=batch.get("text_mask"))

    def __len__(self) -> int:
        for t in (self.labels, self.text):
            if t is not None:
                return int(t.shape[0])
        return 0

    def to(self, device: torch.device | str) -> Condition:
        def move(t):
            return None if t is None else t.to(device)
        return Condition(move(self.labels), move(self.text), move(self.text_mask),
                         {k: v.to(device) for k, v in self.extra.items()})


@runtime_checkable
class Tokenizer(Protocol):
    """Images <-> tokens. ``token_spec`` describes the tokens at the training resolution."""

    @property
    def token_spec(self) -> TokenSpec: ...

    def encode(self, images: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, *token_spec.at(H).shape)."""
        ...

    def decode(self, tokens: torch.Tensor, cond: Condition | None = None, **sampling: Any) -> torch.Tensor:
        """tokens -> images (B, 3, H, W) in [-1, 1] (not clamped); ``sampling`` for generative decoders."""
        ...


@runtime_checkable
class Generator(Protocol):
    """A model of a frozen tokenizer's tokens. ``token_spec`` is the spec of the tokens it models."""

    @property
    def token_spec(self) -> TokenSpec: ...

    def forward(self, tokens: torch.Tensor, cond: Condition) -> Any:
        """Training forward (teacher-forced logits, or the diffusion prediction)."""
        ...

    def generate(self, cond: Condition, num_tokens: int | None = None, **sampling: Any) -> torch.Tensor:
        """Sample tokens (B, *shape) for ``cond`` (B rows); ``num_tokens`` for variable-length models."""
        ...


def model_kind(model: Any) -> str:
    """"tokenizer" or "generator" by the contract ``model`` implements (generators have ``generate``)."""
    if hasattr(model, "generate") and isinstance(model, Generator):
        return "generator"
    if isinstance(model, Tokenizer):
        return "tokenizer"
    raise TypeError(f"{type(model).__name__} implements neither the Tokenizer nor the Generator contract")


__all__ = ["CONDITIONS", "Condition", "Generator", "ResolutionError", "TokenSpec", "Tokenizer", "model_kind"]
