"""timm DINOv2 ViT as a frozen teacher (weights from a local file only, never downloaded)."""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from vtok.models.teachers.base import Teacher, check_weights_file, load_state_dict_safely, unknown_model_error
from vtok.models.weights import load_state_dict_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224  # DINOv2's eval resolution (16 x 16 patches of 14 px); timm's default is 518


class PatchTokens(nn.Module):
    """A timm ViT -> its normalised patch tokens (B, N, D), prefix (CLS / register) tokens dropped:
    DINOv2's ``x_norm_patchtokens``, the REPA target."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)[:, self.num_prefix_tokens:]


def load_dinov2_teacher(model_name: str, weights_path: str, feature: str = "cls", **overrides: Any) -> Teacher:
    """A timm DINOv2 model as a frozen ``Teacher``: its pooled CLS feature after the final norm
    (``feature="cls"``, (B, D)) or its normalised patch tokens (``feature="tokens"``, (B, N, D) with
    N = (img_size / 14)^2, the REPA target).

    ``model_name``: a timm architecture, e.g. "vit_small_patch14_dinov2" (384-d) or
    "vit_base_patch14_dinov2" (768-d). ``weights_path``: a local .safetensors / .pth / .bin
    checkpoint, either timm's format or the original facebookresearch one (timm converts it).
    ``overrides``: extra ``timm.create_model`` kwargs; ``img_size`` (default 224, a multiple of the
    patch size) sets the teacher's input resolution, and timm resamples the checkpoint's position
    embeddings to it at load time.
    """
    import timm

    if feature not in ("cls", "tokens"):
        raise ValueError(f"DINOv2 teacher feature={feature!r}: expected 'cls' or 'tokens'")
    if not timm.is_model(model_name):
        raise unknown_model_error("DINOv2", model_name, timm.list_models())
    check_weights_file(weights_path, "DINOv2", model_name, "model.teachers[].weights")
    kwargs = {"img_size": DEFAULT_IMAGE_SIZE, **overrides, "num_classes": 0}  # num_classes=0: pooled features
    # Build the bare model and load the file ourselves (safetensors, or torch.load(weights_only=True)),
    # through timm's own checkpoint filter of the architecture (original DINOv2 key conversion,
    # position-embedding resampling to img_size), then a strict key/shape check with one-line errors.
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    state_dict = load_state_dict_safely(weights_path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    load_state_dict_strict(model, state_dict, weights_path)
    del state_dict
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        height, width = patch_embed.img_size
        patch = patch_embed.patch_size[0]
    else:
        height, width = cfg.get("input_size", (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))[-2:]
        patch = 1
    if height != width or height % patch:
        raise ValueError(f"DINOv2 teacher needs a square input size that is a multiple of the patch size "
                         f"{patch}, got {height}x{width}")
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    if feature == "tokens":
        feature_dim = model.num_features
        model = PatchTokens(model)
    teacher = Teacher(model, image_size=height, mean=mean, std=std, feature_dim=int(feature_dim))
    teacher.patch_size = int(patch)
    return teacher
