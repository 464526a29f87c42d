#!/usr/bin/env python
"""Pack images into WebDataset or MDS shards of N samples.

Inputs (one of):
  --images DIR   an image folder; class sub-folders (DIR/<class>/*.jpg) give ``cls`` by sorted name
                 and a ``classes.json`` beside the shards; a flat folder gives no ``cls``.
  --list FILE    a CSV (header: path[,caption][,cls]) or JSONL ({"path": ..., "caption": ..., "cls": ...});
                 relative paths are taken from FILE's directory.

    python data_prep/make_shards.py --images ~/imagenet/train --out shards/in1k --format wds \\
        --samples-per-shard 1000 --workers 16 --min-size 256

Resumable: finished shards are kept, an unfinished one (``*.tmp``) is rewritten, so rerunning the
same command after a crash or kill ends with the same shards as one uninterrupted run. Unreadable
images and images smaller than --min-size are skipped and listed in the summary.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
from pathlib import Path

from PIL import Image

from vtok.data.schema import image_ext
from vtok.data.writers import BadItem, atomic_write_bytes, write_shards

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def list_folder(root: Path) -> tuple[list[dict], list[str]]:
    """Items of an image folder, sorted; class sub-folders give ``cls``."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = []
    if classes:
        for cls, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    items.append({"path": str(path), "cls": cls})
    else:
        items = [{"path": str(p)} for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return items, classes


def list_file(path: Path) -> list[dict]:
    """Items of a CSV (with a header row) or JSONL list; relative paths resolve from its folder."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    items = []
    for i, row in enumerate(rows):
        if "path" not in row:
            sys.exit(f"make_shards: {path} row {i + 1} has no 'path' column; columns: path[,caption][,cls]")
        item = {"path": str((path.parent / row["path"]) if not Path(row["path"]).is_absolute() else row["path"])}
        if row.get("caption") not in (None, ""):
            item["caption"] = str(row["caption"])
        if row.get("cls") not in (None, ""):
            item["cls"] = int(row["cls"])
        items.append(item)
    return items


def load_image(path: str, min_size: int) -> bytes:
    """Validated image bytes (JPEG/PNG/WebP kept as they are; other formats re-encoded to PNG)."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode: catches truncated files that verify() lets through
        if min(img.size) < min_size:
            raise ValueError(f"{img.size[0]}x{img.size[1]} is smaller than --min-size {min_size}")
        try:
            image_ext(data)
            return data
        except ValueError:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()


def shard_items(index: int, *, items: list[dict], per_shard: int, min_size: int):
    """Samples (or BadItems) of shard ``index``; keys are global item numbers."""
    for n in range(index * per_shard, min((index + 1) * per_shard, len(items))):
        item = items[n]
        try:
            sample = {"__key__": f"{n:09d}", "image": load_image(item["path"], min_size)}
        except Exception as e:  # unreadable or too small: skip and report
            yield BadItem(item["path"], f"{type(e).__name__}: {e}")
            continue
        for name in ("cls", "caption"):
            if name in item:
                sample[name] = item[name]
        yield sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="image folder (optionally with class sub-folders)")
    src.add_argument("--list", type=Path, help="CSV or JSONL of path[,caption][,cls]")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--format", choices=("wds", "mds"), default="wds")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--min-size", type=int, default=0, help="skip images whose short side is smaller")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    source = args.images or args.list
    if not source.exists():
        sys.exit(f"make_shards: input not found: {source}")
    if args.images:
        items, classes = list_folder(args.images)
    else:
        items, classes = list_file(args.list), []
    if not items:
        sys.exit(f"make_shards: no images found in {source} (looked for {sorted(IMAGE_SUFFIXES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    if classes:
        atomic_write_bytes(args.out / "classes.json", json.dumps(classes, indent=1).encode())
    produce = functools.partial(shard_items, items=items, per_shard=args.samples_per_shard,
                                min_size=args.min_size)
    num_shards = math.ceil(len(items) / args.samples_per_shard)
    summary = write_shards(args.out, args.format, num_shards, produce, workers=args.workers,
                           progress=not args.no_progress, desc=f"make_shards -> {args.format}")
    print(f"make_shards: {len(items)} inputs, {summary}")
    for bad in summary.bad[:20]:
        print(f"  bad: {bad.name}: {bad.reason}")
    if len(summary.bad) > 20:
        print(f"  ... and {len(summary.bad) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
