#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes an sbatch script and submits it.
#
#   launch/slurm.sh --nodes=N [--gpus-per-node=8] [--partition=P] [--account=A] [--time=HH:MM:SS]
#                   [--job-name=clip_jax] [--python=python3] [--perf-flags] [--dry-run] -- TRAIN_ARGS...
#   launch/slurm.sh --nodes=2 --partition=gpu -- --config=configs/clip_paper.py:ViT-B-16 \
#                   --workdir=/shared/runs/vitb16 --config.data.train='tfrecord:/shared/laion/*.tfrecord'
#
# One srun task per node drives all of that node's GPUs; clip_jax.parallel.distributed sees an srun task
# of a multi-task job and lets JAX read the SLURM variables (coordinator = the first node).
# Ten minutes before the time limit SLURM sends SIGTERM to the tasks: the trainer checkpoints at
# that step (all nodes agree on it) and exits. A job the scheduler preempts is requeued
# (--requeue); one that reached its time limit is resubmitted with the same script
# (WORKDIR/clip_jax.sbatch); either way the run resumes from its checkpoint. The workdir must be
# on storage every node sees. Logs: WORKDIR/slurm-JOBID.out. --dry-run prints the script and
# the sbatch command instead of submitting. --perf-flags prepends GPU_PERF_XLA_FLAGS (launch/lib.sh:
# collectives overlapped with compute; unmeasured here) to the job's XLA_FLAGS.
set -euo pipefail
NODES="" GPUS=8 PARTITION="" ACCOUNT="" TIME="24:00:00" NAME="clip_jax" PY="python3" DRY_RUN=0 PERF=0
while (($#)); do
  case $1 in
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPUS=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --job-name=*) NAME=${1#*=} ;;
    --python=*) PY=${1#*=} ;;
    --perf-flags) PERF=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "slurm.sh: unknown option '$1' (train arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
TRAIN_ARGS=("$@")
fail() { echo "slurm.sh: $*" >&2; exit 2; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || fail "--nodes=N is required (a positive integer)"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || fail "--gpus-per-node must be a positive integer, got '$GPUS'"
source "$(dirname "$0")/lib.sh"
WORKDIR=$(train_workdir "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
[[ -n $WORKDIR ]] || fail "pass the train arguments after --, at least --config=... and --workdir=..."
REPO=$(cd "$(dirname "$0")/.." && pwd)

script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --exclusive"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --signal=TERM@600"
  echo "#SBATCH --requeue"
  echo "#SBATCH --output=$WORKDIR/slurm-%j.out"
  [[ -n $PARTITION ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n $ACCOUNT ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "set -euo pipefail"
  echo "cd $(printf '%q' "$REPO")"
  [[ $PERF == 1 ]] && echo "export XLA_FLAGS=\"$GPU_PERF_XLA_FLAGS \${XLA_FLAGS:-}\""
  printf 'srun --kill-on-bad-exit=1 %q -m clip_jax.train' "$PY"
  printf ' %q' "${TRAIN_ARGS[@]}"
  printf '\n'
}

if [[ $DRY_RUN == 1 ]]; then
  script
  echo "# submit with:"
  echo "mkdir -p $(printf '%q' "$WORKDIR") && sbatch SCRIPT"
  exit 0
fi
command -v sbatch >/dev/null || fail "sbatch not found: run this on a SLURM login node"
mkdir -p "$WORKDIR"
FILE="$WORKDIR/clip_jax.sbatch"
script > "$FILE"
sbatch "$FILE"
