"""Image preparation shared by the jobs that read ``image``: the loader's center crop, batched."""
from __future__ import annotations

import random
from typing import Any

import torch

from vtok.data.transforms import COLLATE, ImageTransform, images_to_float


def center_crop(resolution: int) -> ImageTransform:
    """The evaluation transform of the training loader (``train=False``): short-side resize to
    ``resolution`` + center crop, small images upscaled, no flip."""
    return ImageTransform(resolution, crop="center", hflip=False, small_images="upscale")


def prepare_image(sample: dict[str, Any], transform: ImageTransform) -> torch.Tensor:
    """A schema sample's ``image`` -> uint8 (H, W, 3); BadSample for an undecodable one."""
    return transform(sample["image"], random.Random(0), name=f"key {sample['__key__']}")


def image_batch(images: list[torch.Tensor], device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (H, W, 3) each -> (B, 3, H, W) in [-1, 1] on ``device``: the loader's collate."""
    batch = COLLATE["image"](images).contiguous().to(device=device, non_blocking=True)
    return images_to_float(batch).to(dtype)
