"""Decode and transform schema samples into tensors, and collate them into batches.

Images: decode (simplejpeg for JPEG, with libjpeg-turbo's DCT-domain downscaling to the smallest
scale >= the target; PIL otherwise) -> resize the short side to ``resolution`` and center/random
crop (one resize of the crop window) -> optional flip -> uint8 (H, W, 3); ``collate`` makes the
batch uint8 (B, 3, H, W) (channels-last memory), which crosses the worker boundary at a quarter of
float32's bytes; ``normalize_batch`` / ``images_to_float`` turn it into float in [-1, 1] where the
batch is used (the trainer does it on the device). Other fields pass through as tensors or lists.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from vtok.config.schema import DataConfig

try:
    import simplejpeg
except ImportError:  # optional fast path; PIL always works
    simplejpeg = None


class DataError(RuntimeError):
    """A data problem that must stop the run (missing shard, too many bad samples, small image)."""


class BadSample(Exception):
    """One sample that cannot be used (corrupt image, missing field); skipped and counted."""


HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit gray; mode I holds 0..65535


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and mode ``I``) grayscale -> 8-bit ``L`` by round(v / 257); other modes unchanged.

    PIL's ``convert`` clips such images at 255 instead of scaling them, which turns them white.
    (PIL already reads 16-bit RGB(A) PNG/TIFF as 8-bit RGB(A) by keeping the high byte.)
    """
    if img.mode not in HIGH_BIT_MODES:
        return img
    arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)  # also byte-swaps I;16B
    return Image.fromarray(((arr + 128) // 257).astype(np.uint8))  # mode L


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, scaling 16-bit values instead of clipping them."""
    return to_8bit(img).convert("RGB")


def _decode_jpeg_reduced(data: bytes, min_side: int) -> np.ndarray:
    """simplejpeg decode at the smallest DCT scale whose short side is still >= ``min_side``.

    The minimum is passed as an exact integer for both sides (the long side is never the binding
    one); a float ratio like ``int(h * min_side / min(h, w))`` can round to ``min_side - 1`` and make
    libjpeg-turbo pick a scale 1 px too small. If the result is still short, decode at full size.
    """
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    if min(h, w) <= min_side:  # no reduction possible
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_side, min_width=min_side)
    if min(arr.shape[:2]) < min_side:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
    return arr


def decode_image(data: bytes, min_side: int = 0, decoder: str = "simplejpeg") -> Image.Image:
    """Encoded bytes -> RGB PIL image whose short side is >= ``min_side`` when the source allows.

    For JPEG with simplejpeg, ``min_side`` lets libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale
    directly, which is several times faster for large photos than decoding then resizing.
    16-bit images are scaled to 8 bits (:func:`to_rgb8`).
    """
    if decoder == "simplejpeg" and simplejpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            if min_side:
                arr = _decode_jpeg_reduced(data, min_side)
            else:
                arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
            return Image.fromarray(arr)
        except ValueError:  # libjpeg-turbo rejects some odd-but-valid files; PIL is more lenient
            pass
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":  # PIL's own DCT-domain downscaling
        img.draft("RGB", (min_side, min_side))  # picks a scale whose size is >= the request
    return to_rgb8(img)


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """numpy -> tensor sharing memory; copies only arrays that are read-only or non-contiguous."""
    return torch.from_numpy(np.require(arr, requirements=["C", "W"]))


@dataclass
class ImageTransform:
    """bytes -> uint8 tensor (resolution, resolution, 3): short-side resize + square crop + flip."""

    resolution: int
    crop: str = "center"  # "center" | "random"
    hflip: bool = False
    small_images: str = "error"  # "error" | "upscale" | "skip"
    decoder: str = "simplejpeg"

    def __call__(self, data: bytes, rng: random.Random, name: str = "image") -> torch.Tensor:
        res = self.resolution
        try:
            img = decode_image(data, res, self.decoder)
        except Exception as e:  # PIL raises many types for corrupt files
            raise BadSample(f"cannot decode image: {type(e).__name__}: {e}") from None
        w, h = img.size
        if min(w, h) < res:
            if self.small_images == "error":
                raise DataError(f"{name}: image is {w}x{h}, smaller than data.resolution={res}; set "
                                "data.small_images=upscale (or =skip), or filter it out with "
                                f"data_prep/make_shards.py --min-size {res}")
            if self.small_images == "skip":
                raise BadSample(f"image is {w}x{h}, smaller than data.resolution={res}")
        # Resize only the crop window (PIL's resize box): the same pixels as resize-then-crop, at
        # about half the cost for ImageNet-shaped images (bench/data_loader.py).
        side = min(w, h)
        if self.crop == "random":
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        else:
            left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        if side == res:
            img = img.crop(box)
        else:
            img = img.resize((res, res), Image.Resampling.BICUBIC, box=box)
        arr = np.asarray(img)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return as_tensor(arr)  # (res, res, 3) uint8; collate makes the float batch


class SampleDecoder:
    """Schema sample (raw fields) -> training sample (tensors), keeping only ``fields``.

    Raises BadSample for a sample that should be skipped, DataError for one that must stop the run.
    """

    def __init__(self, cfg: DataConfig, train: bool = True):
        self.fields = tuple(cfg.fields)
        self.image = ImageTransform(cfg.resolution, cfg.crop if train else "center",
                                    cfg.hflip and train, cfg.small_images, cfg.decoder)

    def __call__(self, sample: dict[str, Any], rng: random.Random, where: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": sample["__key__"]}
        for name in self.fields:
            value = sample[name]
            if name == "image":
                value = self.image(value, rng, name=f"{where} key {sample['__key__']}")
            elif name == "cls":
                value = int(value)
            elif name == "text_mask":
                value = as_tensor(np.asarray(value, dtype=bool))
            elif name in ("text_emb", "codes", "latents", "latents_std"):
                value = as_tensor(value)
            out[name] = value
        return out


def _stack(values: list) -> torch.Tensor:
    return torch.stack(values)


def _codes(values: list[torch.Tensor]) -> torch.Tensor:
    """Discrete codes (int16 / int32 on disk) -> int64, ready for embeddings; continuous tokens
    (float16 on disk, e.g. TexTok's (n, dim)) -> float32. (B, *token_shape)"""
    batch = torch.stack(values)
    return batch.float() if batch.is_floating_point() else batch.long()


def _images(values: list[torch.Tensor], channels_last: bool = False) -> torch.Tensor:
    """(H, W, 3) uint8 each -> (B, 3, H, W) uint8: the loader's image batch, contiguous, or stored
    NHWC (``channels_last``). Written once, by torch's ``default_collate``, which inside a DataLoader
    worker stacks into shared memory, so sending the batch moves a file descriptor, not the bytes.
    Normalising waits for ``images_to_float`` (bench/data_loader.py: a float32 batch made in the
    workers cost the loader a third of its rate in inter-process copies)."""
    if channels_last:
        return default_collate(values).permute(0, 3, 1, 2)
    return default_collate([v.permute(2, 0, 1) for v in values])  # one transposing copy per image


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """Loader images uint8 (B, 3, H, W) -> float32 in [-1, 1] (memory format kept); float passes through."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1.0)


def normalize_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch with its uint8 ``image`` made float in [-1, 1] (other fields as they are)."""
    image = batch.get("image")
    if torch.is_tensor(image) and image.dtype == torch.uint8:
        return {**batch, "image": images_to_float(image)}
    return batch


COLLATE: dict[str, Callable[[list], Any]] = {
    "__key__": list,
    "image": _images,  # (B, 3, H, W) uint8 (normalize_batch: float in [-1, 1])
    "cls": lambda v: torch.tensor(v, dtype=torch.long),  # (B,)
    "caption": list,  # list[str]
    "text_emb": _stack,  # (B, L, D), dtype as stored (float16)
    "text_mask": _stack,  # (B, L) bool
    "codes": _codes,  # (B, *token_shape): int64 (discrete) or float32 (continuous tokens)
    "latents": lambda v: torch.stack(v).float(),  # (B, C, h, w) [or (B, 2, C, h, w) with flip] float32
    "latents_std": lambda v: torch.stack(v).float(),  # like latents: the posterior std, same scale
    "json": list,  # list[dict]: per-sample metadata (e.g. the source path from make_shards)
}


def collate(samples: list[dict[str, Any]], channels_last: bool = False) -> dict[str, Any]:
    """List of decoded samples -> batch dict, one collate rule per schema field."""
    return {name: (_images([s[name] for s in samples], channels_last) if name == "image"
                   else COLLATE[name]([s[name] for s in samples])) for name in samples[0]}
