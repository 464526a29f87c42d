"""OpenCLIP image tower as a frozen teacher (weights from a local file only, never downloaded)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from vtok.models.teachers.base import Teacher, check_weights_file, load_state_dict_safely, unknown_model_error
from vtok.models.weights import load_state_dict_strict

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageEncoder(nn.Module):
    """(B, 3, S, S) normalized images -> projected image embedding (B, D), not l2-normalised.

    Holds only the CLIP visual tower (the text tower is dropped to save memory). For CLIP and
    CustomTextCLIP, ``model.encode_image(x)`` is exactly ``model.visual(x)``; towers that return
    (pooled, tokens) tuples (CoCa) give their pooled embedding.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def load_clip_teacher(model_name: str, weights_path: str, *, pretrained_tag: str | None = None,
                      feature: str = "embedding") -> Teacher:
    """An OpenCLIP model's image embedding as a frozen ``Teacher``.

    ``model_name``: an open_clip architecture (``open_clip.list_models()``), e.g. "ViT-L-14".
    ``weights_path``: a local .safetensors / .pt / .bin checkpoint of the full CLIP model.
    ``pretrained_tag``: optional open_clip pretrained tag the file came from (e.g. "openai",
    "datacomp_xl_s13b_b90k"); only used, offline, for its preprocessing mean/std and QuickGELU flag.
    Without it the mean/std are OpenAI CLIP's and the activation is the config's: use a
    "-quickgelu" model name for OpenAI-trained weights.
    ``feature``: "embedding" (the projected image embedding) or "cls" (the last layer's pooled CLS
    token before the projection, at the transformer's width: what FQGAN aligns to, e.g. 1024-d
    for ViT-L/14).
    """
    if feature not in ("embedding", "cls"):
        raise ValueError(f"feature={feature!r} is not 'embedding' or 'cls'")
    import open_clip

    arch = model_name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise unknown_model_error("CLIP", model_name, open_clip.list_models())
    check_weights_file(weights_path, "CLIP", model_name, "model.teachers[].weights")
    tag_cfg: dict = {}
    if pretrained_tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_tag)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"unknown open_clip pretrained tag {pretrained_tag!r} for {arch}; known: {tags}")
    model = load_clip_model(arch, weights_path, quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    visual = model.visual
    size = visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(f"CLIP teacher needs a square input size, {model_name} has {height}x{width}")
    pp = dict(getattr(visual, "preprocess_cfg", None) or {})
    mean = tuple(tag_cfg.get("mean") or pp.get("mean") or OPENAI_CLIP_MEAN)
    std = tuple(tag_cfg.get("std") or pp.get("std") or OPENAI_CLIP_STD)
    if feature == "cls":
        if getattr(visual, "proj", None) is None:
            raise ValueError(f"{model_name}: its image tower has no projection to skip; use feature='embedding'")
        visual.proj = None  # open_clip's ViT then returns the pooled CLS before projection
    encoder = ClipImageEncoder(visual).eval()
    feature_dim = getattr(visual, "output_dim", None) if feature == "embedding" else None
    if feature_dim is None:  # timm / HF towers: measure the embedding width once
        with torch.no_grad():
            feature_dim = encoder(torch.zeros(1, 3, height, width)).shape[-1]
    del model  # drop the text tower
    return Teacher(encoder, image_size=height, mean=mean, std=std, feature_dim=int(feature_dim))


def load_clip_model(arch: str, weights_path: str, quick_gelu: bool) -> nn.Module:
    """open_clip model ``arch`` with the full-model checkpoint ``weights_path``, nothing downloaded.

    open_clip's ``load_checkpoint`` converts the file (third-party layouts, position-embedding
    resizing) and its final ``load_state_dict`` goes through ``load_state_dict_strict``, so a file
    for another model is a one-line WeightsError. The file is read with safetensors or
    ``torch.load(weights_only=True)``; an open_clip without that flag gets the file checked first.
    """
    import open_clip

    params = inspect.signature(open_clip.create_model).parameters
    no_download = {k: False for k in ("pretrained_image", "pretrained_text", "pretrained_hf") if k in params}
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, **no_download)
    safe_kw: dict = {}
    if "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters:
        safe_kw["weights_only"] = True
    else:
        load_state_dict_safely(weights_path)  # refuses unsafe pickles before open_clip reads the file

    def strict_load(state_dict, strict: bool = True, assign: bool = False) -> None:
        del model.load_state_dict  # back to the class's method, which the helper calls
        load_state_dict_strict(model, state_dict, weights_path)

    model.load_state_dict = strict_load  # open_clip calls model.load_state_dict(state_dict, strict=...)
    try:
        open_clip.load_checkpoint(model, weights_path, **safe_kw)
    finally:
        model.__dict__.pop("load_state_dict", None)
    return model
