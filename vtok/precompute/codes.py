"""``vtok precompute codes``: a frozen tokenizer turns image shards into code shards.

Input shard i becomes output shard i (same format unless ``--format``), with ``__key__``, ``codes``
(int16 when the vocabulary fits, else int32; shape ``token_spec.shape``, or ``(2, *shape)`` with
``--flip``: the image and its mirror, as LlamaGen's code extraction augments) and ``cls`` /
``caption`` passed through. Ranks take every ``world_size``-th shard; finished output shards are
skipped, so a killed job resumes where it stopped; each shard is written atomically.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from vtok.data.shards import ShardSource
from vtok.data.transforms import BadSample, ImageTransform
from vtok.data.writers import finalize, shard_name, write_shard
from vtok.models.api import TokenSpec
from vtok.models.export import load_export
from vtok.parallel.dist import DistInfo, barrier

log = logging.getLogger("vtok.precompute")
PASS_THROUGH = ("cls", "caption", "json")


@torch.no_grad()
def code_dtype(spec: TokenSpec) -> np.dtype:
    """int16 when every vocabulary fits (ids < 32,768), else int32; float16 for continuous tokens."""
    if not spec.discrete:
        return np.dtype(np.float16)
    return np.dtype(np.int16 if max(spec.vocab_sizes) <= np.iinfo(np.int16).max + 1 else np.int32)


def encode_shard(model, spec: TokenSpec, samples: Iterator[dict[str, Any]], transform: ImageTransform,
                 flip: bool, batch_size: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """Schema samples with images -> schema samples with ``codes`` (images dropped)."""
    dtype = code_dtype(spec)
    batch: list[dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        images = torch.stack([s.pop("_pixels") for s in batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        images = images.to(device)
        codes = model.encode(images)  # (B, *token_shape)
        if flip:
            codes = torch.stack([codes, model.encode(images.flip(-1))], dim=1)
        for sample, c in zip(batch, codes.cpu().numpy()):
            yield {**sample, "codes": c.astype(dtype)}
        batch.clear()

    for sample in samples:
        try:
            pixels = transform(sample["image"], random.Random(0), name=f"key {sample['__key__']}")
        except BadSample as e:
            log.warning("skipping key %s: %s", sample["__key__"], e)
            continue
        batch.append({"__key__": sample["__key__"], "_pixels": pixels,
                      **{k: sample[k] for k in PASS_THROUGH if k in sample}})
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def precompute_codes(export_dir: str, data: str, out: str, info: DistInfo, *, out_format: str = "",
                     resolution: int = 256, flip: bool = False, batch_size: int = 64,
                     progress: bool = True) -> int:
    """Encode every shard of ``data`` into ``out``; returns the number of shards this rank wrote."""
    export = load_export(export_dir, "tokenizer", info.device)
    model, spec = export.model, export.token_spec.at(resolution)  # one-line error for a wrong resolution
    source = ShardSource.open(data)
    out_format = out_format or source.format
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = ImageTransform(resolution, crop="center", small_images="upscale")
    mine = [i for i in range(len(source)) if i % info.world_size == info.rank]
    todo = [i for i in mine if not (out_dir / shard_name(out_format, i)).exists()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc=f"codes r{info.rank}",
               disable=not progress, dynamic_ncols=True)
    for i in todo:
        samples = encode_shard(model, spec, source.read(i), transform, flip, batch_size, info.device)
        write_shard(out_dir, out_format, i, samples)
        bar.update(1)
    bar.close()
    barrier()
    if info.is_main:
        meta = {"tokenizer": str(Path(export_dir).resolve()), "token_spec": spec.to_dict(), "flip": flip,
                "resolution": resolution}
        (out_dir / "codes.json").write_text(json.dumps(meta, indent=1))
        total = finalize(out_dir, out_format)
        log.info("%s: %d code samples in %d shards", out_dir, total, len(source))
    barrier()
    return len(todo)
