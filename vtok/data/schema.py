"""The one sample schema (DESIGN.md section 2) and its encodings in WebDataset tars and MDS columns.

A *schema sample* is a dict with ``__key__`` and any of :data:`FIELDS`::

    {"__key__": "000042", "image": b"\\xff\\xd8...", "cls": 3, "caption": "a red circle",
     "text_emb": float16 [L, D], "text_mask": bool [L], "codes": int16/int32 [...] (discrete) or float16 [...] (continuous tokens),
     "latents": float16 [C, h, w], "latents_std": float16 [C, h, w],
     "json": {"path": "/data/raw/img042.jpg"}}

``latents`` are VAE latents already scaled (``(z - shift) * scale``, recorded in the shard set's
``latents.json``; ``[2, C, h, w]`` with the mirrored image); ``latents_std`` the posterior std in the
same scale, when written (``vtok precompute latents --save-moments``).

WebDataset uses the community's extensions (``jpg``/``png``/``webp``, ``cls``, ``txt``, ``<name>.npy``,
``json``) so img2dataset-style shards load as they are; extensions match in any case (ImageNet's
``.JPEG``). MDS uses columns named like the fields. ``json`` is free-form per-sample metadata (a JSON
object), passed through as it is.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

FIELDS = ("image", "cls", "caption", "text_emb", "text_mask", "codes", "latents", "latents_std", "json")
ARRAY_FIELDS = ("text_emb", "text_mask", "codes", "latents", "latents_std")
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
    "latents": "ndarray",
    "latents_std": "ndarray",
    "json": "json",
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
    if "json" in sample and not isinstance(sample["json"], dict):
        raise SchemaError(f"sample {key}: field 'json' must be a dict (a JSON object)")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle data


def _json_load(data: bytes) -> dict[str, Any]:
    """A ``json`` member -> dict; KeyError (the loader's "missing field") if it is not a JSON object."""
    try:
        value = json.loads(data)
    except ValueError as e:
        raise KeyError(f"json (member is not valid JSON: {e})") from None
    if not isinstance(value, dict):
        raise KeyError(f"json (member is a JSON {type(value).__name__}, not an object)")
    return value


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
    if "json" in sample:
        out["json"] = json.dumps(sample["json"], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return out


def _by_ext(members: dict[str, Any]) -> dict[str, str]:
    """{lower-case extension: member name} of one tar sample ('JPEG' -> 'jpeg'; first one wins)."""
    out: dict[str, str] = {}
    for name in members:
        if name != "__key__":
            out.setdefault(name.lower(), name)
    return out


def _member(members: dict[str, Any], exts: dict[str, str], choices: tuple[str, ...]) -> Any:
    """The bytes of the first member whose extension is one of ``choices`` (any case), else None."""
    ext = next((exts[e] for e in choices if e in exts), None)
    return None if ext is None else members[ext]


def wds_fields(members: dict[str, Any]) -> tuple[str, ...]:
    """The schema fields present among one tar sample's members (extensions in any case)."""
    exts = _by_ext(members)
    present = {
        "image": any(e in exts for e in IMAGE_EXTS),
        "cls": "cls" in exts,
        "caption": any(e in exts for e in CAPTION_EXTS),
        **{name: f"{name}.npy" in exts for name in ARRAY_FIELDS},
        "json": "json" in exts,
    }
    return tuple(name for name in FIELDS if present[name])


def from_wds(members: dict[str, Any], fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """{"__key__": key, extension: bytes} of one tar sample -> schema sample.

    ``fields``: the fields to extract (KeyError naming a missing one), or None for all present.
    """
    fields = wds_fields(members) if fields is None else fields
    exts = _by_ext(members)
    out: dict[str, Any] = {"__key__": members["__key__"]}
    for name in fields:
        if name == "image":
            value = _member(members, exts, IMAGE_EXTS)
            if value is None:
                raise KeyError("image (no jpg/jpeg/png/webp member)")
            out["image"] = value
        elif name == "cls":
            out["cls"] = int(members[exts.get("cls", "cls")])
        elif name == "caption":
            value = _member(members, exts, CAPTION_EXTS)
            if value is None:
                raise KeyError("caption (no txt member)")
            out["caption"] = value.decode("utf-8")
        elif name == "json":
            out["json"] = _json_load(members[exts.get("json", "json")])
        else:
            out[name] = _npy_load(members[exts.get(f"{name}.npy", f"{name}.npy")])
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
