"""The one sample schema (DESIGN.md section 2) and its encodings in WebDataset tars and MDS columns.

A *schema sample* is a dict with ``__key__`` and any of :data:`FIELDS`::

    {"__key__": "000042", "image": b"\\xff\\xd8...", "cls": 3, "caption": "a red circle",
     "text_emb": float16 [L, D], "text_mask": bool [L], "codes": int16/int32 [...]}

WebDataset uses the community's extensions (``jpg``/``png``/``webp``, ``cls``, ``txt``, ``<name>.npy``)
so img2dataset-style shards load as they are; MDS uses columns named like the fields.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

FIELDS = ("image", "cls", "caption", "text_emb", "text_mask", "codes")
ARRAY_FIELDS = ("text_emb", "text_mask", "codes")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")

MDS_COLUMNS = {
    "__key__": "str",
    "image": "bytes",
    "cls": "int",
    "caption": "str",
    "text_emb": "ndarray",
    "text_mask": "ndarray",  # stored as uint8: MDS ndarray has no bool dtype
    "codes": "ndarray",
}


class SchemaError(ValueError):
    """A sample that does not follow the schema (unknown field, bad key, wrong dtype)."""


def image_ext(data: bytes) -> str:
    """The file extension for encoded image bytes, from their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise SchemaError("image bytes are not JPEG, PNG or WebP")


def check_sample(sample: dict[str, Any]) -> None:
    """Raise SchemaError unless ``sample`` is a valid schema sample."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
        raise SchemaError(f"sample key {key!r} must be a non-empty string without '.' "
                          "(WebDataset splits the key from the extension at the first dot)")
    unknown = set(sample) - set(FIELDS) - {"__key__"}
    if unknown:
        raise SchemaError(f"sample {key}: unknown fields {sorted(unknown)}; valid: {FIELDS}")
    for name in ARRAY_FIELDS:
        if name in sample and not isinstance(sample[name], np.ndarray):
            raise SchemaError(f"sample {key}: field {name!r} must be a numpy array")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle data


def to_wds(sample: dict[str, Any]) -> dict[str, bytes]:
    """Schema sample -> {extension: bytes} members of one WebDataset sample (key excluded)."""
    out: dict[str, bytes] = {}
    if "image" in sample:
        out[image_ext(sample["image"])] = sample["image"]
    if "cls" in sample:
        out["cls"] = str(int(sample["cls"])).encode()
    if "caption" in sample:
        out["txt"] = sample["caption"].encode("utf-8")
    for name in ARRAY_FIELDS:
        if name in sample:
            out[f"{name}.npy"] = _npy_bytes(sample[name])
    return out


def wds_fields(members: dict[str, Any]) -> tuple[str, ...]:
    """The schema fields present among one tar sample's members."""
    present = {
        "image": any(e in members for e in IMAGE_EXTS),
        "cls": "cls" in members,
        "caption": any(e in members for e in CAPTION_EXTS),
        **{name: f"{name}.npy" in members for name in ARRAY_FIELDS},
    }
    return tuple(name for name in FIELDS if present[name])


def from_wds(members: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """{"__key__": key, extension: bytes} of one tar sample -> schema sample.

    ``fields``: the fields to extract (KeyError naming a missing one), or None for all present.
    """
    fields = wds_fields(members) if fields is None else fields
    out: dict[str, Any] = {"__key__": members["__key__"]}
    for name in fields:
        if name == "image":
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise KeyError("image (no jpg/jpeg/png/webp member)")
            out["image"] = members[ext]
        elif name == "cls":
            out["cls"] = int(members["cls"])
        elif name == "caption":
            ext = next((e for e in CAPTION_EXTS if e in members), None)
            if ext is None:
                raise KeyError("caption (no txt member)")
            out["caption"] = members[ext].decode("utf-8")
        else:
            out[name] = _npy_load(members[f"{name}.npy"])
            if name == "text_mask":
                out[name] = out[name].astype(bool)
    return out


def to_mds(sample: dict[str, Any]) -> dict[str, Any]:
    """Schema sample -> MDS row (same names; bool masks stored as uint8)."""
    row = dict(sample)
    if "text_mask" in row:
        row["text_mask"] = row["text_mask"].astype(np.uint8)
    if "cls" in row:
        row["cls"] = int(row["cls"])
    return row


def from_mds(row: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """MDS row -> schema sample with the requested ``fields`` (KeyError names a missing one; None: all)."""
    fields = tuple(f for f in FIELDS if f in row) if fields is None else fields
    out = {name: row[name] for name in ("__key__", *fields)}
    if "text_mask" in out:
        out["text_mask"] = out["text_mask"].astype(bool)
    return out
