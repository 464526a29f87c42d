"""Checkpoints as a component: atomic step directories, a ``latest`` pointer, keep-last-K.

    <dir>/step_000123/         complete checkpoint (renamed from step_000123.tmp when all is written)
        meta.json              step, world size, strategy, time, git commit (rank 0)
        rank00000.pt ...       per-rank trainer state: data position, RNG (torch.save, tensors only)
        model-*/optim-*/ema-*  or dcp/ or <deepspeed tags>/: whatever the strategy writes
    <dir>/latest               name of the newest complete checkpoint (written atomically)

A crash at any point leaves the previous checkpoints and ``latest`` intact; a leftover ``*.tmp``
directory is never read and is removed by the next save.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtok.data.writers import atomic_write_bytes
from vtok.parallel.dist import DistInfo, barrier, broadcast_object

log = logging.getLogger("vtok.train")

LATEST = "latest"
META = "meta.json"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save and find checkpoints under ``directory``; ``strategy`` writes the model/optimizer part."""

    def __init__(self, directory: str | Path, keep_last: int, info: DistInfo):
        self.dir, self.keep_last, self.info = Path(directory), keep_last, info

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:09d}"

    def save(self, step: int, strategy, extra: dict[str, dict[str, torch.Tensor]],
             rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (collective: call on every rank)."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob("*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir()
        barrier()
        t0 = time.perf_counter()
        strategy.save(tmp, extra)
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank{self.info.rank:05d}.pt")
        barrier()
        if self.info.is_main:
            meta = {**meta, "step": step, "world_size": self.info.world_size, "saved_at": time.time()}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():  # re-saving the same step (e.g. preemption right after a save)
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_bytes(self.dir / LATEST, final.name.encode())
            self._prune()
            log.info("saved checkpoint %s (%.1fs)", final, time.perf_counter() - t0)
        barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and (p / META).is_file())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the ``latest`` pointer, or the newest step dir with meta."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / META).is_file():
                return path
        done = sorted(p for p in self.dir.glob("step_*") if not p.name.endswith(".tmp") and (p / META).is_file())
        return done[-1] if done else None

    def load(self, path: Path, strategy, extra: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, list[dict]]:
        """Load ``path`` into ``strategy`` and ``extra``; returns (meta, per-rank states of the saving
        run). Restores this rank's RNG when the world size is unchanged."""
        meta = json.loads((path / META).read_text())
        strategy.load(path, extra)
        states = [torch.load(p, weights_only=True) for p in sorted(path.glob("rank*.pt"))]
        if meta["world_size"] == self.info.world_size:
            set_rng_state(states[self.info.rank]["rng"])
        else:
            log.warning("checkpoint was saved at %d ranks, resuming at %d: RNG streams restart "
                        "from the seed", meta["world_size"], self.info.world_size)
        return meta, states


def resolve_resume(manager: CheckpointManager, explicit: str) -> Path | None:
    """``explicit`` (a checkpoint dir) if given, else the newest complete one; the same on all ranks."""
    if explicit:
        path = Path(explicit)
        if not (path / META).is_file():
            raise FileNotFoundError(f"--resume {explicit}: not a complete checkpoint (no {META}); "
                                    f"pick a step_* directory under {manager.dir}")
        return path
    found = manager.latest() if manager.info.is_main else None
    found = broadcast_object(str(found) if found else "")
    return Path(found) if found else None
