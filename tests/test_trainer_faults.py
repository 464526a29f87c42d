"""Faults: kill -9 and resume, preemption signals, leftover temp checkpoints, non-finite losses."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, run_vtok, vtok_cmd, write_train_recipe

LONG = 60  # steps: enough that a kill lands mid-run


def start(recipe, *overrides, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(vtok_cmd("train", recipe, *overrides, nproc=nproc), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(path: Path, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def kill_9_job(proc) -> None:
    """SIGKILL a torchrun job: the agent and every rank with its DataLoader workers. torchrun starts
    each rank in a session of its own, so killing the agent's process group alone leaves the ranks
    running (they would finish the run and the resume would have nothing to do)."""
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                            text=True).stdout.split()]
    for pid in ranks:
        os.killpg(pid, signal.SIGKILL)  # a session leader: its group is the rank and its workers
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in ranks):
        assert time.time() < deadline, "ranks survived SIGKILL"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def final_weights(run_dir: Path, strategy: str, out: Path) -> dict:
    """The final checkpoint's tensors: DDP's weights, or FSDP2's whole DCP state (weights and
    optimizer), read with torch's own converter."""
    step = run_dir / "checkpoints" / f"step_{LONG:09d}"
    if strategy == "ddp":
        return load_file(str(step / "model-ae.safetensors"))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step / "dcp", out)
    flat, todo = {}, [("", torch.load(out, weights_only=True))]
    while todo:
        prefix, tree = todo.pop()
        for k, v in tree.items():
            if isinstance(v, dict):
                todo.append((f"{prefix}{k}.", v))
            elif torch.is_tensor(v):
                flat[prefix + str(k)] = v
    return flat


@pytest.mark.parametrize("fmt", ["mds", "wds"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_kill_9_then_resume_gives_bit_identical_weights(shards, tmp_path, strategy, fmt):
    """2 ranks x 2 workers; checkpoints every 7 steps of 4 samples land mid-shard (20 per shard) and
    mid-round of the workers, and the run crosses an epoch boundary (120 samples per rank)."""
    recipe = write_train_recipe(tmp_path / "r.yaml", shards[fmt], "tiny-ae", tmp_path / "clean", steps=LONG)
    common = [f"data.format={fmt}", f"parallel.strategy={strategy}", "data.batch_size=4",
              "data.num_workers=2", "data.shuffle_buffer=8", "ckpt.every_steps=7", "ckpt.keep_last=2"]
    run_vtok("train", recipe, *common, nproc=2)

    killed = tmp_path / "killed"
    proc = start(recipe, *common, f"run_dir={killed}", nproc=2)
    wait_for(killed / "checkpoints" / "step_000000007" / "meta.json", proc)
    kill_9_job(proc)
    assert not (killed / "COMPLETE").exists(), "the kill must land before the end"
    assert not (killed / "checkpoints" / f"step_{LONG:09d}").exists()
    proc = run_vtok("train", recipe, *common, f"run_dir={killed}", nproc=2)
    assert f"complete at step {LONG}" in proc.stdout
    assert "resumed from" in proc.stderr and f"step_{LONG:09d} at step" not in proc.stderr

    a = final_weights(tmp_path / "clean", strategy, tmp_path / "a.pt")
    b = final_weights(killed, strategy, tmp_path / "b.pt")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 + resume"


def test_signal_to_one_rank_saves_and_stops_all(shards, tmp_path):
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=100000)
    proc = start(recipe, "data.batch_size=4", "ckpt.every_steps=1000000", nproc=2)
    wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    time.sleep(1.0)
    # torchrun's workers are the agent's child processes
    workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGUSR1)  # one worker only
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted at step" in out
    ckpts = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(ckpts) == 1 and (ckpts[0] / "meta.json").is_file()
    assert len(list(ckpts[0].glob("rank*.pt"))) == 2, "both ranks saved their state"
    assert not (tmp_path / "run" / "COMPLETE").exists()
    stopped_at = int(ckpts[0].name.split("_")[1])

    # A crash during a later save leaves a .tmp directory: it must be ignored on resume.
    junk = tmp_path / "run" / "checkpoints" / f"step_{stopped_at + 5:09d}.tmp"
    junk.mkdir()
    (junk / "meta.json").write_text("{not json")
    proc = run_vtok("train", recipe, "data.batch_size=4", f"train.steps={stopped_at + 2}", nproc=2)
    assert f"complete at step {stopped_at + 2}" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-2:] == [stopped_at + 1, stopped_at + 2]
    assert not junk.exists(), "the next save clears leftovers"


