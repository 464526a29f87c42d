"""Shared fixtures: tiny synthetic shard sets in both formats, built once per test session."""
from __future__ import annotations

import logging

import pytest

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


def data_recipe(fmt: str, path: str, *overrides: str):
    """A recipe reading ``path`` at 32 px with small batches."""
    return load_recipe(None, [f"data.format={fmt}", f"data.train_shards={path}", "data.resolution=32",
                              "data.batch_size=8", "data.num_workers=0", *overrides])


@pytest.fixture(autouse=True)
def _quiet_streaming():
    logging.getLogger("streaming").setLevel(logging.WARNING)
