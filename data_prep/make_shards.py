#!/usr/bin/env python
"""Pack images into WebDataset or MDS shards of N samples.

Inputs (one of):
  --images DIR   an image folder; class sub-folders (DIR/<class>/*.jpg) give ``cls`` by sorted name
                 and a ``classes.json`` beside the shards; a flat folder gives no ``cls``.
  --list FILE    a CSV (header: path[,caption][,cls][,key]) or JSONL ({"path": ..., "caption": ...,
                 "cls": ..., "key": ...}); relative paths are taken from FILE's directory; ``key`` (if
                 given) is the sample key, else keys are item numbers. A path or key listed twice is
                 a bad input: the later row is skipped and reported.

    python data_prep/make_shards.py --images ~/imagenet/train --out shards/in1k --format wds \\
        --samples-per-shard 1000 --workers 16 --min-size 256

Resumable: finished shards are kept, an unfinished one (``*.tmp``) is rewritten, so rerunning the
same command after a crash or kill ends with the same shards as one uninterrupted run. Unreadable
images, images smaller than --min-size and duplicate list rows are skipped, listed in the summary and
in ``OUT/bad_inputs.jsonl`` (kept across reruns: each finished shard's list is saved with it). Every
sample's ``json`` records its source ``path``. 16-bit images are scaled to 8 bits, not clipped.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from vtok.data.schema import SchemaError, check_sample, image_ext
from vtok.data.transforms import HIGH_BIT_MODES, to_8bit
from vtok.data.writers import BadItem, WriteSummary, atomic_write_bytes, shard_name, write_shards

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
BAD_LIST = "bad_inputs.jsonl"  # all bad inputs of the dataset, rewritten at the end of each run
STATE_DIR = ".make_shards"  # per-shard bad-input lists, saved just before each shard is finished
_BYTESIO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class BadInput(ValueError):
    """An input that is readable but unusable; its message is the whole reason."""


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


def _row_key(value: Any) -> str:
    """A list row's ``key`` as a sample key; BadInput if it cannot be one."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadInput(f"key {value!r} is not a string")
    try:
        check_sample({"__key__": str(value)})
    except SchemaError as e:
        raise BadInput(str(e).replace("sample key", "key")) from None
    return str(value)


def list_file(path: Path) -> tuple[list[dict], list[BadItem]]:
    """Items of a CSV (with a header row) or JSONL list, and its bad rows (duplicates, bad keys).

    Relative paths resolve from the list's folder. The first row with a given path or key is kept;
    later ones are bad inputs, named by their path and row.
    """
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    items: list[dict] = []
    bad: list[BadItem] = []
    by_path: dict[str, int] = {}  # normalised path -> row number of its first use
    by_key: dict[str, tuple[int, str]] = {}  # key -> (row number, path) of its first use
    for i, row in enumerate(rows, 1):
        if "path" not in row:
            sys.exit(f"make_shards: {path} row {i} has no 'path' column; columns: path[,caption][,cls][,key]")
        src = row["path"] if Path(row["path"]).is_absolute() else str(path.parent / row["path"])
        where = f"{path.name} row {i}"
        norm = os.path.normpath(src)
        if norm in by_path:
            bad.append(BadItem(src, f"{src}: duplicate: {where} lists the same file as row "
                                    f"{by_path[norm]}; skipped"))
            continue
        item = {"path": src}
        if row.get("key") not in (None, ""):
            try:
                item["key"] = _row_key(row["key"])
            except BadInput as e:
                bad.append(BadItem(src, f"{src}: {where}: {e}; skipped"))
                continue
            if item["key"] in by_key:
                first_row, first_path = by_key[item["key"]]
                bad.append(BadItem(src, f"{src}: duplicate key {item['key']!r}: {where} repeats the "
                                        f"key of row {first_row} ({first_path}); skipped"))
                continue
            by_key[item["key"]] = (i, src)
        by_path[norm] = i
        if row.get("caption") not in (None, ""):
            item["caption"] = str(row["caption"])
        if row.get("cls") not in (None, ""):
            item["cls"] = int(row["cls"])
        items.append(item)
    return items, bad


def assign_keys(items: list[dict]) -> tuple[list[dict], list[BadItem]]:
    """Give keyless items their item number as key; one that collides with a given key is bad."""
    given = {item["key"] for item in items if "key" in item}
    kept, bad = [], []
    for n, item in enumerate(items):
        if "key" not in item:
            key = f"{n:09d}"
            if key in given:
                bad.append(BadItem(item["path"], f"{item['path']}: duplicate key {key!r}: its item "
                                                 "number is another row's key; skipped"))
                continue
            item = {**item, "key": key}
        kept.append(item)
    return kept, bad


