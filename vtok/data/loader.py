"""The one data API: ``build_loader(cfg, ...)`` -> a resumable iterator of batches for this rank.

    loader = build_loader(recipe.data, rank=0, world_size=1, seed=recipe.seed)
    for batch in loader:            # one epoch; batch["image"]: (B, 3, H, W) in [-1, 1]
        ...
    state = loader.state_dict()     # save with the checkpoint; load_state_dict() resumes

Both backends yield the same batch dict (see ``transforms.COLLATE``). Resume is exact for MDS
(streaming's own state) and shard-granular for WebDataset (see ``vtok.data.webdataset``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from vtok.config.schema import DataConfig
from vtok.data.mds import MdsStream, open_streaming
from vtok.data.stream import META, Meta
from vtok.data.transforms import DataError, SampleDecoder
from vtok.data.webdataset import WdsStream, check_enough_shards, expand_shards

log = logging.getLogger("vtok.data")

# The bad-sample fraction is checked once this many samples (or bad ones) were seen, and at every
# epoch end: one corrupt file early in a run does not trip a small max_bad_fraction, but a broken
# dataset stops early.
BAD_CHECK_MIN_SAMPLES = 1000
BAD_CHECK_MIN_BAD = 50


@dataclass
class LoaderStats:
    """Running counters of one rank's loader (this process only); ``seconds`` is data-wait time."""

    batches: int = 0
    samples: int = 0
    bad: int = 0
    seen: int = 0
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


class ShardLoader:
    """Iterate one epoch per ``iter()``; track position for ``state_dict``; enforce the bad policy."""

    def __init__(self, stream: WdsStream | MdsStream, cfg: DataConfig, *, world_size: int):
        self.stream, self.cfg, self.world_size = stream, cfg, world_size
        self.epoch = 0
        self.stats = LoaderStats()
        self._worker_meta: dict[int, Meta] = {}
        self._completed: set[int] = set()  # wds: shards finished this epoch
        self._rows = 0  # mds: raw rows consumed by this rank this epoch, in this process
        self._mds_resume: dict[str, Any] | None = None
        workers = cfg.num_workers
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory,
            prefetch_factor=cfg.prefetch_factor if workers else None)

    @property
    def format(self) -> str:
        return "mds" if isinstance(self.stream, MdsStream) else "wds"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches for this rank (resumed mid-epoch after ``load_state_dict``)."""
        self.stream.epoch = self.epoch
        if isinstance(self.stream, WdsStream):
            self.stream.completed = frozenset(self._completed)
        self._worker_meta = {}
        total_workers = self.world_size * max(1, self.cfg.num_workers)
        batches = iter(self.loader)
        while True:
            t0 = time.perf_counter()  # time spent waiting for data, not in the consumer
            item = next(batches, None)
            self.stats.seconds += time.perf_counter() - t0
            if item is None:
                break
            meta: Meta = item.pop(META)
            self._account(meta, total_workers)
            if len(item):  # meta-only items carry counters, not samples
                self.stats.batches += 1
                self.stats.samples += len(item["__key__"])
                yield item
        self._check_bad(final=True)
        self.epoch += 1
        self._completed, self._rows, self._mds_resume = set(), 0, None

    def _account(self, meta: Meta, total_workers: int) -> None:
        if meta.error:
            raise DataError(meta.error)
        self._worker_meta[meta.worker] = meta
        self._rows += meta.rows
        if isinstance(self.stream, WdsStream):
            mine = self.stream.shards_for(meta.worker, total_workers)
            self._completed.update(mine[: meta.shards_done])
        self.stats.seen = sum(m.seen for m in self._worker_meta.values())
        self.stats.bad = sum(m.bad for m in self._worker_meta.values())
        self._check_bad(final=False)

    def _check_bad(self, final: bool) -> None:
        seen, bad = self.stats.seen, self.stats.bad
        ready = final or seen >= BAD_CHECK_MIN_SAMPLES or bad >= BAD_CHECK_MIN_BAD
        if bad and ready and bad > self.cfg.max_bad_fraction * seen:
            raise DataError(f"{bad} of {seen} samples/shards were bad ({bad / seen:.2%}), more than "
                            f"data.max_bad_fraction={self.cfg.max_bad_fraction}; see the 'skipping' "
                            "warnings for the keys, fix or drop those shards, or raise the limit")

    def state_dict(self) -> dict[str, Any]:
        """This rank's position; save it on every rank and resume with ``merge_rank_states``."""
        if isinstance(self.stream, WdsStream):
            return {"format": "wds", "epoch": self.epoch, "completed_shards": sorted(self._completed)}
        ds = self.stream.dataset
        return {"format": "mds", "epoch": self.epoch,
                "streaming": ds.state_dict(self._rows * self.world_size, from_beginning=False)}

    @staticmethod
    def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One resume position from every rank's ``state_dict()`` (any saving world size).

        WebDataset: all ranks must skip the same shards, so the completed sets of the ranks in the
        earliest epoch are united (a rank already in the next epoch re-reads its share of it).
        MDS: streaming's position is global; rank 0's is used.
        """
        if states[0]["format"] == "mds":
            return states[0]
        epoch = min(s["epoch"] for s in states)
        done = sorted({i for s in states if s["epoch"] == epoch for i in s["completed_shards"]})
        return {"format": "wds", "epoch": epoch, "completed_shards": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; the next ``iter()`` continues that epoch."""
        if state.get("format") != self.format:
            raise DataError(f"loader state is for format {state.get('format')!r}, but data.format="
                            f"{self.format!r}; resume with the recipe the run was started with")
        self.epoch = int(state["epoch"])
        if self.format == "wds":
            self._completed = set(state["completed_shards"])
        else:
            self.stream.dataset.load_state_dict(state["streaming"])


def build_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 train: bool = True, shards: str | None = None) -> ShardLoader:
    """The loader for this rank.

    Args:
        cfg: the recipe's ``data`` section.
        rank, world_size: this process's place in the job (WDS splits by them; MDS reads torchrun's env).
        seed: shuffle / augmentation seed (combined with the epoch).
        train: random crop / flip as configured; ``False`` gives center crops and no flips.
        shards: override ``cfg.train_shards`` (e.g. with ``cfg.eval_shards``).
    """
    spec = shards if shards is not None else cfg.train_shards
    setting = "data.eval_shards" if shards is not None else "data.train_shards"
    decoder = SampleDecoder(cfg, train=train)
    common = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size, seed=seed,
                  channels_last=cfg.channels_last)
    if cfg.format == "wds":
        if cfg.remote:
            log.warning("data.remote=%r has no effect with data.format=wds; put URLs in %s",
                        cfg.remote, setting)
        urls = expand_shards(spec, setting)
        check_enough_shards(len(urls), world_size, cfg.num_workers)
        stream = WdsStream(urls, decoder, shuffle=cfg.shuffle and train,
                           shuffle_buffer=cfg.shuffle_buffer, **common)
    else:
        dataset = open_streaming(spec, cfg.remote, batch_size=cfg.batch_size, seed=seed,
                                 shuffle=cfg.shuffle and train, setting=setting)
        stream = MdsStream(dataset, decoder, **common)
    return ShardLoader(stream, cfg, world_size=world_size)
