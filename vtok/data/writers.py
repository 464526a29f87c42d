"""Write schema samples to shards of either format, atomically and resumably.

A *shard* is the unit of work, resume and splitting in both formats:

- ``wds``: ``OUT/shard-000012.tar`` (deterministic bytes: fixed mtime/owner, so reruns are identical)
- ``mds``: ``OUT/shard-000012/`` holding one MDS ``index.json`` + ``shard.00000.mds``; the top-level
  ``OUT/index.json`` merges all parts so ``StreamingDataset(local=OUT)`` reads the whole set.

Each shard is written under a ``.tmp`` name and renamed when complete, so a killed job leaves either a
finished shard or a ``.tmp`` leftover that the next run deletes and rewrites. ``OUT/manifest.json``
lists shards and sample counts.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from vtok.data.schema import MDS_COLUMNS, check_sample, to_mds, to_wds

FORMATS = ("wds", "mds")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BadItem:
    """An input a producer could not turn into a sample (counted and reported, never written)."""

    name: str
    reason: str


@dataclass
class WriteSummary:
    """What one ``write_shards`` call did."""

    written_shards: int = 0
    skipped_shards: int = 0
    written_samples: int = 0
    total_samples: int = 0
    bad: list[BadItem] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.written_shards} shards written, {self.skipped_shards} already done, "
                f"{self.written_samples} samples written, {self.total_samples} in the dataset, "
                f"{len(self.bad)} bad inputs skipped")


def shard_name(fmt: str, index: int, prefix: str = "shard") -> str:
    """File (wds) or directory (mds) name of shard ``index``."""
    return f"{prefix}-{index:06d}.tar" if fmt == "wds" else f"{prefix}-{index:06d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_wds(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    count = 0
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            check_sample(sample)
            for ext, data in sorted(to_wds(sample).items()):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uname = info.gname = "vtok"
                tar.addfile(info, _BytesReader(data))
            count += 1
        tar.close()
        raw.flush()
        os.fsync(raw.fileno())
    return count


class _BytesReader:
    """Minimal file object over bytes for tarfile.addfile (avoids a BytesIO copy per member)."""

    def __init__(self, data: bytes):
        self._view, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(self._pos + n, len(self._view))
        out, self._pos = self._view[self._pos:end].tobytes(), end
        return out


def _write_mds(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    from streaming import MDSWriter

    writer, count = None, 0
    for sample in samples:
        check_sample(sample)
        if writer is None:  # columns come from the first sample; all later ones must match
            columns = {k: MDS_COLUMNS[k] for k in sample}
            writer = MDSWriter(out=str(path), columns=columns, compression=None,
                               size_limit=(1 << 32) - 1)  # MDS offsets are uint32
        elif set(sample) != set(columns):
            raise ValueError(f"sample {sample['__key__']} has fields {sorted(sample)}, but this "
                             f"shard's first sample had {sorted(columns)}; MDS needs the same fields")
        writer.write(to_mds(sample))
        count += 1
    if writer is None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    else:
        _finish_mds(writer)
    return count


def _finish_mds(writer) -> None:
    """``writer.finish()`` without streaming's 1 s sleep per shard.

    MDSWriter.finish() flushes the last shard, queues a (local: no-op) upload, and sleeps in 1 s steps
    while that queue is non-empty. Flushing first and waiting for the queue in 1 ms steps writes the
    same files ~1 s faster per shard; if streaming's internals change we fall back to plain finish().
    """
    try:
        if writer.new_samples:
            writer.flush_shard()
            writer._reset_cache()
        while writer.executor._work_queue.qsize() > 0:
            time.sleep(0.001)
    except AttributeError:
        pass
    writer.finish()


def write_shard(out_dir: str | Path, fmt: str, index: int, samples: Iterable[dict[str, Any]],
                prefix: str = "shard") -> int:
    """Write one shard atomically; returns its number of samples."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}; use one of {FORMATS}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    final = Path(out_dir) / shard_name(fmt, index, prefix)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    count = _write_wds(tmp, samples) if fmt == "wds" else _write_mds(tmp, samples)
    os.replace(tmp, final)
    return count


def _shard_samples(fmt: str, path: Path) -> int:
    if fmt == "mds":
        index = json.loads((path / "index.json").read_text())
        return sum(s["samples"] for s in index["shards"])
    with tarfile.open(path) as tar:
        return len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def finalize(out_dir: str | Path, fmt: str, prefix: str = "shard", counts: dict[str, int] | None = None,
             extra: dict[str, Any] | None = None) -> int:
    """Write ``manifest.json`` (and the merged MDS ``index.json``); returns the total sample count.
    ``counts``: samples per shard name when the caller knows them (no re-reading of the shards);
    ``extra``: more top-level manifest entries."""
    out = Path(out_dir)
    names = sorted(p.name for p in out.glob(f"{prefix}-*") if not p.name.endswith(".tmp"))
    known = counts or {}
    shards = [{"name": n, "samples": known[n] if n in known else _shard_samples(fmt, out / n)} for n in names]
    if fmt == "mds":
        merged = []
        for n in names:
            for entry in json.loads((out / n / "index.json").read_text())["shards"]:
                for key in ("raw_data", "zip_data"):
                    if entry.get(key):
                        entry[key]["basename"] = f"{n}/{entry[key]['basename']}"
                merged.append(entry)
        atomic_write_bytes(out / "index.json", json.dumps({"version": 2, "shards": merged}).encode())
    total = sum(s["samples"] for s in shards)
    manifest = {"format": fmt, "num_samples": total, "shards": shards, **(extra or {})}
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return total


_JOB: tuple = ()  # (out_dir, fmt, prefix, produce) of the running write_shards, set in each worker


def _set_job(job: tuple) -> None:
    global _JOB
    _JOB = job


def _produce_and_write(index: int) -> tuple[int, int, list[BadItem]]:
    out_dir, fmt, prefix, produce = _JOB
    bad: list[BadItem] = []

    def good_samples():
        for item in produce(index):
            if isinstance(item, BadItem):
                bad.append(item)
            else:
                yield item

    return index, write_shard(out_dir, fmt, index, good_samples(), prefix), bad


def write_shards(out_dir: str | Path, fmt: str, num_shards: int,
                 produce: Callable[[int], Iterable[dict[str, Any] | BadItem]], *, workers: int = 1,
                 prefix: str = "shard", desc: str = "writing shards", progress: bool = True) -> WriteSummary:
    """Write shards ``0..num_shards-1``, each from ``produce(index)``, skipping finished ones.

    ``produce`` yields schema samples, or :class:`BadItem` for inputs it had to skip. Worker
    processes are forked and inherit ``produce`` (it is never pickled, so it may close over a large
    list of inputs).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}; use one of {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(num_shards) if not (out / shard_name(fmt, i, prefix)).exists()]
    summary = WriteSummary(skipped_shards=num_shards - len(todo))
    job = (str(out), fmt, prefix, produce)
    bar = tqdm(total=num_shards, initial=summary.skipped_shards, desc=desc, unit="shard",
               disable=not progress, dynamic_ncols=True)
    if workers > 1 and len(todo) > 1:
        pool = mp.get_context("fork").Pool(min(workers, len(todo)), initializer=_set_job, initargs=(job,))
        results = pool.imap_unordered(_produce_and_write, todo)
    else:
        _set_job(job)
        pool, results = None, map(_produce_and_write, todo)
    try:
        for _, count, bad in results:
            summary.written_shards += 1
            summary.written_samples += count
            summary.bad.extend(bad)
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    summary.total_samples = finalize(out, fmt, prefix)
    return summary
