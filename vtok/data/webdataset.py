"""WebDataset backend: ``.tar`` shards (local paths, brace ranges, ``pipe:``/``http`` URLs).

Splitting: each epoch, the shard list is permuted from ``(seed, epoch)`` and shard ``i`` of the
permutation goes to global worker ``i % (world_size * num_workers)``, where the global worker id is
``rank * num_workers + worker``. So every sample is read exactly once per epoch by exactly one
(rank, worker); fewer shards than ``world_size * num_workers`` is an error rather than idle workers.

vtok does this assignment itself rather than chaining webdataset's ``split_by_node`` /
``split_by_worker`` and ``with_epoch`` (which counts per worker): one function owns the mapping, so
the main process can recompute which shards a worker has finished, and resume is layout-independent.
webdataset's ``gopen`` opens the URLs, so every URL scheme it supports works here.

Resume is shard-granular: the state lists the shards whose samples were all delivered; on resume
they are skipped and the rest are split over the (possibly different) set of workers. Samples
already delivered from a partially read shard are seen again.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import torch
from braceexpand import braceexpand

from vtok.data.schema import from_wds
from vtok.data.stream import Batcher, guarded, worker_identity, worker_rng
from vtok.data.transforms import DataError, SampleDecoder

REMOTE = re.compile(r"^(pipe:|https?://|s3://|gs://)")


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
            raise DataError(f"shard not found: {url} (from {setting}={spec!r}); check the path, "
                            "or write shards with data_prep/make_shards.py")
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


def read_tar(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar as ``{"__key__": key, ext: bytes, ...}``, grouped by consecutive key.

    A truncated or corrupt tar raises ``tarfile.TarError``/``OSError`` after its good samples.
    """
    import webdataset

    stream = webdataset.gopen(url, "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            current: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if current and key != current["__key__"]:
                    yield current
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(member).read()
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


class WdsStream(torch.utils.data.IterableDataset):
    """One rank's stream of batches from tar shards (see the module docstring for splitting)."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, *, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle: bool, shuffle_buffer: int,
                 channels_last: bool = False, drop_last: bool = False):
        super().__init__()
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.channels_last, self.drop_last = channels_last, drop_last
        self.epoch = 0
        self.completed: frozenset[int] = frozenset()  # shards finished earlier in this epoch (resume)

    def shards_for(self, worker: int, num_workers_total: int) -> list[int]:
        """Shard indices of global ``worker`` this epoch (what the main process uses for resume)."""
        return assign_shards(len(self.urls), self.epoch, self.seed, self.shuffle, worker,
                             num_workers_total, self.completed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gid, total = worker_identity(self.rank, self.world_size)
        rng = worker_rng(self.seed, self.epoch, gid)
        batcher = Batcher(from_wds, self.decoder, self.batch_size, self.channels_last, gid, self.seed,
                          self.epoch, self.drop_last)
        mine = [self.urls[i] for i in self.shards_for(gid, total)]
        yield from guarded(self._batches(mine, rng, batcher), batcher)

    def _batches(self, mine: list[str], rng, batcher: Batcher) -> Iterator[dict[str, Any]]:
        buffer: list[tuple[dict[str, Any], int]] = []  # (raw sample, position of its shard in `mine`)
        pending = [0] * len(mine)  # per shard: samples read but not yet decoded
        finished = [False] * len(mine)  # per shard: reading is complete
        size = self.shuffle_buffer if self.shuffle else 1

        def pop(index: int) -> Iterator[dict[str, Any]]:
            raw, pos = buffer.pop(index)
            pending[pos] -= 1
            while batcher.meta.shards_done < len(mine) and finished[batcher.meta.shards_done] \
                    and pending[batcher.meta.shards_done] == 0:
                batcher.meta.shards_done += 1
            yield from batcher.add(raw, mine[pos])

        for pos, url in enumerate(mine):
            try:
                for raw in read_tar(url):
                    buffer.append((raw, pos))
                    pending[pos] += 1
                    if len(buffer) >= size:
                        yield from pop(rng.randrange(len(buffer)) if size > 1 else 0)
            except (tarfile.TarError, OSError, EOFError) as e:
                batcher.bad(f"shard {url}", f"unreadable or truncated tar ({type(e).__name__}: {e})")
            finished[pos] = True
        while buffer:
            yield from pop(rng.randrange(len(buffer)) if size > 1 else 0)
        batcher.meta.shards_done = len(mine)
        yield from batcher.finish()
