"""Frozen image-encoder teacher: tokenizer images in [-1, 1] -> one global feature per image."""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class Teacher(nn.Module):
    """A frozen image encoder with its own input preprocessing.

    ``forward`` takes tokenizer images (B, 3, H, W) in [-1, 1] of any size, maps them to [0, 1],
    resizes them to ``image_size`` x ``image_size`` (bicubic, antialiased), normalizes them with
    ``mean`` / ``std`` and returns the encoder's global feature (B, feature_dim) in float32, without
    gradient. On CUDA devices with bf16 support the encoder runs under bf16 autocast; on CPU in fp32.

    The wrapped ``encoder`` maps normalized images (B, 3, image_size, image_size) to (B, feature_dim).
    It is put in eval mode with gradients off, and stays in eval mode whatever ``train()`` is called
    with, so dropout / drop-path never act on teacher targets.
    """

    def __init__(self, encoder: nn.Module, image_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float], feature_dim: int):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"Teacher mean/std need 3 channels, got mean={mean} std={std}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.feature_dim = int(feature_dim)
        # Non-persistent: follow .to(device) but stay out of state_dict (they are not weights).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        """Set this module's mode; the wrapped encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalized float32 (B, 3, image_size, image_size)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Teacher expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = (images.float() + 1.0) / 2.0
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; keep the [0, 1] range the encoder was trained on
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> float32 features (B, feature_dim), or (B, N, feature_dim) for a
        per-token encoder (DINOv2 ``feature="tokens"``), detached."""
        x = self.preprocess(images)
        if x.is_cuda and torch.cuda.is_bf16_supported():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = self.encoder(x)
        else:
            feats = self.encoder(x)
        return feats.float()

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, feature_dim={self.feature_dim}"


def check_weights_file(path: str, what: str, model_name: str, config_key: str) -> None:
    """Raise a one-line FileNotFoundError when the teacher weights file ``path`` is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} teacher weights not found: {path}; download {model_name} weights on a machine with "
            f"internet and pass {config_key}=PATH")


def load_state_dict_safely(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file without running pickled code: safetensors, else weights_only torch.load."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def unknown_model_error(what: str, model_name: str, known: Iterable[str]) -> ValueError:
    """A one-line ValueError for an unknown model name, listing the closest known names."""
    close = difflib.get_close_matches(model_name, list(known), n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ValueError(f"unknown {what} teacher model {model_name!r}{hint}")
