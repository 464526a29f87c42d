"""A real one-host Slurm cluster running `sbatch slurm/train_tokenizer.sh` (opt-in, needs root).

Run by hand on a machine where you are root:

    apt-get install -y slurm-wlm munge
    VTOK_SLURM_TEST=1 python -m pytest -q tests/test_slurm_cluster.py

The test writes its own slurm.conf, starts munged, slurmctld and slurmd on free ports under a temp
dir, submits the real sbatch scripts, and stops the daemons afterwards. It is skipped otherwise
(CI's set-up installs Python packages only; see the README).
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_metrics, write_train_recipe

pytestmark = pytest.mark.skipif(
    os.environ.get("VTOK_SLURM_TEST") != "1" or os.geteuid() != 0
    or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")),
    reason="opt-in: needs root, slurm-wlm and munge, and VTOK_SLURM_TEST=1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "munge", "logs"):
        (d / sub).mkdir()
    key = d / "munge" / "munge.key"
    shutil.copy("/etc/munge/munge.key", key)
    key.chmod(0o600)
    sock = d / "munge" / "munge.sock"
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                    f"--seed-file={d}/munge/seed"], check=True)
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=vtoktest", f"SlurmctldHost={host}(127.0.0.1)", "AuthType=auth/munge",
        f"AuthInfo=socket={sock}", "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1", "VTOK_NPROC_PER_NODE": "2",
           "PYTHONPATH": str(ROOT / "tests"), "VTOK_PLUGINS": "tiny_tasks", "VTOK_RDZV_PORT": str(free_port())}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    deadline = time.time() + 30
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                       text=True).stdout:
        assert time.time() < deadline, (d / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    yield env, d
    subprocess.run(["scancel", "--full", "--partition=debug"], env=env)
    time.sleep(2)  # let slurmd reap the cancelled steps before it stops
    pids = [int(p.read_text().split()[0]) for p in (d / "slurmd.pid", d / "slurmctld.pid",
                                                     d / "munge" / "munged.pid") if p.is_file()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


def sbatch(env, d, recipe, *overrides) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2",
                          f"--output={d}/logs/%j.out", "--time=10", "slurm/train_tokenizer.sh", recipe,
                          "data.batch_size=4", *overrides], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]


def job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def wait(cond, timeout=180, what=""):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sbatch_train_to_completion(cluster, shards, tmp_path):
    env, d = cluster
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["wds"], "tiny-ae", tmp_path / "run", steps=6)
    Path(recipe).write_text(Path(recipe).read_text().replace("format: mds", "format: wds"))
    job = sbatch(env, d, recipe)
    wait(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", ""), what="job end")
    log = (d / "logs" / f"{job}.out").read_text()
    assert job_field(env, job, "JobState") in ("COMPLETED", ""), log[-3000:]
    assert "complete at step 6" in log and (tmp_path / "run" / "COMPLETE").is_file()


def test_usr1_saves_requeues_and_resumes(cluster, shards, tmp_path):
    env, d = cluster
    recipe = write_train_recipe(tmp_path / "r.yaml", shards["wds"], "tiny-ae", tmp_path / "run", steps=100000)
    Path(recipe).write_text(Path(recipe).read_text().replace("format: mds", "format: wds"))
    job = sbatch(env, d, recipe, "ckpt.every_steps=1000000")
    wait(lambda: (tmp_path / "run" / "metrics.jsonl").is_file(), what="training to start")
    time.sleep(2)
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)  # as --signal=USR1@120 does
    wait(lambda: job_field(env, job, "Restarts") == "1", what="the requeue")
    ckpts = [p for p in (tmp_path / "run" / "checkpoints").glob("step_*") if (p / "meta.json").is_file()]
    assert len(ckpts) == 1
    saved = int(ckpts[0].name.split("_")[1])
    # Skip Slurm's ~2 min requeue delay, once the old instance's credential has expired (starting
    # at once can hit "Job credential revoked").
    wait(lambda: job_field(env, job, "JobState") == "PENDING", what="the requeued job to pend")
    time.sleep(10)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    wait(lambda: any(m["step"] > saved for m in read_metrics(tmp_path / "run")), what="the resumed run")
    subprocess.run(["scancel", job], env=env, check=True)
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert saved + 1 in steps[steps.index(saved) + 1:], "the requeued job resumed after the checkpoint"
