"""The precompute shard runner: ranks split the shards, kill -9 + rerun is byte-identical, a foreign
output directory is refused, bad samples are counted by key and stop the job past the limit.

The cheap job here is ``vtok precompute captions --from-jsonl`` (no model)."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


from conftest import descendants, kill9
from vtok.cli import main
from vtok.data.schema import from_wds
from vtok.data.shards import ShardSource
from vtok.data.transforms import BadSample
from vtok.data.webdataset import read_tar
from vtok.precompute.runner import prepared

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_jsonl(path, keys, skip=()):
    path.write_text("".join(json.dumps({"__key__": k, "caption": f"caption of {k}"}) + "\n"
                            for k in keys if k not in skip))
    return path


def all_keys(data):
    source = ShardSource.open(data)
    return [s["__key__"] for i in range(len(source)) for s in source.read(i)]


def captions_cmd(*args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "vtok.cli", "precompute", "captions", "--no-progress", *map(str, args)]


def tar_samples(out):
    return [from_wds(m) for p in sorted(out.glob("shard-*.tar")) for m in read_tar(str(p))]


def test_two_ranks_split_the_shards_and_write_every_sample_once(shards, tmp_path):
    keys = all_keys(shards["mds"])
    jsonl = write_jsonl(tmp_path / "captions.jsonl", keys)
    out = tmp_path / "out"
    proc = subprocess.run(captions_cmd("--from-jsonl", jsonl, "--data", shards["mds"], "--out", out,
                                       "--format", "wds", "--batch-size", 8, nproc=2),
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 wrote 6 shards" in proc.stdout and "rank 1 wrote 6 shards" in proc.stdout
    samples = tar_samples(out)
    assert sorted(s["__key__"] for s in samples) == sorted(keys) and len(set(keys)) == 240
    source = ShardSource.open(shards["mds"])
    inputs = {s["__key__"]: s for i in range(len(source)) for s in source.read(i)}
    for s in samples:  # every input field kept as it was, the caption replaced on the right key
        assert s["caption"] == f"caption of {s['__key__']}"
        before = inputs[s["__key__"]]
        assert set(s) == set(before) and "image" in s
        assert all(s[k] == before[k] for k in s if k != "caption")
    summary = json.loads((out / "precompute.json").read_text())
    assert summary["samples_seen"] == summary["samples_written"] == 240 and summary["bad"] == 0
    assert summary["world_size"] == 2 and summary["output"]["shards"] == 12
    assert json.loads((out / "manifest.json").read_text())["precompute"]["job"] == "captions"
    assert json.loads((out / "captions.json").read_text())["captions_in_file"] == 240


def test_kill_9_half_way_then_rerun_is_byte_identical(shards, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for p in sorted(os.listdir(shards["wds"])):
        if p.endswith(".tar"):
            os.symlink(os.path.join(shards["wds"], p), data / p)
    jsonl = write_jsonl(tmp_path / "c.jsonl", all_keys(shards["wds"]))
    victim = data / "shard-000005.tar"
    target = os.readlink(victim)
    victim.unlink()
    os.mkfifo(victim)  # rank 1 blocks reading shard 5 after writing 1 and 3; rank 0 writes the evens
    out = tmp_path / "out"
    args = ("--from-jsonl", jsonl, "--data", data, "--out", out, "--batch-size", 8)
    job = subprocess.Popen(captions_cmd(*args, nproc=2), env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = [f"shard-{i:06d}.tar" for i in (0, 1, 2, 3, 4, 6, 8, 10)]
    deadline = time.time() + 120
    while not all((out / n).exists() for n in expected) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    workers = descendants(job.pid)  # torchrun starts each worker in a session of its own
    kill9([job.pid, *workers], group=True)  # kill -9 every process group of the job: agent, then workers
    job.wait()
    assert len(workers) >= 2
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert sorted(done) == expected and not (out / "precompute.json").exists()

    victim.unlink()
    os.symlink(target, victim)
    rerun = subprocess.run(captions_cmd(*args), capture_output=True, text=True, timeout=300, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "wrote 4 shards (8 already done" in rerun.stdout
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items()), "finished shards rewritten"
    clean = tmp_path / "clean"
    assert subprocess.run(captions_cmd("--from-jsonl", jsonl, "--data", data, "--out", clean), env=ENV,
                          capture_output=True, timeout=300).returncode == 0
    names = sorted(p.name for p in clean.glob("shard-*.tar"))
    assert len(names) == 12 and names == sorted(p.name for p in out.glob("shard-*.tar"))
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    summary = json.loads((out / "precompute.json").read_text())  # counts the killed run's shards too
    assert summary["samples_seen"] == 240 and summary["output"]["samples"] == 240


def test_foreign_output_directory_is_refused_with_one_line(shards, tmp_path, capsys):
    data = f"{shards['wds']}/shard-{{000000..000001}}.tar"
    keys = all_keys(data)
    out = tmp_path / "out"
    assert main(["precompute", "captions", "--from-jsonl", str(write_jsonl(tmp_path / "a.jsonl", keys)),
                 "--data", data, "--out", str(out), "--no-progress"]) == 0
    again = main(["precompute", "captions", "--from-jsonl", str(tmp_path / "a.jsonl"), "--data", data,
                  "--out", str(out), "--no-progress"])
    assert again == 0  # the same job and model resumes (nothing left to do)
    capsys.readouterr()
    other_model = write_jsonl(tmp_path / "b.jsonl", keys)
    assert main(["precompute", "captions", "--from-jsonl", str(other_model), "--data", data,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds the output of model" in err and "b.jsonl" in err
    assert main(["precompute", "text-emb", "--encoder", str(other_model), "--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "job `captions`, not `text-emb`" in err
    plain = tmp_path / "plain"  # shards from elsewhere (no record of a job): refused too
    plain.mkdir()
    (plain / "shard-000000.tar").write_bytes(b"")
    assert main(["precompute", "captions", "--from-jsonl", str(other_model), "--data", data,
                 "--out", str(plain)]) == 2
    assert "not written by `vtok precompute captions`" in capsys.readouterr().err
    assert (plain / "shard-000000.tar").read_bytes() == b""


def test_missing_captions_are_bad_samples_counted_by_key(shards, tmp_path, capsys):
    data = f"{shards['wds']}/shard-{{000000..000001}}.tar"
    keys = all_keys(data)
    missing = {keys[3], keys[25]}
    jsonl = write_jsonl(tmp_path / "c.jsonl", keys, skip=missing)
    out = tmp_path / "strict"
    assert main(["precompute", "captions", "--from-jsonl", str(jsonl), "--data", data, "--out", str(out),
                 "--no-progress"]) == 2  # 2 of 40 > the default max_bad_fraction 0.001
    assert "2 of 40 samples were bad" in capsys.readouterr().err
    assert set(json.loads((out / "precompute.json").read_text())["bad_samples"]) == missing
    out = tmp_path / "tolerant"
    assert main(["precompute", "captions", "--from-jsonl", str(jsonl), "--data", data, "--out", str(out),
                 "--no-progress", "--max-bad-fraction", "0.1"]) == 0
    samples = tar_samples(out)
    assert sorted(s["__key__"] for s in samples) == sorted(set(keys) - missing)
    assert all(s["caption"] == f"caption of {s['__key__']}" for s in samples)
    summary = json.loads((out / "precompute.json").read_text())
    assert summary["bad"] == 2 and summary["samples_seen"] == 40 and summary["samples_written"] == 38
    assert all("no caption for this key" in r for r in summary["bad_samples"].values())


def test_prepared_keeps_input_order_with_threads():
    def prep(s):
        if s["n"] % 7 == 3:
            raise BadSample("odd one")
        time.sleep(0.001 * (s["n"] % 3))
        return s["n"] * 2

    samples = [{"__key__": str(i), "n": i} for i in range(50)]
    with ThreadPoolExecutor(4) as pool:
        got = list(prepared(samples, prep, pool, ahead=8))
    assert [s["n"] for s, _ in got] == list(range(50))
    assert all(isinstance(p, BadSample) if s["n"] % 7 == 3 else p == s["n"] * 2 for s, p in got)


def test_slurm_script_requeues_on_the_time_limit_signal_and_resumes(shards, tmp_path):
    """slurm/precompute.sh JOB ...: SIGUSR1 (time limit near) -> scontrol requeue; the rerun finishes."""
    from conftest import ROOT
    from test_launch import free_port

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1 && exit 0\n'
                                      f'echo "$@" >> {log}\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    data = tmp_path / "images"
    data.mkdir()
    for p in sorted(p for p in os.listdir(shards["wds"]) if p.endswith(".tar"))[:4]:
        os.symlink(os.path.join(shards["wds"], p), data / p)
    target = os.readlink(data / "shard-000002.tar")
    (data / "shard-000002.tar").unlink()
    os.mkfifo(data / "shard-000002.tar")  # the job hangs here, as if the time limit were near
    jsonl = write_jsonl(tmp_path / "c.jsonl", all_keys(shards["wds"]))
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(ROOT), "VTOK_NPROC_PER_NODE": "1",
           "VTOK_RDZV_PORT": str(free_port())}
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "slurm" / "precompute.sh"), "captions", "--from-jsonl", str(jsonl),
           "--data", str(data), "--out", str(out), "--no-progress"]
    # Output to files, and only the sbatch script waited for: it exits as soon as it has requeued
    # (Slurm then ends the step); torchrun's own teardown of the blocked worker may take its 30 s.
    with open(tmp_path / "job.out", "w") as so, open(tmp_path / "job.err", "w") as se:
        job = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=so, stderr=se, text=True)
    deadline = time.time() + 120
    while not (out / "shard-000001.tar").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    step = descendants(job.pid)  # torchrun starts its worker in a session of its own
    job.send_signal(signal.SIGUSR1)
    try:
        job.wait(timeout=60)
    finally:
        kill9([job.pid, *step])  # whatever of the step is left, as Slurm would
    stdout = (tmp_path / "job.out").read_text()
    assert job.returncode == 0 and "requeueing 77" in stdout, (tmp_path / "job.err").read_text()[-3000:]
    assert log.read_text().split() == ["requeue", "77"]
    (data / "shard-000002.tar").unlink()
    os.symlink(target, data / "shard-000002.tar")
    env["VTOK_RDZV_PORT"] = str(free_port())
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "wrote 2 shards (2 already done" in rerun.stdout
    assert json.loads((out / "precompute.json").read_text())["samples_written"] == 80


def test_cli_flags_of_every_job():
    from vtok.cli import build_parser

    p = build_parser()
    codes = p.parse_args(["precompute", "codes", "--tokenizer", "t", "--data", "d", "--out", "o", "--format", "mds",
                          "--resolution", "32", "--flip", "--batch-size", "16"])  # the flags codes always had
    assert (codes.job, codes.format, codes.resolution, codes.flip, codes.batch_size) == ("codes", "mds", 32, True, 16)
    assert not codes.keep_image and codes.max_bad_fraction == 0.001 and codes.progress
    common = ["--data", "d", "--out", "o"]
    assert p.parse_args(["precompute", "captions", "--from-jsonl", "f", *common]).batch_size == 16
    assert not p.parse_args(["precompute", "captions", "--model", "m", *common]).trust_remote_code
    te = p.parse_args(["precompute", "text-emb", "--encoder", "e", "--empty-caption", "null", *common])
    assert (te.batch_size, te.max_length, te.empty_caption) == (128, 128, "null")
    lat = p.parse_args(["precompute", "latents", "--vae", "v", "--save-moments", "--no-progress", *common])
    assert (lat.batch_size, lat.save_moments, lat.flip, lat.progress) == (64, True, False, False)
