"""Shared fixtures: tiny synthetic shard sets in both formats, built once per test session."""
from __future__ import annotations

import logging

import pytest
import torch

from vtok.config import load_recipe
from vtok.data.synthetic import write_synthetic

NUM_SAMPLES = 240
PER_SHARD = 20  # 12 shards: enough for 2 ranks x 2 workers


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, str]:
    """{'wds': dir, 'mds': dir} with NUM_SAMPLES 32px synthetic samples each."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for fmt in ("wds", "mds"):
        write_synthetic(root / fmt, fmt, NUM_SAMPLES, PER_SHARD, resolution=32, progress=False)
        out[fmt] = str(root / fmt)
    return out


@pytest.fixture(scope="session")
def exported(shards, tmp_path_factory):
    """A smoke FQGAN-Dual trained for 2 steps at 32 px and exported: (dir with config.json + weights)."""
    from vtok.train import Trainer

    tmp = tmp_path_factory.mktemp("tok")
    recipe = load_recipe(ROOT / "recipes" / "smoke" / "fqgan_dual.yaml", [
        f"data.train_shards={shards['wds']}", "data.resolution=32", "data.batch_size=8",
        "data.num_workers=0", f"run_dir={tmp / 'run'}", "train.steps=2", "log.progress=false",
        "log.tensorboard=false"])
    trainer = Trainer(recipe)
    trainer.fit()
    trainer.export(tmp / "export")
    return tmp / "export"


def data_recipe(fmt: str, path: str, *overrides: str):
    """A recipe reading ``path`` at 32 px with small batches."""
    return load_recipe(None, [f"data.format={fmt}", f"data.train_shards={path}", "data.resolution=32",
                              "data.batch_size=8", "data.num_workers=0", *overrides])


@pytest.fixture(autouse=True)
def _quiet_streaming():
    logging.getLogger("streaming").setLevel(logging.WARNING)


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
ENTRY = ROOT / "tests" / "train_entry.py"


def write_train_recipe(path, shards_dir: str, task: str, run_dir, steps: int = 6, **sections) -> str:
    """A tiny-task recipe on the 32 px MDS shards; ``sections`` adds YAML text per top-level key."""
    import textwrap

    optim = "    main:\n      lr: 1.0e-3\n      warmup_steps: 2\n" if task == "tiny-ae" else (
        "    generator:\n      lr: 1.0e-3\n    discriminator:\n      lr: 2.0e-4\n      start_step: 2\n")
    text = textwrap.dedent(f"""\
        name: {task}
        run_dir: {run_dir}
        data:
          format: mds
          train_shards: {shards_dir}
          fields: [image]
          resolution: 32
          batch_size: 8
          num_workers: 0
        train:
          task: {task}
          steps: {steps}
          log_every: 1
          optim:
        """) + optim + textwrap.dedent("""\
        ckpt:
          every_steps: 2
          keep_last: 10
        log:
          progress: false
          tensorboard: false
        """)
    for extra in sections.values():
        text += textwrap.dedent(extra)
    p = __import__("pathlib").Path(path)
    p.write_text(text)
    return str(p)


def vtok_cmd(*args, nproc: int = 1) -> list[str]:
    """Command running tests/train_entry.py (vtok with the test tasks) on ``nproc`` local ranks."""
    import sys

    if nproc == 1:
        return [sys.executable, str(ENTRY), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ENTRY), *map(str, args)]


def run_vtok(*args, nproc: int = 1, timeout: int = 300):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(vtok_cmd(*args, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_metrics(run_dir) -> list[dict]:
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models run faster on a shared machine, and an in-process
    run is then the same float sequence on any machine size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first (torchrun starts its workers in
    sessions of their own, so a process group kill misses them)."""
    import os

    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except FileNotFoundError:
            kids = []
        out += kids
        todo += kids
    return out


def kill9(pids, group: bool = False) -> None:
    """SIGKILL each of ``pids`` (or, ``group``: each one's process group); those already gone are skipped."""
    import os
    import signal

    for pid in pids:
        try:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