def load_image(path: str, min_size: int) -> bytes:
    """Validated image bytes: 8-bit JPEG/PNG/WebP kept as they are; anything else (other formats,
    16-bit PNG) re-encoded to an 8-bit PNG, with 16-bit values scaled rather than clipped."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode: catches truncated files that verify() lets through
        if min(img.size) < min_size:
            raise BadInput(f"{img.size[0]}x{img.size[1]} is smaller than --min-size {min_size}")
        if img.mode not in HIGH_BIT_MODES:
            try:
                image_ext(data)
                return data
            except ValueError:
                pass
        img8 = to_8bit(img)
        buf = io.BytesIO()
        (img8 if img8.mode in ("L", "RGB") else img8.convert("RGB")).save(buf, format="PNG")
        return buf.getvalue()


def bad_reason(path: str, e: Exception) -> str:
    """One-line reason naming ``path`` (PIL's messages name an anonymous BytesIO instead)."""
    if isinstance(e, BadInput):
        return f"{path}: {e}"
    msg = _BYTESIO.sub("", str(e)).replace("\n", " ")
    return f"{path}: {type(e).__name__}: {msg}"


def _bad_file(out: Path, index: int) -> Path:
    return out / STATE_DIR / f"bad-{index:06d}.jsonl"


def _save_bad(path: Path, bad: list[BadItem]) -> None:
    if bad:
        lines = "".join(json.dumps({"path": b.name, "reason": b.reason}) + "\n" for b in bad)
        atomic_write_bytes(path, lines.encode())
    elif path.exists():
        path.unlink()


def _read_bad(path: Path) -> list[BadItem]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [BadItem(r["path"], r["reason"]) for r in rows]


def shard_items(index: int, *, items: list[dict], per_shard: int, min_size: int,
                out: Path) -> Iterator[dict | BadItem]:
    """Samples (or BadItems) of shard ``index``; its bad inputs are saved before the shard is done."""
    bad = []
    for item in items[index * per_shard:(index + 1) * per_shard]:
        try:
            sample = {"__key__": item["key"], "image": load_image(item["path"], min_size)}
        except Exception as e:  # unreadable or too small: skip and report
            bad.append(BadItem(item["path"], bad_reason(item["path"], e)))
            yield bad[-1]
            continue
        for name in ("cls", "caption"):
            if name in item:
                sample[name] = item[name]
        sample["json"] = {"path": item["path"]}
        yield sample
    _save_bad(_bad_file(out, index), bad)  # runs before write_shard renames the finished shard


def all_bad(out: Path, fmt: str, num_shards: int, listing: list[BadItem]) -> list[BadItem]:
    """The listing's bad rows plus those saved with every finished shard (this run's and earlier)."""
    bad = list(listing)
    for i in range(num_shards):
        if (out / shard_name(fmt, i)).exists():
            bad.extend(_read_bad(_bad_file(out, i)))
    _save_bad(out / BAD_LIST, bad)
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="image folder (optionally with class sub-folders)")
    src.add_argument("--list", type=Path, help="CSV or JSONL of path[,caption][,cls][,key]")
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
    listing_bad: list[BadItem] = []  # duplicate or unusable list rows
    if args.images:
        items, classes = list_folder(args.images)
    else:
        (items, listing_bad), classes = list_file(args.list), []
    items, collisions = assign_keys(items)
    listing_bad += collisions
    if not items:
        sys.exit(f"make_shards: no images found in {source} (looked for {sorted(IMAGE_SUFFIXES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / STATE_DIR).mkdir(exist_ok=True)
    if classes:
        atomic_write_bytes(args.out / "classes.json", json.dumps(classes, indent=1).encode())
    produce = functools.partial(shard_items, items=items, per_shard=args.samples_per_shard,
                                min_size=args.min_size, out=args.out)
    num_shards = math.ceil(len(items) / args.samples_per_shard)
    summary: WriteSummary = write_shards(args.out, args.format, num_shards, produce,
                                         workers=args.workers, progress=not args.no_progress,
                                         desc=f"make_shards -> {args.format}")
    summary.bad = all_bad(args.out, args.format, num_shards, listing_bad)
    print(f"make_shards: {len(items) + len(listing_bad)} inputs, {summary}")
    for bad in summary.bad[:20]:
        print(f"  bad: {bad.reason}")
    if len(summary.bad) > 20:
        print(f"  ... and {len(summary.bad) - 20} more")
    if summary.bad:
        print(f"  all bad inputs are listed in {args.out / BAD_LIST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
