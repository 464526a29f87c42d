"""The one shard runner under every ``vtok precompute`` job.

    job = TextEmbJob(TextEmbOptions(encoder="models/t5-v1_1-xl"))
    result = run_job(job, RunnerOptions(data="data/in1k", out="data/in1k_t5"), init_distributed())

Input shard ``i`` (WebDataset or MDS) becomes output shard ``i`` (same format unless ``format``) with
every input field kept (minus the job's ``drops``) plus the fields the job adds. Ranks take every
``world_size``-th shard. Per sample, ``job.prepare`` runs on CPU threads (``workers``); per batch of
``batch_size``, ``job.run`` runs on the device; a writer thread writes shard ``i`` while the model
works on shard ``i + 1`` (so up to two shards' outputs are in memory). Batches never span shards, so
a shard's bytes do not depend on which rank wrote it or when.

Resume: each shard is written atomically (``vtok.data.writers.write_shard``) and a finished one is
skipped, so a rerun after ``kill -9`` writes exactly the shards of an uninterrupted run. Beside the
shards, ``<out>/_precompute/`` holds ``identity.json`` (job, model path + hash, settings: a job or
model that differs refuses the directory) and one stats file per shard (written before the shard is
renamed into place), which rank 0 merges at the end into ``<out>/precompute.json`` (counts, bad
samples by key, throughput, settings) and ``<out>/<job>.json`` (the job's metadata, e.g. codes.json).

Bad samples (``prepare`` or ``run`` raises/returns :class:`BadSample`, or a field is missing) are
skipped, counted and logged with their key, as the training loader does; past ``max_bad_fraction`` the
job stops with a one-line :class:`DataError`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from vtok.data.loader import BAD_CHECK_MIN_BAD, BAD_CHECK_MIN_SAMPLES
from vtok.data.shards import ShardSource
from vtok.data.stream import MAX_LOGGED_SKIPS
from vtok.data.transforms import BadSample, DataError
from vtok.data.writers import MANIFEST, atomic_write_bytes, finalize, shard_name, write_shard
from vtok.parallel.dist import DistInfo, barrier, broadcast_object

log = logging.getLogger("vtok.precompute")
STATE_DIR = "_precompute"
IDENTITY = "identity.json"
SUMMARY = "precompute.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")  # choices of the jobs' --dtype


@dataclass
class RunnerOptions:
    """What every precompute job takes (``vtok precompute <job>`` flags)."""

    data: str = field(metadata={"help": "input shards: tar dir / brace pattern, or MDS dir"})
    out: str = field(metadata={"help": "output directory (resumable; refuses another job's or model's)"})
    format: str = field(default="", metadata={"help": "output shard format (default: the input's)",
                                              "choices": ("", "wds", "mds")})
    batch_size: int = field(default=64, metadata={"help": "samples per model call"})
    workers: int = field(default=2, metadata={"help": "CPU threads decoding / preparing samples"})
    max_bad_fraction: float = field(default=0.001, metadata={
        "help": "bad samples (skipped, counted, logged) tolerated before the job stops"})
    progress: bool = field(default=True, metadata={"help": "no progress bar (default: one on rank 0)"})


class Job:
    """A precompute job: a frozen model that adds schema fields to each sample.

    Subclasses set ``name`` (the command, and ``<out>/<name>.json``), ``adds`` (fields written) and
    ``drops`` (input fields left out of the output), and implement :meth:`identity`, :meth:`load`,
    :meth:`prepare` and :meth:`run`.
    """

    name: str = ""
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """``{"model": model_identity(path), "settings": {...}}``: what makes two outputs comparable.
        Cheap (no weights loaded): checked against the output directory before :meth:`load`."""
        raise NotImplementedError

    def load(self, device: torch.device) -> None:
        """Load the frozen model onto ``device`` (once, after the output directory was accepted)."""

    def prepare(self, sample: dict[str, Any]) -> Any:
        """One schema sample -> the model's input for it, on CPU (runs in worker threads).
        Raise :class:`BadSample` (or KeyError for a missing field) to skip the sample."""
        raise NotImplementedError

    def run(self, items: list[Any]) -> list[dict[str, Any] | BadSample]:
        """A batch of prepared items -> per item, the new fields (numpy arrays / str), or a
        :class:`BadSample` for one that failed."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """Written by rank 0 to ``<out>/<name>.json`` when the job completes."""
        return {}


def model_identity(path: str | Path) -> dict[str, str]:
    """``{"path", "hash"}`` of a model file or directory: the hash covers the names, sizes and
    mtimes of its files (top level), so replacing the weights changes it without reading them."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"model not found: {path}")
    files = sorted(f for f in (p.iterdir() if p.is_dir() else [p]) if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(p), "hash": h.hexdigest()[:16]}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; else the named torch dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise DataError(f"dtype {name!r}: use auto, {', '.join(dtypes)}")
    return dtypes[name]


