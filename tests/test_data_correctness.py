"""Regressions for data-correctness defects: 16-bit images, reduced-size JPEG decode, upper-case tar
extensions, and make_shards' metadata, bad-input reasons, resume of the bad list, keys, duplicates."""
import importlib.util
import io
import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import data_recipe
from vtok.data import build_loader
from vtok.data.mds import mds_shard_entries, read_mds_shard
from vtok.data.schema import from_mds, from_wds
from vtok.data.transforms import ImageTransform, decode_image
from vtok.data.webdataset import read_tar
from vtok.data.writers import write_shards

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_shards", ROOT / "data_prep" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


def gradient16(h: int = 24, w: int = 40) -> np.ndarray:
    """A 16-bit gray ramp covering 0..65535."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def assert_scaled(rgb: np.ndarray, gray16: np.ndarray) -> None:
    """``rgb`` (H, W, 3) uint8 is ``gray16`` / 257 (within 1) in every channel, not clipped white."""
    expected = gray16.astype(np.float64) / 257
    assert rgb.shape == (*gray16.shape, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(np.float64) - expected[..., None]).max() <= 1
    assert int(rgb.max()) - int(rgb.min()) > 200 and (rgb < 128).mean() > 0.3


SIXTEEN_BIT = {
    "png I;16": lambda g: encode(Image.fromarray(g), "PNG"),
    "tiff I;16": lambda g: encode(Image.fromarray(g), "TIFF"),
    "tiff I;16B": lambda g: encode(Image.fromarray(g.astype(">u2")), "TIFF"),
    "tiff I (32-bit)": lambda g: encode(Image.fromarray(g.astype(np.int32)), "TIFF"),
}


@pytest.mark.parametrize("kind", list(SIXTEEN_BIT))
def test_16bit_gray_decodes_scaled_not_white(kind):
    g = gradient16()
    data = SIXTEEN_BIT[kind](g)
    assert_scaled(np.asarray(decode_image(data)), g)
    out = ImageTransform(resolution=24)(data, random.Random(0))  # the loader's path: 40x24 -> crop
    assert_scaled(out.numpy(), g[:, 8:32])


def test_16bit_rgb_png_decodes_scaled():
    rgb16 = np.stack([gradient16(), gradient16()[::-1], np.full((24, 40), 30000, np.uint16)], -1)
    out = np.asarray(decode_image(png_rgb16(rgb16))).astype(np.float64)
    assert np.abs(out - rgb16 / 257).max() <= 1


def run_make_shards(capsys, *args) -> str:
    assert make_shards.main([*map(str, args), "--no-progress"]) == 0
    return capsys.readouterr().out


def wds_samples(out: Path) -> list[dict]:
    return [from_wds(m) for p in sorted(out.glob("shard-*.tar")) for m in read_tar(str(p))]


def test_make_shards_scales_16bit_images(tmp_path, capsys):
    g = gradient16()
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(SIXTEEN_BIT["png I;16"](g))
    (src / "b.tif").write_bytes(SIXTEEN_BIT["tiff I;16"](g))
    run_make_shards(capsys, "--images", src, "--out", tmp_path / "out")
    samples = wds_samples(tmp_path / "out")
    assert len(samples) == 2
    for s in samples:
        assert_scaled(np.asarray(decode_image(s["image"])), g)
        assert Image.open(io.BytesIO(s["image"])).mode in ("L", "RGB"), "stored as 8-bit"


@pytest.mark.parametrize("side,res", [(498, 64), (501, 64), (503, 64), (2036, 256), (2038, 256)])
def test_reduced_jpeg_decode_is_never_smaller_than_asked(side, res):
    ramp = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    img = np.stack([np.broadcast_to(ramp, (side, side))] * 3, -1)
    data = encode(Image.fromarray(img), "JPEG")
    for decoder in ("simplejpeg", "pil"):
        assert min(decode_image(data, res, decoder).size) >= res
        out = ImageTransform(res, small_images="error", decoder=decoder)(data, random.Random(0))
        assert out.shape == (res, res, 3)
    wide = encode(Image.fromarray(img).resize((side + 61, side)), "JPEG")  # short side is the height
    assert ImageTransform(res)(wide, random.Random(0)).shape == (res, res, 3)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_upper_case_extensions_load_as_the_image(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    path = tmp_path / "imagenet-000000.tar"
    members = [("n01440764_10026", "JPEG", "JPEG", "cls"), ("n01440764_10027", "PNG", "PNG", "CLS"),
               ("n01440764_10028", "JPG", "JPEG", "cls")]
    with tarfile.open(path, "w") as tar:
        for i, (key, ext, fmt, cls_ext) in enumerate(members):
            add_member(tar, f"{key}.{ext}", encode(rgb, fmt))
            add_member(tar, f"{key}.{cls_ext}", str(i).encode())
    raw = next(read_tar(str(path)))
    assert from_wds(raw)["image"] == raw["JPEG"]
    recipe = data_recipe("wds", str(path), "data.shuffle=false")
    (batch,) = list(build_loader(recipe.data))
    assert batch["__key__"] == [m[0] for m in members]
    assert batch["image"].shape == (3, 3, 32, 32) and batch["cls"].tolist() == [0, 1, 2]


def make_images(root: Path, names: list[str]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        Image.fromarray(np.full((36, 36, 3), 20 * i, np.uint8)).save(root / name)
        paths.append(root / name)
    return paths


def test_make_shards_keeps_source_path_in_json(tmp_path, capsys):
    paths = make_images(tmp_path / "imgs", [f"im{i}.png" for i in range(5)])
    run_make_shards(capsys, "--images", tmp_path / "imgs", "--out", tmp_path / "wds", "--samples-per-shard", 2)
    samples = wds_samples(tmp_path / "wds")
    assert [s["json"]["path"] for s in samples] == [str(p) for p in paths]
    for s in samples:  # the json names the very file whose pixels the sample holds
        assert s["image"] == Path(s["json"]["path"]).read_bytes()

    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": f"imgs/{p.name}"}) + "\n" for p in paths))
    run_make_shards(capsys, "--list", tmp_path / "list.jsonl", "--out", tmp_path / "mds", "--format", "mds")
    rows = [from_mds(r) for e in mds_shard_entries(tmp_path / "mds") for r in read_mds_shard(tmp_path / "mds", e)]
    assert [Path(r["json"]["path"]).name for r in rows] == [p.name for p in paths]
    recipe = data_recipe("mds", str(tmp_path / "mds"), "data.shuffle=false", "data.fields=[image,json]")
    batch = next(iter(build_loader(recipe.data)))
    assert [Path(j["path"]).name for j in batch["json"]] == [p.name for p in paths]


def test_bad_input_reasons_name_the_path_and_survive_a_rerun(tmp_path, capsys):
    src = tmp_path / "imgs"
    make_images(src, ["a.png", "b.png", "d.png", "e.png"])
    broken = src / "c.jpg"
    broken.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    first = run_make_shards(capsys, "--images", src, "--out", out, "--samples-per-shard", 2)
    assert "1 bad inputs skipped" in first and f"bad: {broken}: " in first
    assert "BytesIO" not in first
    listed = [json.loads(line) for line in (out / "bad_inputs.jsonl").read_text().splitlines()]
    assert [b["path"] for b in listed] == [str(broken)]
    assert str(broken) in listed[0]["reason"] and "BytesIO" not in listed[0]["reason"]

    (out / "shard-000000.tar").unlink()  # as if the first run died before its first shard was done
    again = run_make_shards(capsys, "--images", src, "--out", out, "--samples-per-shard", 2)
    assert "1 shards written, 2 already done" in again  # c.jpg's shard (1) is not redone...
    assert "1 bad inputs skipped" in again and str(broken) in again  # ...yet it is still listed
    assert [json.loads(x)["path"] for x in (out / "bad_inputs.jsonl").read_text().splitlines()] == [str(broken)]

    make_images(tmp_path / "fixed", ["c.jpg"])
    broken.write_bytes((tmp_path / "fixed" / "c.jpg").read_bytes())
    (out / "shard-000001.tar").unlink()  # its shard redone with the file fixed: no longer bad
    fixed = run_make_shards(capsys, "--images", src, "--out", out, "--samples-per-shard", 2)
    assert "0 bad inputs skipped" in fixed and not (out / "bad_inputs.jsonl").exists()
    assert len(wds_samples(out)) == 5


def test_list_key_column_is_the_sample_key(tmp_path, capsys):
    x, y = (p.read_bytes() for p in make_images(tmp_path / "imgs", ["x.png", "y.png"]))
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"path": "imgs/x.png", "key": "cat_001", "cls": 1}) + "\n"
        + json.dumps({"path": "imgs/y.png", "key": 7}) + "\n")
    (tmp_path / "list.csv").write_text("path,key\nimgs/y.png,row_b\nimgs/x.png,row_a\n")
    run_make_shards(capsys, "--list", tmp_path / "list.jsonl", "--out", tmp_path / "j")
    assert [(s["__key__"], s["image"]) for s in wds_samples(tmp_path / "j")] == [("cat_001", x), ("7", y)]
    run_make_shards(capsys, "--list", tmp_path / "list.csv", "--out", tmp_path / "c")
    assert [(s["__key__"], s["image"]) for s in wds_samples(tmp_path / "c")] == [("row_b", y), ("row_a", x)]


def test_duplicate_paths_and_keys_are_reported_and_skipped(tmp_path, capsys):
    make_images(tmp_path / "imgs", ["x.png", "y.png", "z.png"])
    rows = [{"path": "imgs/x.png", "key": "k1"}, {"path": "imgs/y.png", "key": "k2"},
            {"path": "imgs/./x.png", "key": "k3"},  # the same file again
            {"path": "imgs/z.png", "key": "k2"}]  # the same key again
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_make_shards(capsys, "--list", tmp_path / "list.jsonl", "--out", tmp_path / "j")
    assert "4 inputs" in out and "2 bad inputs skipped" in out
    assert "x.png: duplicate: list.jsonl row 3 lists the same file as row 1" in out
    assert "duplicate key 'k2'" in out and "z.png" in out
    assert [s["__key__"] for s in wds_samples(tmp_path / "j")] == ["k1", "k2"]
    bad = [json.loads(x) for x in (tmp_path / "j" / "bad_inputs.jsonl").read_text().splitlines()]
    assert [Path(b["path"]).name for b in bad] == ["x.png", "z.png"]

    (tmp_path / "list.csv").write_text("path,caption\nimgs/x.png,one\nimgs/y.png,two\nimgs/x.png,three\n")
    out = run_make_shards(capsys, "--list", tmp_path / "list.csv", "--out", tmp_path / "c")
    assert "1 bad inputs skipped" in out and "x.png: duplicate" in out
    assert [s["caption"] for s in wds_samples(tmp_path / "c")] == ["one", "two"]


def test_json_metadata_round_trips_in_both_formats(tmp_path):
    img = encode(Image.new("RGB", (32, 32), (10, 200, 30)), "PNG")
    samples = [{"__key__": f"s{i}", "image": img, "json": {"path": f"/data/ü{i}.png", "n": i}} for i in range(3)]
    for fmt in ("wds", "mds"):
        write_shards(tmp_path / fmt, fmt, 1, lambda i: samples, progress=False)
    back_wds = [from_wds(m) for m in read_tar(str(tmp_path / "wds" / "shard-000000.tar"))]
    back_mds = [from_mds(r) for e in mds_shard_entries(tmp_path / "mds") for r in read_mds_shard(tmp_path / "mds", e)]
    assert [s["json"] for s in back_wds] == [s["json"] for s in back_mds] == [s["json"] for s in samples]
