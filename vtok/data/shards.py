"""Shard-by-shard reading of either format, as schema samples (for offline jobs, not training).

    source = ShardSource.open("data/in1k_mds")      # MDS dir with index.json, else WebDataset spec
    for sample in source.read(3): ...               # schema samples of shard 3, in stored order
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vtok.data.mds import mds_shard_entries, read_mds_shard
from vtok.data.schema import from_mds, from_wds
from vtok.data.webdataset import expand_shards, read_tar


@dataclass
class ShardSource:
    """The shards of one shard set: ``handles`` are tar URLs (wds) or index entries (mds)."""

    format: str
    spec: str
    handles: list[Any]

    @classmethod
    def open(cls, spec: str, setting: str = "--data") -> "ShardSource":
        """A directory with an MDS ``index.json`` is MDS; anything else is a WebDataset spec."""
        if Path(spec).is_dir() and (Path(spec) / "index.json").is_file():
            return cls("mds", spec, mds_shard_entries(spec))
        return cls("wds", spec, expand_shards(spec, setting))

    def __len__(self) -> int:
        return len(self.handles)

    def read(self, index: int) -> Iterator[dict[str, Any]]:
        """Schema samples (all fields present) of shard ``index``."""
        if self.format == "mds":
            return (from_mds(row) for row in read_mds_shard(self.spec, self.handles[index]))
        return (from_wds(members) for members in read_tar(self.handles[index]))


def read_shard_meta(shards: str, name: str, job: str, option: str, explicit: str = "") -> tuple[Path, dict[str, Any]]:
    """``(path, contents)`` of the metadata file ``name`` (e.g. codes.json) a precompute ``job`` wrote
    beside the shards ``shards`` (a shard spec: the first entry's directory), or ``explicit``.
    A missing file is a one-line RecipeError naming the job and the recipe ``option`` that overrides it."""
    from vtok.config import RecipeError

    if explicit:
        path = Path(explicit)
    else:
        from vtok.data.webdataset import REMOTE, write_shards_hint

        spec = shards.split("::")[0]
        first = Path(spec.split("{")[0])
        folder = first.parent if "{" in spec or first.is_file() or REMOTE.match(spec) else first
        if not folder.is_dir() and not REMOTE.match(spec):
            raise RecipeError(f"shards not found: {first} (from data.train_shards={shards!r}); "
                              f"{write_shards_hint(str(first), job=job)}")
        path = folder / name
    if not path.is_file():
        raise RecipeError(f"{path} not found: point data.train_shards at the output of `vtok precompute "
                          f"{job}`, or set {option}=PATH/{name}")
    return path, json.loads(path.read_text())
