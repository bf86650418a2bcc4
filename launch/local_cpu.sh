#!/usr/bin/env bash
# One training process on this machine's CPU, with D simulated devices (default 1).
#
#   launch/local_cpu.sh [--devices=D] [--dry-run] [train args...]
#   launch/local_cpu.sh                                   # the smoke run in /tmp/clip_smoke
#   launch/local_cpu.sh --devices=8 --workdir=/tmp/mesh8 # the same on an 8-device mesh
#
# Without --config, configs/smoke.py; without --workdir, /tmp/clip_smoke. Other XLA flags of
# the caller are kept. The allocator: tcmalloc where installed, else glibc's malloc set to keep
# freed memory (cpu_allocator_env in launch/lib.sh). On Intel CPUs the train step's matmuls go
# through oneDNN (--onednn_dots=auto|on|off, a flag of the train CLI; clip_jax/cpu/onednn.py).
# Env: PYTHON (default: python3), CLIP_JAX_TCMALLOC (a library path, or 0 for glibc's malloc).
set -euo pipefail
cd "$(dirname "$0")/.."
D=1
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case $arg in
    --devices=*) D=${arg#--devices=} ;;
    --dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [[ ! $D =~ ^[1-9][0-9]*$ ]]; then
  echo "local_cpu: --devices must be a positive integer, got '$D'" >&2
  exit 2
fi
[[ " ${ARGS[*]-} " == *" --config="* ]] || ARGS=(--config=configs/smoke.py "${ARGS[@]+"${ARGS[@]}"}")
[[ " ${ARGS[*]} " == *" --workdir="* ]] || ARGS+=(--workdir=/tmp/clip_smoke)
source launch/lib.sh
FLAGS=$(host_xla_flags "$D")
ALLOCATOR=$(cpu_allocator_env) || exit 2
mapfile -t ALLOCATOR <<< "$ALLOCATOR"
CMD=(env "XLA_FLAGS=$FLAGS" JAX_PLATFORMS=cpu CLIP_JAX_DISTRIBUTED=0 "${ALLOCATOR[@]}" "${PYTHON:-python3}" -m clip_jax.train
     "${ARGS[@]}")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${CMD[@]}" | sed 's/ $//'
  printf '\n'
  exit 0
fi
exec "${CMD[@]}"
