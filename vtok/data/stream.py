"""Worker-side pieces shared by both backends: decode, skip-and-count bad samples, batch.

Batching happens inside the DataLoader worker (the DataLoader runs with ``batch_size=None``), so each
batch carries a small ``Meta`` record of where its worker stands. The main process reads it to track
resume position and bad-sample counts without any extra channel between processes.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from vtok.data.transforms import BadSample, DataError, SampleDecoder, collate

log = logging.getLogger("vtok.data")

META = "__meta__"
MAX_LOGGED_SKIPS = 20  # per worker and epoch; later skips are only counted


@dataclass
class Meta:
    """Position and counters of one worker, sent along with each of its batches.

    ``rows``: raw samples this batch accounts for (good + skipped), for exact MDS resume.
    ``shards_done``/``offset``: wds only, how many shards of this worker's list are fully delivered
    and how many events (samples, good or bad) of the next one, counting this batch.
    ``seen``/``bad``: the worker's running totals this epoch. ``error``: a fatal DataError message.
    """

    worker: int
    rows: int = 0
    shards_done: int = 0
    offset: int = 0
    seen: int = 0
    bad: int = 0
    error: str = ""
    bad_keys: list[str] = field(default_factory=list)


def worker_identity(rank: int, world_size: int) -> tuple[int, int]:
    """(global worker id, total workers) for the current DataLoader worker of ``rank``."""
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world_size * nw


def worker_rng(seed: int, epoch: int, worker: int) -> random.Random:
    """Deterministic RNG for one worker in one epoch (``worker=-1``: the WebDataset shard order)."""
    return random.Random(f"vtok-{seed}-{epoch}-{worker}")


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """RNG for one sample's augmentation: the same crop/flip whatever worker reads it, and after a
    resume, so a resumed run sees exactly the pixels an uninterrupted one would."""
    return random.Random(f"vtok-{seed}-{epoch}-{key}")


class Batcher:
    """Convert + decode raw samples, skip bad ones with a log line, emit collated batches with Meta.

    ``convert(raw, fields)`` turns a backend's raw record into a schema sample (KeyError if a field
    is missing); ``decoder`` turns that into tensors.
    """

    def __init__(self, convert: Callable[[Any, tuple[str, ...]], dict[str, Any]],
                 decoder: SampleDecoder, batch_size: int, channels_last: bool, worker: int,
                 seed: int, epoch: int, drop_last: bool = False):
        self.convert = convert
        self.decoder, self.batch_size, self.channels_last = decoder, batch_size, channels_last
        self.seed, self.epoch, self.drop_last = seed, epoch, drop_last
        self.meta = Meta(worker=worker)
        self._buf: list[dict[str, Any]] = []
        self._rows = 0

    def bad(self, where: str, reason: str) -> None:
        """Count one skipped sample or shard."""
        self.meta.bad += 1
        self.meta.seen += 1
        self._rows += 1
        self.meta.bad_keys.append(where)
        if self.meta.bad <= MAX_LOGGED_SKIPS:
            log.warning("skipping %s: %s", where, reason)
        if self.meta.bad == MAX_LOGGED_SKIPS:
            log.warning("worker %d: further bad samples are counted but not logged", self.meta.worker)

    def add(self, raw: dict[str, Any], where: str) -> Iterator[dict[str, Any]]:
        """Convert and decode ``raw`` into the pending batch; yields a batch when one is full."""
        try:
            rng = sample_rng(self.seed, self.epoch, raw["__key__"])
            self._buf.append(self.decoder(self.convert(raw, self.decoder.fields), rng, where))
            self.meta.seen += 1
            self._rows += 1
        except BadSample as e:
            self.bad(f"{where} key {raw.get('__key__')}", str(e))
        except KeyError as e:
            self.bad(f"{where} key {raw.get('__key__')}", f"missing field {e}")
        if len(self._buf) == self.batch_size:
            yield self._emit()

    def error(self, message: str) -> dict[str, Any]:
        """A meta-only item that makes the main process raise DataError(message)."""
        self.meta.error = message
        return {META: self._snapshot()}

    def placeholder(self) -> dict[str, Any]:
        """A meta-only item with the current position (lines up the DataLoader's round robin)."""
        return {META: self._snapshot()}

    def finish(self) -> Iterator[dict[str, Any]]:
        """The last partial batch (unless drop_last) and a final meta-only item with the totals."""
        if self._buf and not self.drop_last:
            yield self._emit()
        yield {META: self._snapshot()}

    def _snapshot(self) -> Meta:
        snap = Meta(**{**self.meta.__dict__, "rows": self._rows, "bad_keys": list(self.meta.bad_keys)})
        self._rows = 0
        self.meta.bad_keys.clear()
        return snap

    def _emit(self) -> dict[str, Any]:
        batch = collate(self._buf, self.channels_last)
        self._buf = []
        batch[META] = self._snapshot()
        return batch


def guarded(items: Iterable[dict[str, Any]], batcher: Batcher) -> Iterator[dict[str, Any]]:
    """Turn a DataError raised while producing ``items`` into a one-line error item."""
    try:
        yield from items
    except DataError as e:
        yield batcher.error(str(e))
