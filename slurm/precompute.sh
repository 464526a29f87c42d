#!/usr/bin/env bash
# Any `vtok precompute` job on every GPU of every node, each rank taking its share of the shards:
#   sbatch --nodes=2 slurm/precompute.sh latents --vae models/sd-vae-ft-ema --data data/in1k/train \
#       --out data/in1k/latents_sdvae --resolution 256 --flip
#   sbatch slurm/precompute.sh text-emb --encoder models/t5-v1_1-xl --data data/cc12m --out data/cc12m_t5
# Jobs: codes | captions | text-emb | latents (see `vtok precompute JOB --help`).
# Resumes by itself: finished output shards are skipped, so a requeued job continues where it stopped.
# Two minutes before the time limit (--signal=B:USR1@120), or on SIGTERM, this script requeues the job;
# a preempted job is requeued by Slurm (--requeue). A job that fails (non-zero exit) is not requeued.
#SBATCH --job-name=vtok-precompute
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out
set -uo pipefail
job=${1:?usage: sbatch slurm/precompute.sh JOB ARGS...  (JOB: codes, captions, text-emb, latents)}
shift
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a spooled copy of this file: find launch.sh from the repo

step=""
requeue() {
  echo "[vtok] $1: requeueing ${SLURM_JOB_ID:-?} (finished shards are kept; the rerun skips them)"
  scontrol requeue "${SLURM_JOB_ID:?}"
  [ -n "$step" ] && kill -TERM "$step" 2>/dev/null
  exit 0
}
trap 'requeue "time limit near (SIGUSR1)"' USR1
trap 'requeue "SIGTERM"' TERM

echo "[vtok] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: precompute ${job} $*"
srun --kill-on-bad-exit=1 slurm/launch.sh vtok precompute "$job" "$@" &
step=$!
wait "$step"  # returns early when a trapped signal arrives, so the trap runs at once
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "[vtok] precompute ${job} failed (exit ${rc}); not requeueing" >&2
fi
exit "$rc"
