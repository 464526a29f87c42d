"""WebDataset backend: ``.tar`` shards (local paths, brace ranges, ``pipe:``/``http`` URLs).

Splitting: each epoch, the shard list is permuted from ``(seed, epoch)`` and shard ``i`` of the
permutation goes to global worker ``i % (world_size * num_workers)``, where the global worker id is
``rank * num_workers + worker``. So every sample is read exactly once per epoch by exactly one
(rank, worker); fewer shards than ``world_size * num_workers`` is an error rather than idle workers.

vtok does this assignment itself rather than chaining webdataset's ``split_by_node`` /
``split_by_worker`` and ``with_epoch`` (which counts per worker): one function owns the mapping, so
the main process can recompute which shards a worker has finished. webdataset's ``gopen`` opens the
URLs, so every URL scheme it supports works here.

Shuffling within a reader is per shard: a shard's samples pass through a shuffle buffer whose RNG is
seeded by ``(seed, epoch, shard)`` and which is drained at the shard's end. So the order of a shard's
*events* (its samples, plus its bad-data events) is a pure function of the shard, the seed and the
epoch, and "the first ``n`` events of shard ``s``" means the same samples in any run.

Resume: each batch reports its reader's position (shards of its list finished, events consumed from
the current one). On resume with the same ranks x workers, every reader continues at its position
and re-reads the current shard's delivered prefix without decoding it, and the rank's DataLoader is
re-aligned to the worker whose batch was next: the batches are exactly those of an uninterrupted run.
With a different layout, the unfinished shards are re-dealt over the new readers and each skips the
events of its shards already delivered: every sample still exactly once, in a different order.
"""
from __future__ import annotations

import json
import logging
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from braceexpand import braceexpand

from vtok.data.schema import from_wds
from vtok.data.stream import Batcher, guarded, worker_identity, worker_rng
from vtok.data.transforms import DataError, SampleDecoder

log = logging.getLogger("vtok.data")
REMOTE = re.compile(r"^(pipe:|https?://|s3://|gs://)")


SMOKE_DATA = "vtok_demo"  # where `vtok demo` and the smoke recipes (recipes/smoke/) keep their data


def write_shards_hint(path: str, fmt: str = "wds", job: str = "") -> str:
    """What creates the missing shards at ``path``, as the end of an error message: the command
    that writes the smoke recipes' data when the path is under ``vtok_demo/``, else the shard
    writers for real images and for the built-in shapes, or ``vtok precompute <job>`` for shards
    that a precompute ``job`` (codes, latents, ...) writes."""
    p = Path(path)
    folder = p.parent if p.suffix == ".tar" or "{" in p.name else p
    flag = " --format mds" if fmt == "mds" else ""
    smoke = SMOKE_DATA in p.parts
    if job or (smoke and folder.name == "codes"):
        job = job or "codes"
        demo = (f"`vtok demo --out {folder.parent}` writes them (its stage 3), or "
                if smoke and job == "codes" else "")
        return (f"{demo}write them with `vtok precompute {job} --data IMAGE_SHARDS --out {folder} ...` "
                f"(see `vtok precompute {job} --help`)")
    if smoke:
        demo = f", or run `vtok demo --out {folder.parent}`" if fmt == "wds" and folder.name == "wds" else ""
        return f"create them with `vtok data synthetic {folder}{flag}` (the built-in shapes){demo}"
    return (f"check the path, or write shards there with `python data_prep/make_shards.py --images IMAGE_DIR "
            f"--out {folder}{flag}` (real images) or `vtok data synthetic {folder}{flag}` (built-in shapes)")


