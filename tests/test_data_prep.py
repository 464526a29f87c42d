"""data_prep/make_shards.py and data_prep/convert.py, run as the user runs them."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vtok.data.mds import mds_shard_entries, read_mds_shard
from vtok.data.schema import from_mds, from_wds
from vtok.data.synthetic import render_sample
from vtok.data.webdataset import read_tar

ROOT = Path(__file__).resolve().parent.parent
MAKE_SHARDS = ROOT / "data_prep" / "make_shards.py"
CONVERT = ROOT / "data_prep" / "convert.py"


def run(script, *args, **kw):
    return subprocess.run([sys.executable, str(script), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=300, **kw)


def make_folder(root: Path, n: int = 20) -> Path:
    for i in range(n):
        cls_dir = root / ("cats" if i % 2 else "dogs")
        cls_dir.mkdir(parents=True, exist_ok=True)
        img = render_sample(i, resolution=40)[0]
        img.save(cls_dir / f"img{i:03d}.{'png' if i % 3 else 'jpg'}")
    return root


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_folder_with_classes_bad_files_and_min_size(tmp_path):
    src = make_folder(tmp_path / "imgs")
    (src / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    render_sample(99, resolution=16)[0].save(src / "dogs" / "tiny.png")
    out = tmp_path / "out"
    proc = run(MAKE_SHARDS, "--images", src, "--out", out, "--samples-per-shard", 6, "--min-size", 32)
    assert proc.returncode == 0, proc.stderr
    assert "2 bad inputs skipped" in proc.stdout and "broken.jpg" in proc.stdout and "tiny.png" in proc.stdout
    assert json.loads((out / "classes.json").read_text()) == ["cats", "dogs"]
    samples = [from_wds(m) for p in sorted(out.glob("*.tar")) for m in read_tar(str(p))]
    assert len(samples) == 20 and json.loads((out / "manifest.json").read_text())["num_samples"] == 20
    assert sorted({s["cls"] for s in samples}) == [0, 1]


def test_jsonl_and_csv_lists_with_captions(tmp_path):
    src = make_folder(tmp_path / "imgs", n=4)
    files = sorted(p.relative_to(tmp_path) for p in src.rglob("img*"))
    (tmp_path / "list.jsonl").write_text("\n".join(
        json.dumps({"path": str(f), "caption": f"caption {i}", "cls": i}) for i, f in enumerate(files)))
    (tmp_path / "list.csv").write_text("path,caption\n" + "\n".join(f"{f},cap {i}" for i, f in enumerate(files)))
    for name, fmt in (("list.jsonl", "mds"), ("list.csv", "wds")):
        out = tmp_path / f"out-{name}"
        proc = run(MAKE_SHARDS, "--list", tmp_path / name, "--out", out, "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        if fmt == "mds":
            rows = [from_mds(r) for e in mds_shard_entries(out) for r in read_mds_shard(out, e)]
            assert [r["cls"] for r in rows] == [0, 1, 2, 3]
            assert rows[2]["caption"] == "caption 2"
        else:
            rows = [from_wds(m) for m in read_tar(str(out / "shard-000000.tar"))]
            assert [r["caption"] for r in rows] == [f"cap {i}" for i in range(4)] and "cls" not in rows[0]


def test_killed_half_way_resumes_to_identical_shards(tmp_path):
    src = make_folder(tmp_path / "imgs", n=24)
    clean = tmp_path / "clean"
    assert run(MAKE_SHARDS, "--images", src, "--out", clean, "--samples-per-shard", 4).returncode == 0

    # Replace one input (in shard 3) with a FIFO: reading it blocks, so the job hangs mid-shard with
    # shards 0-2 finished and shard 3 half-written. Then kill -9 it, restore the file and rerun.
    victim = sorted((src / "dogs").iterdir())[1]  # item 13 overall (12 cats sort first) -> shard 3
    data = victim.read_bytes()
    victim.unlink()
    os.mkfifo(victim)
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(MAKE_SHARDS), "--images", str(src), "--out", str(out),
                             "--samples-per-shard", "4", "--no-progress"])
    deadline = time.time() + 60
    while not list(out.glob("*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*"))
    assert done == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar.tmp"]
    finished_before = {n: (out / n).stat().st_mtime_ns for n in done if not n.endswith(".tmp")}

    victim.unlink()
    victim.write_bytes(data)
    proc = run(MAKE_SHARDS, "--images", src, "--out", out, "--samples-per-shard", 4)
    assert proc.returncode == 0, proc.stderr
    assert "3 already done" in proc.stdout
    assert all((out / n).stat().st_mtime_ns == t for n, t in finished_before.items()), "not redone"
    assert not list(out.glob("*.tmp"))
    assert shard_bytes(out) == shard_bytes(clean)


def test_convert_round_trip_keeps_keys_and_fields(shards, tmp_path):
    to_mds = run(CONVERT, "--src", shards["wds"], "--dst", tmp_path / "mds", "--to", "mds", "--workers", 2)
    assert to_mds.returncode == 0, to_mds.stderr
    back = run(CONVERT, "--src", tmp_path / "mds", "--dst", tmp_path / "wds", "--to", "wds")
    assert back.returncode == 0, back.stderr
    assert shard_bytes(tmp_path / "wds") == shard_bytes(Path(shards["wds"]))
    again = run(CONVERT, "--src", tmp_path / "mds", "--dst", tmp_path / "wds", "--to", "wds")
    assert "0 shards written, 12 already done" in again.stdout
