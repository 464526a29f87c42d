#!/usr/bin/env python
"""Convert shards between WebDataset and MDS, keeping every key and schema field.

    python data_prep/convert.py --src shards/in1k_wds --dst shards/in1k_mds --to mds --workers 8

Source shard i becomes destination shard i (a WebDataset tar, or one MDS shard file). Resumable like
make_shards: finished destination shards are kept. The source format is detected: a directory with
an MDS ``index.json`` is MDS; anything else (directory of tars, brace pattern) is WebDataset.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from vtok.data.mds import mds_shard_entries, read_mds_shard
from vtok.data.schema import from_mds, from_wds
from vtok.data.transforms import DataError
from vtok.data.webdataset import expand_shards, read_tar
from vtok.data.writers import write_shards


def source_format(src: str) -> str:
    """'mds' for a directory with index.json (and no tars), else 'wds'."""
    path = Path(src)
    return "mds" if path.is_dir() and (path / "index.json").is_file() else "wds"


def wds_shard(index: int, *, urls: list[str]):
    return (from_wds(members) for members in read_tar(urls[index]))


def mds_shard(index: int, *, root: str, entries: list[dict]):
    return (from_mds(row) for row in read_mds_shard(root, entries[index]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="source shards: MDS dir, tar dir or brace pattern")
    p.add_argument("--dst", type=Path, required=True, help="output directory")
    p.add_argument("--to", choices=("wds", "mds"), required=True, help="destination format")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        src_fmt = source_format(args.src)
        if src_fmt == args.to:
            sys.exit(f"convert: {args.src} is already {src_fmt}; nothing to convert")
        if src_fmt == "wds":
            urls = expand_shards(args.src, "--src")
            produce, count = functools.partial(wds_shard, urls=urls), len(urls)
        else:
            entries = mds_shard_entries(args.src)
            produce, count = functools.partial(mds_shard, root=args.src, entries=entries), len(entries)
    except DataError as e:
        sys.exit(f"convert: {e}")
    summary = write_shards(args.dst, args.to, count, produce, workers=args.workers,
                           progress=not args.no_progress, desc=f"{src_fmt} -> {args.to}")
    print(f"convert: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