def expand_shards(spec: str, setting: str = "data.train_shards") -> list[str]:
    """Shard list from a spec: paths, brace ranges, ``pipe:`` / http URLs, or directories; several
    specs are joined with ``::`` (webdataset's convention; commands in ``pipe:`` URLs keep their spaces).

    A directory yields the shards named in its ``manifest.json`` (else its sorted ``*.tar``). Local
    paths must exist: a missing one raises DataError naming it.
    """
    urls: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if not REMOTE.match(part) and Path(part).is_dir():
            manifest = Path(part) / "manifest.json"
            if manifest.is_file():
                names = [s["name"] for s in json.loads(manifest.read_text())["shards"]]
            else:
                names = sorted(p.name for p in Path(part).glob("*.tar"))
            urls.extend(str(Path(part) / n) for n in names)
            continue
        urls.extend(braceexpand(part))
    if not urls:
        raise DataError(f"{setting}={spec!r} names no shards; give .tar paths, a brace range "
                        "like data/train-{000000..000099}.tar, or a directory of shards")
    for url in urls:
        if not REMOTE.match(url) and not Path(url).exists():  # (a named pipe is fine too)
            raise DataError(f"shard not found: {url} (from {setting}={spec!r}); "
                            f"{write_shards_hint(url)}")
    return urls


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Raise DataError if ``num_shards`` cannot give every (rank, worker) reader at least one shard."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise DataError(f"{num_shards} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
                        f"workers = {readers} readers exactly once; lower data.num_workers or write "
                        "more, smaller shards (data_prep/make_shards.py --samples-per-shard)")


