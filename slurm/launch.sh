#!/usr/bin/env bash
# Per-node launcher, run by `srun` once per node: computes torchrun's rendezvous from SLURM_* and
# starts one worker per GPU. Usage (from an sbatch script): srun slurm/launch.sh vtok train RECIPE ...
#
# Reads: SLURM_JOB_NODELIST (head node = first of `scontrol show hostnames`), SLURM_NNODES,
# SLURM_NODEID, SLURM_JOB_ID (rendezvous id), SLURM_GPUS_ON_NODE; VTOK_NPROC_PER_NODE and
# VTOK_RDZV_PORT (default 29500) override. VTOK_MAX_RESTARTS (default 0): when a worker dies (an OOM
# kill, a GPU fault, a node's crash seen by the others as a broken collective), every node's torchrun
# exits non-zero and this script starts it again, up to this many times; `vtok train` resumes from the
# last checkpoint. The restart is counted here, once per failure on every node, and attempt N meets on
# rendezvous port + N with id JOB-N, so all nodes agree on it. (torchrun's own --max-restarts does not
# work across nodes: each agent counts restarts itself and workers of different counts never meet.)
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
rdzv() {  # torchrun's options for restart attempt $1: a fresh rendezvous every time
  echo --nnodes="${nnodes}" --nproc_per_node="${nproc}" --node_rank="${node_rank}" --rdzv_backend=c10d \
    --rdzv_endpoint="${head_node}:$((port + $1))" --rdzv_id="${SLURM_JOB_ID:-vtok}-$1"
}
restarts=${VTOK_MAX_RESTARTS:-0}
if [ "${restarts}" -eq 0 ]; then
  # shellcheck disable=SC2046
  exec torchrun $(rdzv 0) "$@"
fi
# With restarts this shell stays: it must not die of the SIGTERM a preemption sends the whole step
# before torchrun's workers have saved (its handler is reset in torchrun, unlike an ignored signal).
stopping=0
trap 'stopping=1' TERM INT
for ((attempt = 0; ; attempt++)); do
  # shellcheck disable=SC2046
  torchrun $(rdzv "${attempt}") "$@" &
  child=$!
  rc=0
  wait "${child}" || rc=$?
  while kill -0 "${child}" 2>/dev/null; do  # a trapped signal ended the wait, not torchrun
    rc=0
    wait "${child}" || rc=$?
  done
  if [ "${rc}" -eq 0 ] || [ "${stopping}" -eq 1 ] || [ "${attempt}" -ge "${restarts}" ]; then
    exit "${rc}"
  fi
  echo "[launch] node ${node_rank}: torchrun exited ${rc}; restart $((attempt + 1)) of ${restarts}" \
    "(rendezvous ${head_node}:$((port + attempt + 1)))" >&2
done
