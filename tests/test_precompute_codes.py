"""`vtok precompute codes`: a trained tokenizer turns image shards into code shards, resumably."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from vtok.data.schema import from_wds
from vtok.data.webdataset import read_tar
from vtok.models.export import load_export


def run_codes(*args):
    return subprocess.run([sys.executable, "-m", "vtok.cli", "precompute", "codes", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def code_samples(out):
    return [from_wds(m) for p in sorted(out.glob("shard-*.tar")) for m in read_tar(str(p))]


def test_codes_with_flip_keep_keys_and_labels(shards, exported, tmp_path):
    proc = run_codes("--tokenizer", exported, "--data", shards["wds"], "--out", tmp_path / "codes",
                     "--resolution", 32, "--flip", "--batch-size", 16)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = code_samples(tmp_path / "codes")
    assert len(samples) == 240 and samples[0]["__key__"] == "00000000"
    assert samples[0]["codes"].shape == (2, 2, 8, 8) and samples[0]["codes"].dtype == np.int16
    assert {"cls", "caption"} <= set(samples[0]) and "image" not in samples[0]
    meta = json.loads((tmp_path / "codes" / "codes.json").read_text())
    spec = meta["token_spec"]
    assert spec["shape"] == [2, 8, 8] and spec["vocab_sizes"] == [256, 256] and spec["resolution"] == 32
    assert meta["flip"]
    tok = load_export(exported, "tokenizer").model
    images = tok.decode(torch.from_numpy(samples[0]["codes"][:1]).long())
    assert images.shape == (1, 3, 32, 32)


def test_killed_half_way_resumes_without_redoing_finished_shards(shards, exported, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for p in sorted(os.listdir(shards["wds"])):
        if p.endswith(".tar"):
            os.symlink(os.path.join(shards["wds"], p), data / p)
    victim = data / "shard-000005.tar"
    target = os.readlink(victim)
    victim.unlink()
    os.mkfifo(victim)  # reading it blocks: the job hangs at shard 5 with shards 0-4 written
    out = tmp_path / "codes"
    proc = subprocess.Popen([sys.executable, "-m", "vtok.cli", "precompute", "codes", "--tokenizer",
                             str(exported), "--data", str(data), "--out", str(out), "--resolution", "32"])
    deadline = time.time() + 120
    while not (out / "shard-000004.tar").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert sorted(done) == [f"shard-{i:06d}.tar" for i in range(5)]

    victim.unlink()
    os.symlink(target, victim)
    assert run_codes("--tokenizer", exported, "--data", data, "--out", out, "--resolution", 32).returncode == 0
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items()), "finished shards not redone"
    clean = tmp_path / "clean"
    assert run_codes("--tokenizer", exported, "--data", data, "--out", clean, "--resolution", 32).returncode == 0
    for name in sorted(p.name for p in clean.glob("shard-*.tar")):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert len(code_samples(out)) == 240


def test_eval_recon_report_and_grid(shards, exported, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vtok.cli", "eval", "recon", "--tokenizer", str(exported),
                           "--data", shards["wds"], "--out", str(tmp_path / "eval"), "--resolution", "32",
                           "--max-samples", "40", "--batch-size", "16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "recon.json").read_text())
    assert report["num_images"] == 40 and 0 < report["psnr"] < 60 and -1 <= report["ssim"] <= 1
    assert len(report["codebooks"]) == 2 and 0 < report["codebooks"][0]["usage"] <= 1
    assert (tmp_path / "eval" / "recon_grid.png").is_file() and "PSNR" in proc.stdout


def test_psnr_and_ssim_reference_values():
    from vtok.eval.metrics import psnr, ssim

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2)) and (psnr(x, x) > 90).all()
    y = (x + 0.2).clamp(-1, 1)  # +0.1 on [0, 1] where not clipped
    mse01 = ((x.clamp(-1, 1) - y) ** 2).mean((1, 2, 3)) / 4
    torch.testing.assert_close(psnr(x, y), -10 * torch.log10(mse01))
    assert (ssim(x, torch.rand(2, 3, 32, 32) * 2 - 1) < 0.2).all()