def _split_key(name: str) -> tuple[str, str]:
    """'dir/000123.text_emb.npy' -> ('dir/000123', 'text_emb.npy') (key ends at the basename's first dot)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext


def read_tar(url: str, on_duplicate: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar as ``{"__key__": key, ext: bytes, ...}``, grouped by consecutive key.

    A key that already had a sample in this tar (again later, or a member extension repeating
    within a group) starts a duplicate sample: its members are dropped, the first sample is kept,
    and ``on_duplicate(key)`` is called (default: a warning naming key and shard).
    A truncated or corrupt tar raises ``tarfile.TarError``/``OSError`` after its good samples.
    """
    import webdataset

    def duplicate(key: str) -> None:
        if on_duplicate is not None:
            on_duplicate(key)
        else:
            log.warning("skipping a second sample with key %r in shard %s (the first is kept)", key, url)

    stream = webdataset.gopen(url, "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            current: dict[str, Any] = {}
            seen: set[str] = set()
            dropping, dropped = None, set()  # key of the duplicate being dropped, its extensions
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if current and key == current["__key__"] and ext not in current:
                    current[ext] = tar.extractfile(member).read()
                    continue
                if current:
                    yield current
                    current = {}
                if key == dropping:
                    if ext in dropped:  # a third sample with this key
                        duplicate(key)
                        dropped = set()
                    dropped.add(ext)
                    continue
                if key in seen:
                    duplicate(key)
                    dropping, dropped = key, {ext}
                    continue
                seen.add(key)
                dropping = None
                current = {"__key__": key, ext: tar.extractfile(member).read()}
            if current:
                yield current
    finally:
        stream.close()


def epoch_shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of all shards in the order they are dealt out in ``epoch``."""
    order = list(range(num_shards))
    if shuffle:
        worker_rng(seed, epoch, -1).shuffle(order)
    return order


def assign_shards(num_shards: int, epoch: int, seed: int, shuffle: bool, worker: int,
                  num_workers_total: int, completed: frozenset[int] = frozenset()) -> list[int]:
    """The shard indices global worker ``worker`` reads in ``epoch``, skipping ``completed`` ones."""
    remaining = [i for i in epoch_shard_order(num_shards, epoch, seed, shuffle) if i not in completed]
    return remaining[worker::num_workers_total]


def shard_rng(seed: int, epoch: int, shard: int) -> random.Random:
    """RNG of one shard's shuffle buffer in ``epoch`` (independent of which reader reads it)."""
    return random.Random(f"vtok-{seed}-{epoch}-shard-{shard}")


@dataclass
class BadEvent:
    """A bad sample or shard found while reading, in its place in the shard's event order."""

    where: str
    reason: str


def shard_events(url: str, rng: random.Random, buffer_size: int) -> Iterator[dict[str, Any] | BadEvent]:
    """The events of one shard in delivery order: raw samples through a shuffle buffer of
    ``buffer_size`` (1: stored order) drained at the shard's end, duplicate keys and a read error
    as ``BadEvent``s where they are found. Deterministic for a given shard and ``rng`` seed."""
    buffer: list[dict[str, Any]] = []
    found: list[BadEvent] = []

    def duplicate(key: str) -> None:
        found.append(BadEvent(f"shard {url} key {key}",
                              f"duplicate key {key!r} in shard {url} (the first sample is kept)"))

    try:
        for raw in read_tar(url, on_duplicate=duplicate):
            yield from found
            found.clear()
            buffer.append(raw)
            if len(buffer) >= buffer_size:
                yield buffer.pop(rng.randrange(len(buffer)))
    except (tarfile.TarError, OSError, EOFError) as e:
        found.append(BadEvent(f"shard {url}", f"unreadable or truncated tar ({type(e).__name__}: {e})"))
    yield from found
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


class WdsStream(torch.utils.data.IterableDataset):
    """One rank's stream of batches from tar shards (see the module docstring for splitting).

    Resume inputs, set by the loader before ``iter()``: ``base`` (shards left out when dealing this
    epoch), ``partial`` (shard -> events already delivered), ``start`` (global reader -> [shards of
    its list finished, events of the next one delivered]) and ``lead`` (the local worker whose
    batch comes first; workers before it send one empty item so the DataLoader's round robin lines up).
    """

    def __init__(self, urls: list[str], decoder: SampleDecoder, *, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle: bool, shuffle_buffer: int,
                 channels_last: bool = False, drop_last: bool = False):
        super().__init__()
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.channels_last, self.drop_last = channels_last, drop_last
        self.epoch = 0
        self.base: frozenset[int] = frozenset()
        self.partial: dict[int, int] = {}
        self.start: dict[int, tuple[int, int]] = {}
        self.lead = 0

    @property
    def buffer_size(self) -> int:
        """Samples held by the per-shard shuffle buffer (1 when not shuffling)."""
        return max(1, self.shuffle_buffer) if self.shuffle else 1

    def shards_for(self, worker: int, num_workers_total: int) -> list[int]:
        """Shard indices of global ``worker`` this epoch (what the main process uses for resume)."""
        return assign_shards(len(self.urls), self.epoch, self.seed, self.shuffle, worker,
                             num_workers_total, self.base)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gid, total = worker_identity(self.rank, self.world_size)
        batcher = Batcher(from_wds, self.decoder, self.batch_size, self.channels_last, gid, self.seed,
                          self.epoch, self.drop_last)
        done, offset = self.start.get(gid, (0, 0))
        batcher.meta.shards_done, batcher.meta.offset = done, offset
        if gid - self.rank * (total // self.world_size) < self.lead:
            yield batcher.placeholder()
        yield from guarded(self._batches(self.shards_for(gid, total), done, offset, batcher), batcher)

    def _batches(self, mine: list[int], done: int, offset: int,
                 batcher: Batcher) -> Iterator[dict[str, Any]]:
        end = object()
        for pos in range(done, len(mine)):
            shard, url = mine[pos], self.urls[mine[pos]]
            skip = max(offset if pos == done else 0, self.partial.get(shard, 0))
            events = shard_events(url, shard_rng(self.seed, self.epoch, shard), self.buffer_size)
            following, n = next(events, end), 0
            while following is not end:
                event, following, n = following, next(events, end), n + 1
                if n <= skip:  # delivered before the resume: read again, but not decoded
                    continue
                # position after this event (look-ahead: a finished shard is not re-read on resume)
                batcher.meta.shards_done, batcher.meta.offset = (pos, n) if following is not end \
                    else (pos + 1, 0)
                if isinstance(event, BadEvent):
                    batcher.bad(event.where, event.reason)
                else:
                    yield from batcher.add(event, url)
            batcher.meta.shards_done, batcher.meta.offset = pos + 1, 0
        batcher.meta.shards_done, batcher.meta.offset = len(mine), 0
        yield from batcher.finish()