def test_sigterm_single_process_leaves_complete_checkpoint(shards, tmp_path):
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=100000)
    proc = start(recipe, "ckpt.every_steps=1000000")
    wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "preempted" in out, err[-2000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "run" / "checkpoints" / latest / "meta.json").is_file()


def test_a_hung_rank_times_out_and_is_named(shards, tmp_path):
    """Rank 1 hangs in the forward of step 3; rank 0 waits in the backward's all-reduce until
    parallel.timeout_minutes (15 s: room for a slow start on a loaded machine) and stops with one line
    naming rank 1 and the last checkpoint."""
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=6,
                                model="model:\n  hang_rank: 1\n  hang_at_step: 2\n  hang_seconds: 30\n")
    start = time.perf_counter()
    proc = subprocess.run(vtok_cmd("train", recipe, "data.batch_size=4", "parallel.timeout_minutes=0.25",
                                   "ckpt.every_steps=2", nproc=2), capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "step 3: a collective did not complete within parallel.timeout_minutes=0.25 (15 s): rank 1 stopped in " \
           "the forward of step 3" in proc.stderr, proc.stderr[-3000:]
    assert "step_000000002" in proc.stderr  # the last good checkpoint
    assert elapsed < 120, elapsed


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_is_needed(shards, tmp_path):
    """Checkpoints on a 160 KiB tmpfs: step 2's (~105 KiB) fits, step 4's does not. The run stops with
    one line naming the directory, the free space and the size needed; the partial step is removed,
    step 2 stays intact and a run on a larger disk resumes from it."""
    from vtok.train.checkpoint import verify_checkpoint

    disk = tmp_path / "small_disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=6)
        proc = subprocess.run(vtok_cmd("train", recipe, "data.batch_size=4", "ckpt.every_steps=2", f"ckpt.dir={disk}"),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = [line for line in proc.stderr.splitlines() if line.startswith("vtok: error:")]
        assert len(err) == 1 and f"checkpoint step 4 did not fit in {disk}: the disk is full (" in err[0], proc.stderr
        assert re.search(r"KiB free, a checkpoint needs 1\d\d\.\d KiB \(the size of step_000000002\)", err[0]), err[0]
        assert f"the previous checkpoint {disk / 'step_000000002'} is intact" in err[0]
        assert not list(disk.glob("*.tmp")) and verify_checkpoint(disk / "step_000000002") == ""
        run_vtok("train", recipe, "data.batch_size=4", f"ckpt.resume={disk / 'step_000000002'}",
                 f"ckpt.dir={tmp_path / 'large_disk'}")
        assert (tmp_path / "large_disk" / "step_000000006").is_dir()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_nan_steps_are_skipped_then_stop_the_run(shards, tmp_path):
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["mds"], "tiny-ae", tmp_path / "run", steps=6,
                                model="model:\n  nan_at_steps: [2]\n")
    run_vtok("train", recipe, "data.batch_size=4", nproc=2)
    metrics = {m["step"]: m for m in read_metrics(tmp_path / "run")}
    assert metrics[3]["main/skipped"] == 1.0 and metrics[3]["bad_steps_in_a_row"] == 1
    assert metrics[4]["main/skipped"] == 0.0 and metrics[6]["bad_steps_in_a_row"] == 0

    recipe = write_train_recipe(tmp_path / "r2.yaml", shards["mds"], "tiny-ae", tmp_path / "run2", steps=9,
                                model="model:\n  nan_at_steps: [4, 5, 6]\n")
    proc = subprocess.run(vtok_cmd("train", recipe, "train.max_bad_steps=3"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "3 steps in a row had a non-finite loss (last at step 7)" in proc.stderr
    assert "step_000000004" in proc.stderr, "names the last good checkpoint"
