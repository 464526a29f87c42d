#!/usr/bin/env python
"""Convert shards between WebDataset and MDS, keeping every key and schema field.

    python data_prep/convert.py --src shards/in1k_wds --dst shards/in1k_mds --to mds --workers 8

Source shard i becomes destination shard i (a WebDataset tar, or one MDS shard file). Resumable like
make_shards: finished destination shards are kept. The source format is detected: a directory with
an MDS ``index.json`` is MDS; anything else (directory of tars, brace pattern) is WebDataset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtok.data.shards import ShardSource
from vtok.data.transforms import DataError
from vtok.data.writers import write_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="source shards: MDS dir, tar dir or brace pattern")
    p.add_argument("--dst", type=Path, required=True, help="output directory")
    p.add_argument("--to", choices=("wds", "mds"), required=True, help="destination format")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        source = ShardSource.open(args.src, "--src")
    except DataError as e:
        sys.exit(f"convert: {e}")
    src_fmt = source.format
    if src_fmt == args.to:
        sys.exit(f"convert: {args.src} is already {src_fmt}; nothing to convert")
    summary = write_shards(args.dst, args.to, len(source), source.read, workers=args.workers,
                           progress=not args.no_progress, desc=f"{src_fmt} -> {args.to}")
    print(f"convert: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
