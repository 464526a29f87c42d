"""Checkpoints as a component: atomic step directories, a ``latest`` pointer, keep-last-K, and
integrity checks.

    <dir>/step_000123/         complete checkpoint (renamed from step_000123.tmp when all is written)
        meta.json              step, world size, strategy, time, git commit, and the size + sha256 of
                               every other file under the step dir (rank 0, written last, atomically)
        rank00000.pt ...       per-rank trainer state: data position, RNG (torch.save, tensors only)
        model-*/optim-*/ema-*  or dcp/ or <deepspeed tags>/: whatever the strategy writes
    <dir>/latest               name of the newest complete checkpoint (written atomically)

A crash at any point leaves the previous checkpoints and ``latest`` intact; a leftover ``*.tmp``
directory is never read and is removed by the next save. Before a resume, rank 0 checks the
checkpoint against its meta.json; a truncated, altered, missing or added file makes it fall back to
the newest intact checkpoint (one warning line each). A directory without vtok's hashes is refused
unless ``ckpt.trust=true``: DCP and DeepSpeed checkpoints unpickle their metadata.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtok.data.writers import atomic_write_bytes
from vtok.files import respect_umask
from vtok.parallel.dist import DistInfo, barrier, broadcast_object

log = logging.getLogger("vtok.train")

LATEST = "latest"
META = "meta.json"
FORMAT = "vtok-checkpoint"  # meta.json "format": written by vtok, with file hashes
HASH_CHUNK = 1 << 22
TRUST_HINT = ("resume only from checkpoints you or vtok wrote (FSDP2/DeepSpeed checkpoints unpickle "
              "their metadata); set ckpt.trust=true to load it anyway")


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(root: Path, names: list[str]) -> list[str]:
    """sha256 of each file, several at a time (hashlib releases the GIL on large reads)."""
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(names), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda n: _sha256(root / n), names))


def _files_under(root: Path) -> list[str]:
    """Every file under the step dir (recursively: DCP and DeepSpeed write subdirectories) except
    meta.json, as sorted POSIX paths relative to ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != META)


def file_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under ``root`` but meta.json."""
    names = _files_under(root)
    digests = _hash_all(root, names)
    return {n: {"size": (root / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_files(path: Path, files: Any) -> str:
    """'' when the files under ``path`` are exactly those of the manifest ``files``, with the same
    sizes and hashes; else one line naming the first bad file and what is wrong with it."""
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        return f"{path / META}: malformed file list"
    present = set(_files_under(path))
    missing, added = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        return f"{path / missing[0]}: missing (listed in {META})"
    if added:
        return f"{path / added[0]}: not listed in {META} (added after the save)"
    names = sorted(files)
    for name in names:
        size = (path / name).stat().st_size
        if size != files[name]["size"]:
            return f"{path / name}: {size} bytes, {files[name]['size']} when saved (truncated or overwritten)"
    for name, digest in zip(names, _hash_all(path, names)):
        if digest != files[name]["sha256"]:
            return f"{path / name}: sha256 differs from {META} (corrupt or modified after the save)"
    return ""


def verify_checkpoint(path: Path, trust: bool = False) -> str:
    """'' when ``path`` is an intact vtok checkpoint, else one line naming the file and the problem.

    With ``trust``, a meta.json without vtok's file hashes (another writer, an older vtok) is
    accepted unchecked; one with hashes is always checked."""
    meta_file = path / META
    if not meta_file.is_file():
        return f"{meta_file}: missing (an incomplete or foreign checkpoint)"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{meta_file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) \
            or not isinstance(meta.get("world_size"), int):
        return f"{meta_file}: not a vtok checkpoint meta (no integer 'step' / 'world_size')"
    if meta.get("format") != FORMAT or "files" not in meta:
        return "" if trust else f"{meta_file}: no file hashes: not written by vtok; {TRUST_HINT}"
    if meta.get("digest") != _meta_digest(meta):
        return f"{meta_file}: its digest does not match its contents (edited or corrupt)"
    return _check_files(path, meta["files"])


def _size(size: int) -> str:
    """Bytes for a person: KiB below a MiB, MiB below a GiB, else GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.1f} KiB"


def _training_error(message: str) -> Exception:
    from vtok.train.trainer import TrainingError  # trainer imports this module

    return TrainingError(message)


