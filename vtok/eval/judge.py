"""A judge for pictures of the built-in synthetic shapes (``vtok.data.synthetic``).

``vtok demo`` asks a generator for a class (shape x colour) and needs to say whether the picture it
got is that class. Colour is read without learning (``dominant_colour``: the mean of the saturated
pixels, named by the nearest palette entry). Shape is read by a small classifier fitted in about a
second on freshly rendered real images (seeded: every run gets the same judge). Its input is the
soft mask of saturated pixels (the shape; the backgrounds are pale) described by rotation-invariant
moments: ``|sum m (z - z0)^n| / sum m |z - z0|^n`` for n = 2..6 (a triangle has 3-fold symmetry, a
square 4-fold, a star 5-fold, a circle none), the second moment over the squared area (compactness)
and the area over the disc through the farthest pixel. It tells the four shapes apart on held-out
renders at 16 px and up (``judge_shape_accuracy`` in the report).

:func:`judge_samples` reports, like an accuracy-based Inception Score:

* ``shape_match`` / ``colour_match`` / ``class_match``: the fraction of samples whose judged shape /
  colour / both are those of the class they were asked for (chance 1/4, 1/6, 1/24);
* ``inception_score``: ``exp(E_x KL(p(class|x) || p(class)))`` over the 24 classes, p(class|x) =
  p(shape|x) x [colour = the judged colour] (1 for one repeated picture, up to 24 for pictures of
  every class told apart with confidence);
* the same statistics on real images rendered at the same resolution: the ceiling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtok.data.synthetic import COLORS, SHAPES, colour_of_class, dominant_colour, render_sample

MASK_LOW, MASK_HIGH = 70.0, 120.0  # saturation (max - min channel): backgrounds < 70, shapes >= 130


def shape_features(images: np.ndarray) -> np.ndarray:
    """Rotation- and translation-invariant descriptors (N, 7) of the shape mask of uint8 images (N, H, W, 3)."""
    x = images.astype(np.float32)
    mask = np.clip((x.max(-1) - x.min(-1) - MASK_LOW) / (MASK_HIGH - MASK_LOW), 0, 1)  # (N, H, W)
    h, w = mask.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    area = mask.sum((1, 2)) + 1e-6
    centre = (mask * (xx + 1j * yy)).sum((1, 2)) / area
    d = (xx + 1j * yy)[None] - centre[:, None, None]  # (N, H, W) complex offsets from the centroid
    r = np.abs(d)
    feats = [np.abs((mask * d ** n).sum((1, 2))) / ((mask * r ** n).sum((1, 2)) + 1e-6) for n in range(2, 7)]
    feats.append((mask * r ** 2).sum((1, 2)) / area ** 2)
    feats.append(area / (math.pi * (np.where(mask > 0.5, r, 0).max((1, 2)) + 0.5) ** 2))
    return np.stack(feats, 1).astype(np.float32)


class ShapeJudge(nn.Module):
    """An MLP on standardised :func:`shape_features`: uint8 images (N, H, W, 3) -> shape logits (N, 4)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.GELU(), nn.Linear(hidden, len(SHAPES)))

    def forward(self, images: np.ndarray) -> torch.Tensor:
        return self.net((torch.from_numpy(shape_features(images)) - self.mean) / self.std)


def render_real(count: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` real renders: uint8 images (N, R, R, 3) and class ids (N,)."""
    renders = [render_sample(i, resolution, seed=seed) for i in range(count)]
    return (np.stack([np.asarray(img) for img, _, _ in renders]),
            np.array([c for _, c, _ in renders], dtype=np.int64))


def _shape_accuracy(model: ShapeJudge, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(images).argmax(-1).numpy() == labels // len(COLORS)).mean())


def train_judge(resolution: int, *, num_images: int = 2048, steps: int = 500, seed: int = 0
                ) -> tuple[ShapeJudge, float]:
    """Fit a :class:`ShapeJudge` on real renders at ``resolution`` (full batch, seeded: the same judge
    every run); returns it (eval mode) and its shape accuracy on 512 held-out renders."""
    images, labels = render_real(num_images, resolution, seed=10_000 + seed)
    feats = shape_features(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeJudge(feats.mean(0), feats.std(0) + 1e-6)
    x = (torch.from_numpy(feats) - model.mean) / model.std
    y = torch.from_numpy(labels // len(COLORS))
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model.net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    held_images, held_labels = render_real(512, resolution, seed=20_000 + seed)
    return model, _shape_accuracy(model, held_images, held_labels)


def _scores(model: ShapeJudge, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        shape_probs = model(images).softmax(-1).double()  # (N, 4)
    colour = dominant_colour(images)  # (N,), -1 where nothing is saturated
    shape_ok = shape_probs.argmax(-1).numpy() == labels // len(COLORS)
    colour_ok = colour == colour_of_class(labels)
    colour_probs = torch.full((len(images), len(COLORS)), 1 / len(COLORS), dtype=torch.float64)
    known = torch.from_numpy(colour >= 0)
    colour_probs[known] = F.one_hot(torch.from_numpy(colour[colour >= 0]), len(COLORS)).double()
    probs = (shape_probs[:, :, None] * colour_probs[:, None, :]).flatten(1)  # (N, 24): shape-major classes
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(-1)
    return {"shape_match": float(shape_ok.mean()), "colour_match": float(colour_ok.mean()),
            "class_match": float((shape_ok & colour_ok).mean()), "inception_score": math.exp(float(kl.mean()))}


@dataclass
class Judgement:
    """Scores of the samples and of real renders at the same resolution (the ceiling)."""

    samples: dict[str, float]
    real: dict[str, float]
    judge_accuracy: float  # the judge's shape accuracy on held-out real renders

    def to_dict(self) -> dict:
        return {**self.samples, "real": self.real, "judge_shape_accuracy": self.judge_accuracy,
                "chance": {"shape": 1 / len(SHAPES), "colour": 1 / len(COLORS),
                           "class": 1 / (len(SHAPES) * len(COLORS))}}


def judge_samples(images: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                  judge: tuple[ShapeJudge, float] | None = None) -> Judgement:
    """Score uint8 samples (N, R, R, 3) asked for classes ``labels`` (N,); fits the judge at R unless
    one (model, held-out accuracy) is given. Real renders for the ceiling use ``seed + 1``."""
    model, accuracy = judge if judge is not None else train_judge(images.shape[1], seed=seed)
    real_images, real_labels = render_real(len(labels), images.shape[1], seed=seed + 1)
    return Judgement(_scores(model, images, labels), _scores(model, real_images, real_labels), accuracy)
