"""Built-in synthetic data: coloured shapes on pale backgrounds, with a class id and a caption.

Class = (shape, colour): ``cls = shape_index * len(COLORS) + colour_index`` (24 classes). Each sample
is a pure function of ``(seed, index)``, so every run, format and resolution sees the same data:

    >>> image, cls, caption = render_sample(7, resolution=64)
    >>> caption
    'a small purple triangle on a beige background'

It is the default data of ``vtok demo`` and the smoke recipes: small enough to learn on a CPU, and a
sample grid shows at a glance whether a model got shape and colour right.
"""
from __future__ import annotations

import functools
import io
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from vtok.data.writers import WriteSummary, write_shards

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # saturated foreground colours, far from every background
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 210),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 120, 20),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "light gray": (215, 215, 215),
    "light blue": (200, 225, 245),
    "beige": (240, 230, 200),
    "light green": (210, 240, 210),
    "pink": (250, 215, 225),
}
NUM_CLASSES = len(SHAPES) * len(COLORS)
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
SUPERSAMPLE = 2  # draw at 2x and downsample, for anti-aliased edges


def class_id(shape: str, color: str) -> int:
    """Class index of a (shape, colour) pair."""
    return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    else:  # five-pointed star: alternate outer and inner radius
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    return [(cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle)) for a, rad in pts]


def render_sample(index: int, resolution: int = 256, seed: int = 0) -> tuple[Image.Image, int, str]:
    """Render sample ``index``: (RGB image of ``resolution``^2, class id, English caption)."""
    rng = random.Random(seed * 1_000_003 + index)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    bg_name = rng.choice(list(BACKGROUNDS))
    size = rng.uniform(0.3, 0.7)  # shape diameter as a fraction of the image side
    side = resolution * SUPERSAMPLE
    # Background: the named colour with a gentle vertical gradient of random direction.
    top = [min(255, max(0, c + rng.randint(-12, 12))) for c in BACKGROUNDS[bg_name]]
    shift = rng.randint(-20, 20)
    column = Image.linear_gradient("L").resize((1, side))
    bg = Image.merge("RGB", [column.point(lambda v, t=t: t + shift * v // 255) for t in top])
    img = bg.resize((side, side))
    r = size * side / 2
    cx = rng.uniform(r, side - r)
    cy = rng.uniform(r, side - r)
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=COLORS[color])
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    adjective = "small " if size < 0.42 else "large " if size > 0.58 else ""
    words = f"{adjective}{color} {shape}"
    article = "an" if words[0] in "aeiou" else "a"
    caption = f"{article} {words} on a {bg_name} background"
    return img, class_id(shape, color), caption


def encode_image(img: Image.Image, image_format: str = "jpg", quality: int = 95) -> bytes:
    """PIL image -> encoded bytes (``jpg`` or ``png``)."""
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "png":
        img.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown image format {image_format!r}; use 'jpg' or 'png'")
    return buf.getvalue()


def synthetic_samples(start: int, count: int, resolution: int = 256, seed: int = 0,
                      image_format: str = "jpg") -> Iterator[dict]:
    """Schema samples ``start .. start+count-1`` (keys are zero-padded indices)."""
    for i in range(start, start + count):
        img, cls, caption = render_sample(i, resolution, seed)
        yield {"__key__": f"{i:08d}", "image": encode_image(img, image_format), "cls": cls,
               "caption": caption}


def _shard_samples(index: int, *, num_samples: int, per_shard: int, resolution: int, seed: int,
                   image_format: str) -> Iterator[dict]:
    start = index * per_shard
    return synthetic_samples(start, min(per_shard, num_samples - start), resolution, seed, image_format)


def write_synthetic(out_dir: str | Path, fmt: str = "wds", num_samples: int = 2048,
                    samples_per_shard: int = 256, resolution: int = 256, seed: int = 0,
                    image_format: str = "jpg", workers: int = 1, progress: bool = True) -> WriteSummary:
    """Write the synthetic dataset to shards of ``fmt`` (resumable: finished shards are kept)."""
    num_shards = math.ceil(num_samples / samples_per_shard)
    produce = functools.partial(_shard_samples, num_samples=num_samples, per_shard=samples_per_shard,
                                resolution=resolution, seed=seed, image_format=image_format)
    return write_shards(out_dir, fmt, num_shards, produce, workers=workers, progress=progress,
                        desc=f"synthetic -> {fmt}")


def dominant_colour(images: np.ndarray, min_saturation: int = 90) -> np.ndarray:
    """Index into ``COLORS`` of each image's shape colour, or -1 when no pixel is saturated enough.

    images: uint8 (N, H, W, 3). The backgrounds are pale (max - min channel <= ~50) and the shape
    colours saturated (>= 130), so the mean of the saturated pixels is the shape's colour; the
    nearest palette entry names it. It is the class-faithfulness statistic of ``vtok demo``."""
    palette = np.array(list(COLORS.values()), dtype=np.float32)  # (C, 3)
    x = images.astype(np.float32)
    sat = x.max(-1) - x.min(-1)  # (N, H, W)
    out = np.full(len(x), -1, dtype=np.int64)
    for i, (img, s) in enumerate(zip(x, sat)):
        mask = s >= min_saturation
        if mask.sum() >= 4:
            mean = img[mask].mean(0)
            out[i] = int(((palette - mean) ** 2).sum(-1).argmin())
    return out


def colour_of_class(cls: np.ndarray) -> np.ndarray:
    """The ``COLORS`` index of class ids (class = shape * len(COLORS) + colour)."""
    return cls % len(COLORS)
