"""FID and Inception Score on Inception-v3 features, and cached reference statistics of image shards.

Statistics are a mean (2048,) and covariance (2048, 2048) in float64, stored as ``.npz`` with keys
``mu``, ``sigma`` (the pytorch-fid / ADM layout) and ``num_images``. Reference statistics of real
image shards are cached under ``cache_dir`` keyed by what determines them: the shard spec (and the
shard files' sizes and mtimes), format, resolution, image count (and batch size, which then decides
which images come first) and the weights file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vtok.config import load_recipe
from vtok.data import build_loader
from vtok.data.transforms import normalize_batch
from vtok.data.webdataset import expand_shards
from vtok.data.writers import atomic_write_bytes
from vtok.eval import EvalError
from vtok.eval.inception import FEATURE_DIM, InceptionFeatures

STATS_VERSION = 1  # bump when the way statistics are computed changes (invalidates the cache)


def default_cache_dir() -> Path:
    """``$VTOK_CACHE_DIR/fid``, else ``$XDG_CACHE_HOME/vtok/fid`` (``~/.cache/vtok/fid``)."""
    root = os.environ.get("VTOK_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "vtok"
    return Path(root).expanduser() / "fid"


class FeatureStats:
    """Running mean and covariance of feature batches (B, D), accumulated in float64 around a shift
    (the first batch's mean) so that large means do not cost precision."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.n = 0
        self.shift = None
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (B, D)."""
        x = features.detach().double().cpu().numpy()
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (mu (D,), sigma (D, D)), sigma with the unbiased (N - 1) normalisation as ``np.cov``."""
        if self.n < 2:
            raise EvalError(f"FID needs the statistics of at least 2 images, got {self.n}")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean + self.shift, (sigma + sigma.T) / 2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2).

    tr((s1 s2)^1/2) is the sum of the square roots of the eigenvalues of s1^1/2 s2 s1^1/2 (a similar,
    symmetric PSD matrix), so it comes out real and stable even for the singular covariances of fewer
    images than dimensions; tiny negative eigenvalues from rounding are clipped to 0.
    mu: (D,), sigma: (D, D); D = 2048 for FID.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}")
    s1, s2 = torch.tensor(sigma1), torch.tensor(sigma2)  # torch's LAPACK (MKL): a faster eigh than numpy's
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean), 0.0)


