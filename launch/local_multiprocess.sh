#!/usr/bin/env bash
# Several "hosts" on this machine: P processes with D CPU devices each, one training job
# (jax.distributed on 127.0.0.1, gloo collectives). Process 0 logs; all output is prefixed [pN].
#
#   launch/local_multiprocess.sh P D [--dry-run] [train args...]
#   launch/local_multiprocess.sh 2 4 --config=configs/smoke.py --workdir=/tmp/smoke2x4
#
# If one process fails, the others are stopped (they would wait in a collective forever).
# Env: CLIP_JAX_PORT (default: a free port), PYTHON (default: python3),
#      CLIP_JAX_MODULE (default: clip_jax.train; e.g. clip_jax.evaluate).
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 PROCESSES DEVICES_PER_PROCESS [--dry-run] [train args...]" >&2
  exit 2
fi
P=$1
D=$2
shift 2
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
PYTHON=${PYTHON:-python3}
MODULE=${CLIP_JAX_MODULE:-clip_jax.train}
PORT=${CLIP_JAX_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

source "$(dirname "$0")/lib.sh"
FLAGS=$(host_xla_flags "$D")  # the caller's other XLA flags are kept
ALLOCATOR=$(cpu_allocator_env) || exit 2  # tcmalloc where installed, else glibc's malloc keeping freed memory

command_for() {  # the command of process $1 (train args follow), as one printable line
  local i=$1
  shift
  printf 'XLA_FLAGS=%q CLIP_JAX_COORDINATOR=127.0.0.1:%s CLIP_JAX_NUM_PROCESSES=%s CLIP_JAX_PROCESS_ID=%s %q -m %s' \
    "$FLAGS" "$PORT" "$P" "$i" "$PYTHON" "$MODULE"
  printf ' %q' "$@"
  printf '\n'
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < P; i++)); do command_for "$i" "$@"; done
  exit 0
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
# SIGTERM/SIGINT (a preemption notice, scancel, Ctrl-C): pass SIGTERM on and wait, so every
# process checkpoints at the same step (the trainer's preemption handling) before it exits.
forward() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait || true; exit 143; }
trap forward TERM INT
for ((i = 0; i < P; i++)); do
  (
    export XLA_FLAGS=$FLAGS
    export CLIP_JAX_COORDINATOR=127.0.0.1:$PORT CLIP_JAX_NUM_PROCESSES=$P CLIP_JAX_PROCESS_ID=$i
    while read -r kv; do export "${kv?}"; done <<< "$ALLOCATOR"
    exec "$PYTHON" -m "$MODULE" "$@" > >(sed -u "s/^/[p$i] /") 2>&1
  ) &
  pids+=($!)
done

status=0
while ((${#pids[@]})); do  # poll: stop everything as soon as one process fails
  for k in "${!pids[@]}"; do
    if ! kill -0 "${pids[k]}" 2>/dev/null; then
      code=0
      wait "${pids[k]}" || code=$?
      unset 'pids[k]'
      if ((code != 0)); then
        echo "local_multiprocess: a process exited with status $code; stopping the others" >&2
        status=$code
        cleanup
        wait || true
        pids=()
        break
      fi
    fi
  done
  sleep 0.5
done
exit $status
