"""``vtok eval gen``: gFID and Inception Score of generated samples against real image shards.

Samples come in the ADM / OpenAI format: an ``.npz`` whose ``arr_0`` (or ``images``) is uint8
(N, H, W, 3); it is streamed batch by batch, so 50k 256px samples need no 10 GB of memory. The
reference is image shards (statistics cached, see ``vtok.eval.fid``) or a precomputed ``.npz``
with ``mu`` / ``sigma``. Writes ``gen.json``.

Per token count (variable-length tokenizers): ``vtok sample --num-tokens K --npz`` records K in the
samples file (``num_tokens``); several samples files (one per K) are scored against one reference
in one call, and ``gen.json`` gets a ``by_num_tokens`` table (gFID / IS per file, sorted by K).
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
import torch

from vtok.data.writers import atomic_write_bytes
from vtok.eval import EvalError
from vtok.eval.fid import FeatureStats, frechet_distance, inception_score, load_stats, reference_stats
from vtok.eval.inception import InceptionFeatures

SAMPLE_KEYS = ("arr_0", "images")
log = logging.getLogger(__name__)
FORMAT_HELP = "expected an .npz whose 'arr_0' (or 'images') is uint8 (N, H, W, 3), the ADM sample format"


def _open_array(zf: zipfile.ZipFile, path: Path) -> tuple[IO[bytes], tuple[int, ...], bool]:
    """The samples member of the npz, opened and positioned after its header -> (file, shape, fortran)."""
    names = set(zf.namelist())
    member = next((f"{k}.npy" for k in SAMPLE_KEYS if f"{k}.npy" in names), None)
    if member is None:
        raise EvalError(f"{path} holds {sorted(n.removesuffix('.npy') for n in names)}; {FORMAT_HELP}")
    fp = zf.open(member)
    try:
        version = np.lib.format.read_magic(fp)
        fmt = np.lib.format
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fp)
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise EvalError(f"{path}: {member} is {dtype} {shape}; {FORMAT_HELP}")
    except BaseException:
        fp.close()
        raise
    return fp, shape, fortran


def samples_shape(path: str | Path) -> tuple[int, int, int, int]:
    """(N, H, W, 3) of the samples file, checked, without reading the images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} not found")
    try:
        with zipfile.ZipFile(path) as zf:
            fp, shape, _ = _open_array(zf, path)
            fp.close()
    except EvalError:
        raise
    except (zipfile.BadZipFile, ValueError) as e:
        raise EvalError(f"cannot read {path} ({e}); {FORMAT_HELP}") from None
    return shape


def iter_samples(path: str | Path, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Batches (B, 3, H, W) uint8 of the samples file, read incrementally."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        fp, (n, h, w, c), fortran = _open_array(zf, path)
        with fp:
            if fortran:  # rare (np.save of a transposed array): read it whole
                with np.load(path, allow_pickle=False) as f:
                    array = f[fp.name.removesuffix(".npy")]
                for i in range(0, n, batch_size):
                    yield torch.from_numpy(np.ascontiguousarray(array[i:i + batch_size])).permute(0, 3, 1, 2)
                return
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                data = fp.read(b * h * w * c)
                if len(data) != b * h * w * c:
                    raise EvalError(f"{path}: samples end after {i + len(data) // (h * w * c)} of {n} images")
                yield torch.frombuffer(bytearray(data), dtype=torch.uint8).view(b, h, w, c).permute(0, 3, 1, 2)


def samples_num_tokens(path: str | Path) -> int | None:
    """The token count K that ``vtok sample --num-tokens K`` recorded in a samples file; None when
    it holds none (all tokens, or samples from elsewhere)."""
    with np.load(path, allow_pickle=False) as f:  # lazy: only the small member is read
        return int(f["num_tokens"]) if "num_tokens" in f.files else None


@torch.no_grad()
def _score(model: InceptionFeatures, path: str | Path, reference: dict, batch_size: int) -> dict:
    """gFID / IS of one samples file against ``reference`` statistics."""
    acc, logits = FeatureStats(), []
    for x in iter_samples(path, batch_size):
        features, lg = model(x)
        acc.update(features)
        logits.append(lg.cpu())
    mu, sigma = acc.result()
    is_mean, is_std = inception_score(torch.cat(logits))
    return {"gfid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), "inception_score": is_mean,
            "inception_score_std": is_std, "num_tokens": samples_num_tokens(path), "samples": str(path)}


@torch.no_grad()
def evaluate_gen(samples: str | Path | Sequence[str | Path], out: str | Path, *, inception: str | Path,
                 ref: str = "", ref_stats: str = "", data_format: str = "wds", resolution: int = 256,
                 batch_size: int = 64, max_ref: int = 0, cache_dir: str | Path | None = None) -> dict:
    """gFID of ``samples`` against the images in ``ref`` (at ``resolution``, the first ``max_ref``;
    statistics cached in ``cache_dir``) or the statistics file ``ref_stats``, and their Inception
    Score; returns the report it also writes to ``<out>/gen.json``. Several samples files (e.g. one
    per token count K) share the reference: the report is the first one's, plus ``by_num_tokens``
    with every file's scores, sorted by K."""
    if bool(ref) == bool(ref_stats):
        raise EvalError("give the reference as image shards (--ref) or as statistics (--ref-stats), one of them")
    paths = [samples] if isinstance(samples, (str, Path)) else list(samples)
    shapes = [samples_shape(p) for p in paths]  # every file checked before any work
    _, height, width, _ = shapes[0]
    if len({s[1:] for s in shapes}) > 1:
        raise EvalError(f"samples files of different image sizes {sorted({s[1:3] for s in shapes})}: "
                        "score them in separate calls")
    if ref and (height, width) != (resolution, resolution):
        log.warning("samples are %dx%d but the reference images are cropped to %d (--resolution); FID is "
                    "comparable only at matching resolutions", height, width, resolution)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = InceptionFeatures(inception).to(device)
    if ref_stats:
        reference = load_stats(ref_stats)
    else:
        reference = reference_stats(model, inception, ref, data_format=data_format, resolution=resolution,
                                    batch_size=batch_size, max_images=max_ref, cache_dir=cache_dir)
    scores = [{**_score(model, p, reference, batch_size), "num_samples": s[0]} for p, s in zip(paths, shapes)]
    report = {**scores[0], "num_ref": reference["num_images"], "sample_size": [height, width],
              "ref": str(ref or ref_stats), "ref_resolution": resolution if ref else None}
    if len(scores) > 1:
        report["by_num_tokens"] = sorted(scores, key=lambda r: (r["num_tokens"] is None, r["num_tokens"] or 0))
    report["seconds"] = time.perf_counter() - start
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "gen.json", json.dumps(report, indent=1).encode())
    return report
