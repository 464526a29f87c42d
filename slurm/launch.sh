#!/usr/bin/env bash
# Per-node launcher, run by `srun` once per node: computes torchrun's rendezvous from SLURM_* and
# starts one worker per GPU. Usage (from an sbatch script): srun slurm/launch.sh vtok train RECIPE ...
#
# Reads: SLURM_JOB_NODELIST (head node = first of `scontrol show hostnames`), SLURM_NNODES,
# SLURM_NODEID, SLURM_JOB_ID (rendezvous id), SLURM_GPUS_ON_NODE; VTOK_NPROC_PER_NODE and
# VTOK_RDZV_PORT (default 29500) override. VTOK_MAX_RESTARTS (default 0): when a worker dies (an OOM
# kill, a GPU fault), torchrun restarts the workers up to this many times and `vtok train` resumes from
# the last checkpoint. Unreliable in vtok's drills (gloo reconnects failed; across nodes each agent
# counts restarts itself and workers of different counts never meet): prefer `sbatch --requeue`.
set -euo pipefail

# The whole list first, then its first line: `scontrol ... | head -n 1` under pipefail dies of SIGPIPE
# (exit 141, no message) whenever head closes the pipe before scontrol has written every name, and the
# other nodes then wait for this one in the rendezvous until they time out.
hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}")
head_node=${hosts%%$'\n'*}
nnodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
nproc=${VTOK_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
port=${VTOK_RDZV_PORT:-29500}

if [ "$#" -lt 1 ]; then
  echo "usage: srun slurm/launch.sh vtok <command> ..." >&2
  exit 2
fi
if [ "$1" = "vtok" ]; then
  shift
  set -- -m vtok.cli "$@"
fi

echo "[launch] node ${node_rank}/${nnodes} ($(hostname)): ${nproc} workers, rendezvous ${head_node}:${port}" >&2
# The agent ignores SIGUSR1 (Slurm's --signal goes to every process of the step); the workers
# install their own handler, save a checkpoint and exit 0, and the sbatch script requeues.
trap '' USR1
exec torchrun \
  --nnodes="${nnodes}" --nproc_per_node="${nproc}" --node_rank="${node_rank}" \
  --rdzv_backend=c10d --rdzv_endpoint="${head_node}:${port}" --rdzv_id="${SLURM_JOB_ID:-vtok}" \
  --max-restarts="${VTOK_MAX_RESTARTS:-0}" \
  "$@"