def inception_score(logits: torch.Tensor, splits: int = 10, min_split: int = 100) -> tuple[float, float]:
    """Inception Score of logits (N, C): exp E_x KL(p(y|x) || p(y)) per split of consecutive samples.

    ``splits`` is the standard 10 (5,000 samples each for 50k), lowered so that each split holds at
    least ``min_split`` samples (one split below that). -> (mean, std) over splits.
    """
    p = torch.softmax(logits.detach().double().cpu(), dim=1)
    n = len(p)
    if n < 2:
        raise EvalError(f"the Inception Score needs at least 2 images, got {n}")
    splits = max(1, min(splits, n // min_split))
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = (part * (part.clamp_min(1e-30).log() - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> Path:
    """Write ``mu`` (D,), ``sigma`` (D, D) and ``num_images`` to an ``.npz``, atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, num_images=np.int64(num_images))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_stats(path: str | Path) -> dict:
    """{'mu': (2048,), 'sigma': (2048, 2048), 'num_images': int or None} from an ``.npz`` with keys
    ``mu`` and ``sigma`` (ours, pytorch-fid's or ADM's reference batches)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("mu", "sigma", "num_images") if k in f}
            keys = sorted(f.keys())
    except (ValueError, OSError) as e:
        raise EvalError(f"cannot read reference statistics {path}: {e}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise EvalError(f"{path} has keys {keys}; expected 'mu' (2048,) and 'sigma' (2048, 2048) "
                        "(pytorch-fid / ADM reference statistics)")
    stats = {"mu": arrays["mu"].astype(np.float64), "sigma": arrays["sigma"].astype(np.float64),
             "num_images": int(arrays["num_images"]) if "num_images" in arrays else None}
    if stats["mu"].shape != (FEATURE_DIM,) or stats["sigma"].shape != (FEATURE_DIM, FEATURE_DIM):
        raise EvalError(f"{path}: mu {stats['mu'].shape}, sigma {stats['sigma'].shape}; expected "
                        f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}) Inception pool features")
    return stats


def eval_batches(data: str, fields: tuple[str, ...] = ("image",), *, data_format: str = "wds",
                 resolution: int = 256, batch_size: int = 32, max_images: int = 0) -> Iterator[dict[str, Any]]:
    """Batches of ``fields`` from ``data`` in a fixed order: ``image`` (B, 3, R, R) in [-1, 1],
    center-cropped (small ones upscaled), and e.g. ``text_emb`` (B, L, D) / ``text_mask`` (B, L); the
    first ``max_images`` images (0: all). Two reader workers, or one for a single WebDataset shard."""
    workers = min(2, len(expand_shards(data))) if data_format == "wds" else 2
    recipe = load_recipe(None, [f"data.format={data_format}", f"data.train_shards={data}",
                                f"data.resolution={resolution}", f"data.batch_size={batch_size}",
                                f"data.fields=[{','.join(fields)}]", f"data.num_workers={workers}",
                                "data.shuffle=false", "data.small_images=upscale"])
    count = 0
    for batch in build_loader(recipe.data, train=False):
        take = max_images - count if max_images else len(batch["image"])
        out = normalize_batch({name: batch[name][:take] for name in fields})
        count += len(out["image"])
        yield out
        if max_images and count >= max_images:
            return


def eval_images(data: str, *, data_format: str = "wds", resolution: int = 256, batch_size: int = 32,
                max_images: int = 0) -> Iterator[torch.Tensor]:
    """The ``image`` batches (B, 3, R, R) of ``eval_batches``."""
    for batch in eval_batches(data, ("image",), data_format=data_format, resolution=resolution,
                              batch_size=batch_size, max_images=max_images):
        yield batch["image"]


def _file_state(spec: str) -> list:
    """(path, size, mtime) of the local files a shard spec names (directories: their entries)."""
    state = []
    for part in spec.split("::"):
        p = Path(part)
        if p.is_dir():
            for root, _, files in sorted(os.walk(p)):
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    state.append([os.path.relpath(os.path.join(root, name), p), st.st_size, st.st_mtime_ns])
        elif p.is_file():
            st = p.stat()
            state.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return state


def ref_stats_path(cache_dir: str | Path, data: str, *, data_format: str, resolution: int,
                   max_images: int, batch_size: int, weights: str | Path) -> Path:
    """The cache file for the reference statistics of these images under these weights (with
    ``max_images``, which images come first depends on the batch size: two workers take turns)."""
    w = Path(weights).stat()
    key = {"version": STATS_VERSION, "data": [str(Path(p).resolve()) if Path(p).exists() else p
                                              for p in data.split("::")],
           "files": _file_state(data), "format": data_format, "resolution": resolution,
           "max_images": max_images, "batch_size": batch_size if max_images else None,
           "weights": [str(Path(weights).resolve()), w.st_size, w.st_mtime_ns]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"ref-{digest}.npz"


def reference_stats(inception: InceptionFeatures, weights: str | Path, data: str, *, data_format: str = "wds",
                    resolution: int = 256, batch_size: int = 32, max_images: int = 0,
                    cache_dir: str | Path | None = None) -> dict:
    """Statistics of the real images in ``data`` (see ``load_stats``), read from the cache when this
    exact set was done before, else computed and cached. ``weights`` is the file ``inception`` was
    loaded from (part of the cache key)."""
    path = ref_stats_path(cache_dir or default_cache_dir(), data, data_format=data_format,
                          resolution=resolution, max_images=max_images, batch_size=batch_size, weights=weights)
    if path.is_file():
        return load_stats(path)
    acc = FeatureStats()
    for x in eval_images(data, data_format=data_format, resolution=resolution, batch_size=batch_size,
                         max_images=max_images):
        acc.update(inception(x)[0])
    mu, sigma = acc.result()
    save_stats(path, mu, sigma, acc.n)
    return {"mu": mu, "sigma": sigma, "num_images": acc.n}
