"""Human-readable summary of a shard set (``vtok data inspect``)."""
from __future__ import annotations

import json
from pathlib import Path

from vtok.data.transforms import DataError
from vtok.data.writers import MANIFEST


def _fields_of_first(path: Path, fmt: str) -> dict[str, str]:
    if fmt == "mds":
        from vtok.data.mds import mds_shard_entries, read_mds_shard

        entries = mds_shard_entries(path)
        row = next(read_mds_shard(path, entries[0]), {}) if entries else {}
    else:
        from vtok.data.webdataset import read_tar

        tar = path if path.is_file() else sorted(path.glob("*.tar"))[0]
        row = next(read_tar(str(tar)), {})
    return {k: type(v).__name__ + (f"{list(v.shape)}" if hasattr(v, "shape") else "")
            for k, v in row.items()}


def describe(path: str | Path) -> str:
    """Format, shard count, sample count and the first sample's fields of ``path``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give a shard directory or a .tar file")
    if path.is_file():
        from vtok.data.webdataset import read_tar

        n = sum(1 for _ in read_tar(str(path)))
        return f"{path}: wds tar, {n} samples, fields {_fields_of_first(path, 'wds')}"
    manifest = path / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        fmt, shards, total = info["format"], len(info["shards"]), info["num_samples"]
    elif (path / "index.json").is_file():
        index = json.loads((path / "index.json").read_text())
        fmt, shards, total = "mds", len(index["shards"]), sum(s["samples"] for s in index["shards"])
    elif any(path.glob("*.tar")):
        fmt, shards, total = "wds", len(list(path.glob("*.tar"))), "?"
    else:
        raise DataError(f"{path}: no manifest.json, index.json or .tar shards found")
    return f"{path}: {fmt}, {shards} shards, {total} samples, fields {_fields_of_first(path, fmt)}"