@dataclass
class ShardStats:
    """One output shard's counts, stored as ``<out>/_precompute/<shard>.json``."""

    shard: int
    rank: int
    seen: int = 0
    written: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # key -> reason
    seconds: float = 0.0


@dataclass
class RunResult:
    """What this rank did in one :func:`run_job` call."""

    written_shards: int = 0
    skipped_shards: int = 0
    samples: int = 0
    bad: int = 0
    summary: dict[str, Any] = field(default_factory=dict)  # rank 0: precompute.json


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def claim_output(out: Path, ident: dict[str, Any]) -> str:
    """Accept ``out`` for the job ``ident`` (recording it), or return the one-line refusal."""
    recorded = (_read_json(out / MANIFEST) or {}).get("precompute") or _read_json(out / STATE_DIR / IDENTITY)
    if recorded is not None:
        if recorded == ident:
            return ""
        what = []
        if recorded.get("job") != ident["job"]:
            what.append(f"job `{recorded.get('job')}`, not `{ident['job']}`")
        if recorded.get("model") != ident["model"]:
            what.append(f"model {recorded.get('model')}, not {ident['model']}")
        if not what:
            what.append(f"settings {recorded.get('settings')} / format {recorded.get('format')}, not "
                        f"{ident['settings']} / {ident['format']}")
        return f"{out} holds the output of {'; '.join(what)}: pass another --out (or delete that directory)"
    if any(out.glob("shard-*")) or (out / MANIFEST).exists():
        return (f"{out} holds shards not written by `vtok precompute {ident['job']}` (no record of their "
                "job and model): pass an empty or new --out")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / STATE_DIR / IDENTITY, json.dumps(ident, indent=1, sort_keys=True).encode())
    return ""


def shard_sizes(source: ShardSource) -> list[int] | None:
    """Samples per input shard when the shard set records them (MDS index, vtok manifest.json)."""
    if source.format == "mds":
        return [int(h["samples"]) for h in source.handles]
    manifest = _read_json(Path(source.spec) / MANIFEST) if Path(source.spec).is_dir() else None
    counts = {s["name"]: s["samples"] for s in (manifest or {}).get("shards", [])}
    sizes = [counts.get(Path(str(u)).name) for u in source.handles]
    return None if any(s is None for s in sizes) else sizes


def _attempt(fn: Callable[[dict[str, Any]], Any], sample: dict[str, Any]) -> Any:
    try:
        return fn(sample)
    except BadSample as e:
        return e
    except KeyError as e:
        return BadSample(f"missing field {e}")


def prepared(samples: Iterable[dict[str, Any]], fn: Callable[[dict[str, Any]], Any],
             pool: ThreadPoolExecutor | None, ahead: int) -> Iterator[tuple[dict[str, Any], Any]]:
    """``(sample, fn(sample) or BadSample)`` in input order, ``fn`` running up to ``ahead`` samples
    ahead on ``pool``'s threads (inline without a pool)."""
    if pool is None:
        for s in samples:
            yield s, _attempt(fn, s)
        return
    pending: deque[tuple[dict[str, Any], Future]] = deque()
    for s in samples:
        pending.append((s, pool.submit(_attempt, fn, s)))
        if len(pending) >= ahead:
            s0, fut = pending.popleft()
            yield s0, fut.result()
    while pending:
        s0, fut = pending.popleft()
        yield s0, fut.result()


