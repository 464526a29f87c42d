"""LPIPS (Zhang et al. 2018) with the VGG16 trunk: the perceptual loss of VQGAN / LlamaGen / FQGAN.

Both pieces load from local files (no hub): the VGG16 trunk from a torchvision ImageNet checkpoint
(``vgg16-397923af.pth``; only ``features.*`` is used) and the learned per-layer linear heads from
the ``lpips`` package's ``weights/v0.1/vgg.pth`` (7 KB, shipped in its wheel). Both are read with
``torch.load(weights_only=True)`` or safetensors.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg

from vtok.models.weights import load_state_dict_strict

# Input scaling LPIPS applies to [-1, 1] images before VGG (its ScalingLayer constants).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAPS = (3, 8, 15, 22, 29)  # VGG16 `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (tensors only: weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def lpips_heads_path() -> Path:
    """The VGG linear heads shipped in the ``lpips`` wheel."""
    import lpips

    return Path(os.path.dirname(lpips.__file__)) / "weights" / "v0.1" / "vgg.pth"


class _HeadsLayout(nn.Module):
    """The lpips package's key layout (``lin{i}.model.1.weight``) over our heads, for loading only."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        for i, head in enumerate(heads):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Identity(), head)  # index 1 is the conv (0 is lpips' dropout)
            self.add_module(f"lin{i}", lin)


class LPIPS(nn.Module):
    """d(x, y) per image: x, y (B, 3, H, W) in [-1, 1] -> (B,). Frozen; gradients flow to x and y."""

    def __init__(self, vgg_weights: str | Path, heads_weights: str | Path | None = None):
        super().__init__()
        if not Path(vgg_weights).is_file():
            raise FileNotFoundError(
                f"LPIPS VGG16 weights not found: {vgg_weights}; save torchvision's vgg16 ImageNet "
                "checkpoint (vgg16-397923af.pth) there, or set the perceptual weight to 0")
        # VGG16's `features` alone: building vgg16() would also initialise its 120M-parameter classifier
        trunk = vgg.make_layers(vgg.cfgs["D"])[: TAPS[-1] + 1]
        state = {k.removeprefix("features."): v for k, v in load_state(vgg_weights).items()
                 if k.startswith("features.") or not k.startswith("classifier.")}
        wanted = trunk.state_dict()  # a full vgg16 checkpoint also has the classifier: only check ours
        ours = {k: v for k, v in state.items() if k in wanted}
        load_state_dict_strict(trunk, ours or state, str(vgg_weights))
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        heads_file = heads_weights or lpips_heads_path()
        load_state_dict_strict(_HeadsLayout(self.heads), load_state(heads_file), str(heads_file))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.trunk):
            h = layer(h)
            if i in TAPS:
                feats.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit-norm channels
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self._features(x.float()), self._features(y.float())
        return sum(head((a - b).pow(2)).mean((1, 2, 3)) for head, a, b in zip(self.heads, fx, fy))
