"""Per-class caption lists for a class-conditional generator over a text-conditioned tokenizer (TexTok).

TexTok's detokenizer reads a caption next to the tokens. A class-conditional DiT has no caption, so at
sampling time the detokenizer gets one drawn from a held-out list of captions of the sampled class (the
TexTok paper's ImageNet setting). ``vtok data class-captions`` builds that list from image shards
carrying ``cls`` + ``caption`` (and the T5 ``text_emb`` / ``text_mask`` of ``vtok precompute text-emb``):

* ``FILE.json``: ``{"per_class": N, "selection": ..., "source": SHARDS, "text_shape": [L, D] | null,
  "text_encoder": the T5 of the shards' text-emb.json | null, "embeddings": "FILE.npz" | null,
  "captions": {"<cls>": [caption, ...]}}``;
* ``FILE.npz`` (when the shards carry embeddings): ``emb_<cls>`` (n, L, D) float16 and ``mask_<cls>``
  (n, L) bool, row i the embedding of ``captions[cls][i]``, so decoding needs no T5.

Held-out choice: the *last* N captions of each class in shard order (deterministic; train the tokenizer
and DiT on the shards before them, or on other shards, to keep the list unseen). Sampling draws one
caption per sample with a seeded generator (``ClassCaptions.condition``).
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtok.data.transforms import DataError
from vtok.models.api import Condition

SELECTION = "the last per_class captions of each class in shard order"


def _text_encoder(data: str) -> dict[str, Any] | None:
    """The text-emb.json beside ``data`` (the T5 the embeddings came from), or None."""
    from vtok.config import RecipeError
    from vtok.data.shards import read_shard_meta

    try:
        return read_shard_meta(data, "text-emb.json", "text-emb", "--data")[1]
    except RecipeError:
        return None


def build_class_captions(data: str, out: str, per_class: int = 16) -> dict[str, Any]:
    """Read ``cls`` + ``caption`` (+ ``text_emb`` / ``text_mask``) of every sample of the shards
    ``data``; write ``out`` (JSON) and, with embeddings, its ``.npz`` sidecar. Returns the JSON dict."""
    from vtok.data.shards import ShardSource

    if per_class < 1:
        raise DataError(f"--per-class {per_class}: expected >= 1")
    if not out.endswith(".json"):
        raise DataError(f"--out {out}: expected a .json path (the embeddings go beside it as .npz)")
    source = ShardSource.open(data)
    kept: dict[int, deque] = {}
    with_text: bool | None = None
    for i in range(len(source)):
        for sample in source.read(i):
            missing = [f for f in ("cls", "caption") if f not in sample]
            if missing:
                raise DataError(f"{data}: sample {sample.get('__key__')} has no {missing}; class captions need "
                                "class ids and captions (`vtok precompute captions` writes captions)")
            if with_text is None:
                with_text = "text_emb" in sample and "text_mask" in sample
            row = (str(sample["caption"]),
                   np.asarray(sample["text_emb"], np.float16) if with_text else None,
                   np.asarray(sample["text_mask"], bool) if with_text else None)
            kept.setdefault(int(sample["cls"]), deque(maxlen=per_class)).append(row)
    if not kept:
        raise DataError(f"{data}: no samples")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    npz = path.with_suffix(".npz")
    info = {"per_class": per_class, "selection": SELECTION, "source": data, "text_shape": None,
            "text_encoder": None, "embeddings": None,
            "captions": {str(c): [r[0] for r in kept[c]] for c in sorted(kept)}}
    if with_text:
        arrays = {}
        for c in sorted(kept):
            arrays[f"emb_{c}"] = np.stack([r[1] for r in kept[c]])
            arrays[f"mask_{c}"] = np.stack([r[2] for r in kept[c]])
        np.savez(npz, **arrays)
        info.update(text_shape=list(arrays[f"emb_{min(kept)}"].shape[1:]), text_encoder=_text_encoder(data),
                    embeddings=npz.name)
    path.write_text(json.dumps(info, indent=1))
    return info


@dataclass
class ClassCaptions:
    """A loaded class-captions file: ``captions[c]`` strings, ``emb[c]`` (n, L, D) float16 and
    ``mask[c]`` (n, L) bool tensors per class id ``c``."""

    path: str
    captions: dict[int, list[str]]
    emb: dict[int, torch.Tensor]
    mask: dict[int, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "ClassCaptions":
        """Read ``path`` (from ``vtok data class-captions``); one-line DataError when it or its
        embeddings are missing."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"class captions {p}: no such file; write it with `vtok data class-captions "
                            "--data SHARDS --out FILE.json`")
        info = json.loads(p.read_text())
        if not info.get("embeddings"):
            raise DataError(f"class captions {p} has no embeddings (its shards had no text_emb): rebuild it "
                            "from the output of `vtok precompute text-emb`")
        npz = p.parent / info["embeddings"]
        if not npz.is_file():
            raise DataError(f"class captions {p}: its embeddings {npz} are missing; keep the .npz beside the "
                            ".json or rebuild both")
        with np.load(npz) as arrays:
            emb = {int(c): torch.from_numpy(arrays[f"emb_{c}"]) for c in info["captions"]}
            mask = {int(c): torch.from_numpy(arrays[f"mask_{c}"]) for c in info["captions"]}
        return cls(str(p), {int(c): v for c, v in info["captions"].items()}, emb, mask)

    def condition(self, labels: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[Condition, list[str]]:
        """One caption per label (B,), drawn uniformly from its class's list with ``generator``:
        (Condition(text (B, L, D) float32, text_mask (B, L) bool), the captions)."""
        labels = labels.cpu()
        absent = sorted({int(c) for c in labels} - set(self.captions))
        if absent:
            raise DataError(f"class captions {self.path} has no captions for classes {absent[:8]}; rebuild it "
                            "from shards that hold every sampled class")
        texts, masks, words = [], [], []
        for c in labels.tolist():
            j = int(torch.randint(len(self.captions[c]), (1,), generator=generator))
            texts.append(self.emb[c][j])
            masks.append(self.mask[c][j])
            words.append(self.captions[c][j])
        return Condition(text=torch.stack(texts).float(), text_mask=torch.stack(masks).bool()), words


__all__ = ["ClassCaptions", "SELECTION", "build_class_captions"]