class Runner:
    """Runs one job over this rank's shards (see the module docstring); use :func:`run_job`."""

    def __init__(self, job: Job, opts: RunnerOptions, info: DistInfo):
        self.job, self.opts, self.info = job, opts, info
        self.source = ShardSource.open(opts.data)
        self.format = opts.format or self.source.format
        self.out = Path(opts.out)
        self.state = self.out / STATE_DIR
        self.logged = 0
        self.seen = self.bad = 0

    def _done(self, i: int) -> bool:
        return (self.out / shard_name(self.format, i)).exists()

    def _stats_path(self, i: int) -> Path:
        return self.state / f"{shard_name('mds', i)}.json"

    def _skip(self, stats: ShardStats, key: str, reason: str) -> None:
        stats.bad[key] = reason
        self.logged += 1
        if self.logged <= MAX_LOGGED_SKIPS:
            log.warning("skipping key %s (shard %d): %s", key, stats.shard, reason)
        if self.logged == MAX_LOGGED_SKIPS:
            log.warning("rank %d: further bad samples are counted (precompute.json) but not logged", self.info.rank)

    def _emit(self, batch: list[tuple[dict[str, Any], Any]], stats: ShardStats) -> Iterator[dict[str, Any]]:
        results = self.job.run([p for _, p in batch])
        for (sample, _), new in zip(batch, results, strict=True):
            if isinstance(new, BadSample):
                self._skip(stats, sample["__key__"], str(new))
                continue
            stats.written += 1
            yield {**{k: v for k, v in sample.items() if k not in self.job.drops}, **new}

    def _shard(self, i: int, pool: ThreadPoolExecutor | None, bar: tqdm) -> Iterator[dict[str, Any]]:
        """The output samples of shard ``i``; its stats file is written after the last one (so before
        the shard is written and renamed into place: a finished shard always has its stats)."""
        t0 = time.perf_counter()
        stats = ShardStats(i, self.info.rank)
        bs = self.opts.batch_size
        batch: list[tuple[dict[str, Any], Any]] = []
        counted = 0  # samples reported to the progress bar
        for sample, prep in prepared(self.source.read(i), self.job.prepare, pool, 2 * bs * max(1, self.opts.workers)):
            stats.seen += 1
            if isinstance(prep, BadSample):
                self._skip(stats, sample["__key__"], str(prep))
            else:
                batch.append((sample, prep))
            if len(batch) == bs:
                yield from self._emit(batch, stats)
                bar.update(stats.seen - counted)
                counted, batch = stats.seen, []
        if batch:
            yield from self._emit(batch, stats)
        bar.update(stats.seen - counted)
        stats.seconds = time.perf_counter() - t0
        atomic_write_bytes(self._stats_path(i), json.dumps(asdict(stats), indent=1).encode())
        self.seen += stats.seen
        self.bad += len(stats.bad)

    def _check_bad(self, seen: int, bad: int, final: bool) -> str:
        ready = final or seen >= BAD_CHECK_MIN_SAMPLES or bad >= BAD_CHECK_MIN_BAD
        if bad and ready and bad > self.opts.max_bad_fraction * seen:
            return (f"{bad} of {seen} samples were bad ({bad / seen:.2%}), more than --max-bad-fraction="
                    f"{self.opts.max_bad_fraction}; the keys and reasons are in {self.state}/ and the "
                    "'skipping' warnings: fix or drop those samples, or raise the limit")
        return ""

    def run(self) -> RunResult:
        out, info = self.out, self.info
        if out.resolve() == Path(self.opts.data).resolve():
            raise DataError(f"--out {out} is the input directory; write the output elsewhere")
        out.mkdir(parents=True, exist_ok=True)
        ident = json.loads(json.dumps({"job": self.job.name, "format": self.format, **self.job.identity()}))
        refusal = claim_output(out, ident) if info.is_main else ""
        refusal = broadcast_object(refusal)
        if refusal:
            raise DataError(refusal)
        self.job.load(info.device)
        n = len(self.source)
        mine = [i for i in range(n) if i % info.world_size == info.rank]
        todo = [i for i in mine if not self._done(i)]
        sizes = shard_sizes(self.source)
        total = sum(sizes[i] for i in mine) if sizes else None
        initial = sum(sizes[i] for i in mine if i not in todo) if sizes else 0
        bar = tqdm(total=total, initial=initial, unit="sample", dynamic_ncols=True,
                   desc=f"{self.job.name} rank {info.rank}/{info.world_size}",
                   disable=not (self.opts.progress and info.is_main))
        result = RunResult(skipped_shards=len(mine) - len(todo))
        pool = ThreadPoolExecutor(self.opts.workers) if self.opts.workers > 0 else None
        writer = ThreadPoolExecutor(1)  # writes shard i while the model runs on shard i + 1
        writing: Future | None = None
        try:
            for i in todo:
                samples = list(self._shard(i, pool, bar))  # its stats file is written by now
                if writing is not None:
                    writing.result()
                    result.written_shards += 1
                error = self._check_bad(self.seen, self.bad, final=False)
                if error:
                    raise DataError(error)
                writing = writer.submit(write_shard, out, self.format, i, samples)
            if writing is not None:
                writing.result()
                result.written_shards += 1
        finally:
            bar.close()
            writer.shutdown(wait=True)  # never leave a half-written .tmp behind a clean exit
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        result.samples, result.bad = self.seen - self.bad, self.bad
        barrier()
        error = ""
        if info.is_main:
            result.summary = self._finish(ident)
            error = self._check_bad(result.summary["samples_seen"], result.summary["bad"], final=True)
        error = broadcast_object(error)
        if error:
            raise DataError(error)
        return result

    def _finish(self, ident: dict[str, Any]) -> dict[str, Any]:
        """Rank 0, after every rank wrote its shards: manifest, job metadata, merged summary."""
        out, n = self.out, len(self.source)
        stats = [s for s in (_read_json(self._stats_path(i)) for i in range(n)) if s is not None]
        counts = {shard_name(self.format, s["shard"]): s["written"] for s in stats}  # no re-reading of shards
        total = finalize(out, self.format, counts=counts, extra={"precompute": ident})
        meta = self.job.metadata()
        atomic_write_bytes(out / f"{self.job.name}.json", json.dumps(meta, indent=1).encode())
        bad = {k: v for s in stats for k, v in sorted(s["bad"].items())}
        seconds = sum(s["seconds"] for s in stats)
        seen = sum(s["seen"] for s in stats)
        summary = {
            "job": self.job.name, "model": ident["model"], "settings": ident["settings"],
            "runner": {k: v for k, v in asdict(self.opts).items() if k != "progress"},
            "input": {"spec": self.source.spec, "format": self.source.format, "shards": n},
            "output": {"format": self.format, "shards": len(stats), "samples": total},
            "samples_seen": seen, "samples_written": sum(s["written"] for s in stats), "bad": len(bad),
            "bad_samples": bad, "rank_seconds": round(seconds, 3),
            "samples_per_s_per_rank": round(seen / seconds, 2) if seconds else 0.0,
            "world_size": self.info.world_size, "metadata": meta,
        }
        atomic_write_bytes(out / SUMMARY, json.dumps(summary, indent=1).encode())
        log.info("%s: %d samples in %d shards (%d bad) -> %s", self.job.name, total, n, len(bad), out)
        return summary


def run_job(job: Job, opts: RunnerOptions, info: DistInfo) -> RunResult:
    """Run ``job`` over ``opts.data`` into ``opts.out`` on this rank (all ranks call it)."""
    return Runner(job, opts, info).run()