class CheckpointManager:
    """Save and find checkpoints under ``directory``; ``strategy`` writes the model/optimizer part.
    ``trust``: accept checkpoints without vtok's file hashes (``ckpt.trust``)."""

    def __init__(self, directory: str | Path, keep_last: int, info: DistInfo, trust: bool = False):
        self.dir, self.keep_last, self.info, self.trust = Path(directory), keep_last, info, trust

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
        try:
            strategy.save(tmp, extra)
            torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank{self.info.rank:05d}.pt")
        except (OSError, RuntimeError) as e:
            raise self._write_failure(step, tmp, e) from e
        barrier()
        if self.info.is_main:
            respect_umask(tmp)  # safetensors writes 0600; colleagues must be able to read checkpoints
            meta = {**meta, "format": FORMAT, "step": step, "world_size": self.info.world_size,
                    "saved_at": time.time(), "files": file_manifest(tmp)}
            meta["digest"] = _meta_digest(meta)
            try:
                atomic_write_bytes(tmp / META, json.dumps(meta, indent=1).encode())  # last: marks it complete
            except OSError as e:
                raise self._write_failure(step, tmp, e) from e
            if final.exists():  # re-saving the same step (e.g. preemption right after a save)
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_bytes(self.dir / LATEST, final.name.encode())
            self._prune()
            log.info("saved checkpoint %s (%.1fs)", final, time.perf_counter() - t0)
        barrier()
        return final

    def _write_failure(self, step: int, tmp: Path, error: Exception) -> Exception:
        """A checkpoint write that failed: on a full disk the partial ``tmp`` is removed (the previous
        checkpoints are untouched) and the error is one line naming the directory, the free space and
        the space a checkpoint needs (the newest complete one's size, else what was written before the
        failure); any other error is returned unchanged."""
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
        previous = self.latest()
        size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 0
        free = shutil.disk_usage(self.dir).free
        full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or free < max(size, written)
        if not full:
            return error
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(self.dir).free  # with the partial checkpoint removed
        need = f"{_size(size)} (the size of {previous.name})" if previous else f"more than the {_size(written)} written"
        keep = f"the previous checkpoint {previous} is intact; " if previous else ""
        return _training_error(f"checkpoint step {step} did not fit in {self.dir}: the disk is full ({_size(free)} free, "
                               f"a checkpoint needs {need}); {keep}free space there or set ckpt.dir to a larger "
                               "disk, then resume")

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir() and (p / META).is_file())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the ``latest`` pointer, or the newest step dir with meta
        (not verified; ``resolve_resume`` verifies)."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / META).is_file():
                return path
        done = sorted(p for p in self.dir.glob("step_*") if not p.name.endswith(".tmp") and (p / META).is_file())
        return done[-1] if done else None

    def candidates(self) -> list[Path]:
        """Step dirs to try, newest first: the ``latest`` pointer's, then the older ones. Dirs newer
        than the pointer (an abandoned timeline after an explicit resume) are not considered."""
        dirs = sorted((p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                      reverse=True)
        try:
            name = (self.dir / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return dirs
        target = self.dir / name
        if target not in dirs:
            return dirs
        return [target] + [p for p in dirs if p.name < target.name]

    def newest_intact(self) -> Path | None:
        """The newest checkpoint that passes ``verify_checkpoint``; warns one line per skipped one.
        None when there is none at all; TrainingError naming the bad file when none is intact."""
        problems: list[str] = []
        for path in self.candidates():
            problem = verify_checkpoint(path, self.trust)
            if not problem:
                for skipped in problems:
                    log.warning("broken checkpoint, resuming from %s instead: %s", path.name, skipped)
                return path
            problems.append(problem)
        if not problems:
            return None
        more = f" (and {len(problems) - 1} older checkpoint(s) are broken too)" if len(problems) > 1 else ""
        raise _training_error(f"no intact checkpoint to resume from: {problems[0]}{more}; move the broken "
                              f"step_* dirs out of {self.dir} to start from scratch")

    def load(self, path: Path, strategy, extra: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, list[dict]]:
        """Load ``path`` into ``strategy`` and ``extra``; returns (meta, per-rank states of the saving
        run). Restores this rank's RNG when the world size is unchanged."""
        meta = json.loads((path / META).read_text())
        rank_files = sorted(path.glob("rank*.pt"))
        if len(rank_files) != meta["world_size"]:
            raise _training_error(f"{path}: {len(rank_files)} rank*.pt files for a run of "
                                  f"{meta['world_size']} ranks; resume from another checkpoint")
        strategy.load(path, extra)
        states = [torch.load(p, weights_only=True) for p in rank_files]
        if meta["world_size"] == self.info.world_size:
            set_rng_state(states[self.info.rank]["rng"])
        else:
            log.warning("checkpoint was saved at %d ranks, resuming at %d: RNG streams restart "
                        "from the seed", meta["world_size"], self.info.world_size)
        return meta, states


def _pick(manager: CheckpointManager, explicit: str) -> Path | None:
    if not explicit:
        return manager.newest_intact()
    path = Path(explicit)
    if not (path / META).is_file():
        raise FileNotFoundError(f"--resume {explicit}: not a complete checkpoint (no {META}); "
                                f"pick a step_* directory under {manager.dir}")
    problem = verify_checkpoint(path, manager.trust)
    if problem:
        raise _training_error(f"cannot resume from {explicit}: {problem}")
    return path


def resolve_resume(manager: CheckpointManager, explicit: str) -> Path | None:
    """``explicit`` (a checkpoint dir) if given, else the newest intact one; verified against its
    meta.json on rank 0 and the same on all ranks. Raises FileNotFoundError (no meta.json) or
    TrainingError (corrupt / untrusted), one line, on every rank."""
    from vtok.train.trainer import TrainingError

    outcome: tuple[str, str] | None = None
    if manager.info.is_main:
        try:
            found = _pick(manager, explicit)
            outcome = ("path", str(found) if found else "")
        except FileNotFoundError as e:
            outcome = ("missing", str(e))
        except TrainingError as e:
            outcome = ("error", str(e))
    kind, value = broadcast_object(outcome)
    if kind == "missing":
        raise FileNotFoundError(value)
    if kind == "error":
        raise TrainingError(value)
    return Path(value) if value else None
