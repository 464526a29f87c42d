"""The one data API: ``build_loader(cfg, ...)`` -> a resumable iterator of batches for this rank.

    loader = build_loader(recipe.data, rank=0, world_size=1, seed=recipe.seed)
    for batch in loader:            # one epoch; batch["image"]: (B, 3, H, W) uint8
        batch = normalize_batch(batch)  # image -> float in [-1, 1] (the trainer: on the device)
        ...
    state = loader.state_dict()     # save with the checkpoint; load_state_dict() resumes

Both backends yield the same batch dict (see ``transforms.COLLATE``). Resume is exact for both: MDS
through streaming's own state, WebDataset through per-reader positions (see ``vtok.data.webdataset``:
the same batches with the same ranks x workers, every sample exactly once with another layout).
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
from vtok.data.webdataset import WdsStream, assign_shards, check_enough_shards, expand_shards

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
        self._rows = 0  # mds: raw rows consumed by this rank this epoch, in this process
        self._mds_resume: dict[str, Any] | None = None
        self._new_wds_epoch()
        workers = cfg.num_workers
        # Starting an epoch draws the workers' base seed; from its own generator, not the global RNG,
        # which a resume restores and this draw would shift (vtok's data randomness is keyed by seed,
        # epoch and sample, not by the workers' torch seeds)
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory,
            prefetch_factor=cfg.prefetch_factor if workers else None, generator=torch.Generator().manual_seed(0))

    @property
    def format(self) -> str:
        return "mds" if isinstance(self.stream, MdsStream) else "wds"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches for this rank (resumed mid-epoch after ``load_state_dict``)."""
        self.stream.epoch = self.epoch
        if isinstance(self.stream, WdsStream):
            self.stream.base, self.stream.partial = frozenset(self._base), dict(self._partial)
            self.stream.start, self.stream.lead = dict(self._positions), self._next_worker
        self._worker_meta = {}
        batches = iter(self.loader)
        while True:
            t0 = time.perf_counter()  # time spent waiting for data, not in the consumer
            item = next(batches, None)
            self.stats.seconds += time.perf_counter() - t0
            if item is None:
                break
            meta: Meta = item.pop(META)
            self._account(meta)
            if len(item):  # meta-only items carry counters, not samples
                self.stats.batches += 1
                self.stats.samples += len(item["__key__"])
                yield item
        self._check_bad(final=True)
        self.epoch += 1
        self._rows, self._mds_resume = 0, None
        self._new_wds_epoch()

    @property
    def _workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def _new_wds_epoch(self) -> None:
        """WebDataset position at the start of an epoch: nothing dealt out differently, nothing read."""
        self._base: frozenset[int] = frozenset()  # shards left out when dealing this epoch
        self._partial: dict[int, int] = {}  # shard -> events delivered before this epoch's deal
        self._positions: dict[int, tuple[int, int]] = {}  # global reader -> (shards done, offset)
        self._next_worker = 0  # local worker whose item the DataLoader delivers next

    def _account(self, meta: Meta) -> None:
        if meta.error:
            raise DataError(meta.error)
        self._worker_meta[meta.worker] = meta
        self._rows += meta.rows
        if isinstance(self.stream, WdsStream):
            self._positions[meta.worker] = (meta.shards_done, meta.offset)
            self._next_worker = (meta.worker % self._workers + 1) % self._workers
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
            return self._wds_state()
        ds = self.stream.dataset
        return {"format": "mds", "epoch": self.epoch,
                "streaming": ds.state_dict(self._rows * self.world_size, from_beginning=False)}

    @staticmethod
    def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One resume position from every rank's ``state_dict()`` (any saving world size).

        WebDataset: the ranks' states side by side; each rank takes its own when the layout is the
        same (exact resume), else the unfinished work is re-dealt (see ``load_state_dict``).
        MDS: streaming's position is global; rank 0's is used.
        """
        if states[0]["format"] == "mds":
            return states[0]
        return {"format": "wds", "ranks": [s for st in states for s in st.get("ranks", [st])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (one rank's, or merged); the next ``iter()`` continues that epoch.

        WebDataset, same ranks x workers: this rank continues at its readers' positions and yields
        exactly the batches of an uninterrupted run. Another layout: all ranks restart in the earliest
        saved epoch, the unfinished shards are dealt over the new readers and each skips the samples
        already delivered (exactly once; a rank that was already in the next epoch restarts it).
        """
        if state.get("format") != self.format:
            raise DataError(f"loader state is for format {state.get('format')!r}, but data.format="
                            f"{self.format!r}; resume with the recipe the run was started with")
        if self.format == "mds":
            self.epoch = int(state["epoch"])
            self.stream.dataset.load_state_dict(state["streaming"])
            return
        ranks = state.get("ranks", [state])
        self._new_wds_epoch()
        for s in ranks:
            self._check_same_data(s)
        mine = [s for s in ranks if s.get("rank") == self.stream.rank]
        if mine and all(s.get("layout") == [self.world_size, self._workers] for s in ranks) \
                and sorted(s["rank"] for s in ranks) == list(range(self.world_size)):
            s = mine[0]
            self.epoch, self._base = int(s["epoch"]), frozenset(s["base"])
            self._partial = {int(k): int(v) for k, v in s["partial"]}
            self._positions = {self.stream.rank * self._workers + w: (int(d), int(o))
                               for w, (d, o) in enumerate(s["positions"])}
            self._next_worker = int(s["next_worker"])
            return
        self.epoch = min(int(s["epoch"]) for s in ranks)
        self._base, self._partial = self._unfinished(ranks)

    def _wds_state(self) -> dict[str, Any]:
        nw, rank = self._workers, self.stream.rank
        return {"format": "wds", "epoch": self.epoch, "rank": rank, "layout": [self.world_size, nw],
                "num_shards": len(self.stream.urls), "buffer": self.stream.buffer_size,
                "base": sorted(self._base), "partial": [[k, v] for k, v in sorted(self._partial.items())],
                "positions": [list(self._positions.get(rank * nw + w, (0, 0))) for w in range(nw)],
                "next_worker": self._next_worker}

    def _check_same_data(self, s: dict[str, Any]) -> None:
        if "positions" not in s:
            return
        now = (len(self.stream.urls), self.stream.buffer_size)
        if (s["num_shards"], s["buffer"]) != now:
            raise DataError(f"loader state is for {s['num_shards']} shards with a shuffle buffer of "
                            f"{s['buffer']}, but this run has {now[0]} and {now[1]}; resume with the "
                            "shards and data.shuffle / data.shuffle_buffer the run was started with")

    def _unfinished(self, ranks: list[dict[str, Any]]) -> tuple[frozenset[int], dict[int, int]]:
        """(shards finished, shard -> events delivered) in the earliest saved epoch, from the ranks'
        states. A rank already in a later epoch finished its shards; a rank missing from the states
        is taken as not started."""
        n, st = len(self.stream.urls), self.stream
        lagging = [s for s in ranks if int(s["epoch"]) == self.epoch]
        if any("positions" not in s for s in ranks):  # states from before per-reader positions
            return frozenset(i for s in lagging for i in s["completed_shards"]), {}
        (world, nw), base = lagging[0]["layout"], lagging[0]["base"]
        present = {s["rank"] for s in ranks}
        lagging += [{"rank": r, "base": base, "partial": lagging[0]["partial"], "positions": [[0, 0]] * nw}
                    for r in range(world) if r not in present]
        left: set[int] = set()
        partial: dict[int, int] = {}
        for s in lagging:
            earlier = dict(s["partial"])
            for w, (done, offset) in enumerate(s["positions"]):
                todo = assign_shards(n, self.epoch, st.seed, st.shuffle, s["rank"] * nw + w,
                                     world * nw, frozenset(s["base"]))[done:]
                left.update(todo)
                for shard in todo:
                    partial[shard] = max(earlier.get(shard, 0), offset if shard == todo[0] else 0)
        return frozenset(range(n)) - left, {k: v for k, v in partial.items() if v}


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
