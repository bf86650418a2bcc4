#!/usr/bin/env bash
# The GPU side by side of docs/performance.md in one command: clip_jax's training step for the
# four models of the GPU targets, open_clip's on the same GPU (launch/open_clip_bench.py), and
# the largest ViT-B/16 batch of each.
#
#   launch/gpu_bench.sh prepare                         # with network: open_clip's wheels into .carry/wheels
#   launch/gpu_bench.sh run OUTDIR [PARTS] [--budget=S] # on the GPU machine, from the repo root
#
# PARTS: comma-separated, run in the order given, from clip, open_clip, max_batch, ab (default:
# all four; ab times scanned vs plain layers and cuDNN vs XLA attention for ViT-B/16 in paired
# rounds, for what to tune next). Every run has its own timeout inside --budget seconds (default
# 570, for a 600 s limit); a run that fails or runs out of time is logged and the next one goes
# on, and a run that no longer fits in what is left is skipped. Written to OUTDIR: bench.log
# (every run's output), figures.json (what was parsed from it) and summary.md (the table, also
# printed last).
#
# A GPU machine that has jax, flax, optax and torch but no open_clip and no network: run
# `prepare` where there is network, copy the checkout with .carry/ to the GPU machine, then
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .carry/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; \
#   bash launch/gpu_bench.sh run OUTDIR
# Env: PYTHON (default python3); CLIP_JAX_GPU_BENCH_SMOKE=1 runs tiny models and batches on
# whatever jax finds (the tests run it on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

prepare() {
  local wheels=.carry/wheels
  mkdir -p "$wheels"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels" open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 || exit 1
  du -sh .carry
}

if [[ ${1-} == prepare ]]; then
  prepare
  exit 0
fi
if [[ ${1-} != run || -z ${2-} ]]; then
  echo "usage: launch/gpu_bench.sh prepare | run OUTDIR [clip,open_clip,max_batch,ab] [--budget=SECONDS]" >&2
  exit 2
fi
OUTDIR=$2
PARTS=clip,open_clip,max_batch,ab
BUDGET=570
for arg in "${@:3}"; do
  case $arg in
    --budget=*) BUDGET=${arg#--budget=} ;;
    --*) echo "gpu_bench: unknown option $arg" >&2; exit 2 ;;
    *) PARTS=$arg ;;
  esac
done
for part in ${PARTS//,/ }; do
  case $part in clip|open_clip|max_batch|ab) ;; *) echo "gpu_bench: unknown part '$part' (clip, open_clip, max_batch, ab)" >&2; exit 2 ;; esac
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_bench: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; }
mkdir -p "$OUTDIR"
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1
# Compiles are cached across the runs of one machine (max_batch recompiles ViT-B/16's step).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/clip_jax_gpu_bench_cache}
# open_clip takes the whole GPU; let jax's pool take most of it too (default 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

if [[ ${CLIP_JAX_GPU_BENCH_SMOKE:-0} == 1 ]]; then
  CLIP_RUNS=("ViT-Tiny-test 16" "RN-Tiny-test 16")
  TRAIN_OPTS=(--steps=1 --repeats=1 --warmup=1)
  OC_SPECS=(ViT-B-32:16)
  MAX_BATCH=(--model=ViT-Tiny-test --memory_gib=0.1 --start=32 --multiple=32)
  OC_MAX_BATCH=(ViT-B-32 --start=16 --multiple=16)
  AB=(--model=ViT-Tiny-test --batch=16 --rounds=2 --steps=1 --warmup=1)
else
  # The GPU targets' models and batches; the configs scan the Transformer layers.
  CLIP_RUNS=("ViT-B-16 256" "ViT-B-32 512" "ViT-L-14 128" "RN50 256")
  TRAIN_OPTS=(--steps=10 --repeats=3 --warmup=3)
  OC_SPECS=(ViT-B-16:256 ViT-B-32:512 ViT-L-14:128 RN50:256 ViT-B-16:256:c)
  MAX_BATCH=(--model=ViT-B-16 --start=512 --multiple=64)
  OC_MAX_BATCH=(ViT-B-16 --start=512 --multiple=64)
  AB=(--model=ViT-B-16 --batch=256 --rounds=6 --steps=3 --warmup=2)
fi

# bench NAME MIN_SECONDS MAX_SECONDS CMD...: run CMD with a timeout inside the budget, into LOGS/NAME.
bench() {
  local name=$1 need=$2 most=$3
  shift 3
  local left=$((BUDGET - SECONDS - 15))
  if ((left < need)); then
    echo "== $name: skipped, ${left}s left of the budget (needs ${need}s)" | tee "$LOGS/$name.log"
    return
  fi
  ((left < most)) && most=$left
  echo "== $name (timeout ${most}s): $*" | tee "$LOGS/$name.log"
  local start=$SECONDS
  timeout --kill-after=10 "$most" "$@" >>"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOGS/$name.log"
  if ((rc == 0)); then  # the headline figures; the table at the end has them all
    grep -E '^(images/s|mfu|memory_gib|compile_s|max_batch_per_device|max_batch|\{|fastest|[a-z_]+\.speedup:)' "$LOGS/$name.log" | head -n 8
  else
    tail -n 6 "$LOGS/$name.log" | head -n 5
  fi
}

{
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$LOGS/00_machine.log"

for part in ${PARTS//,/ }; do
  case $part in
    clip)
      i=0
      for spec in "${CLIP_RUNS[@]}"; do
        read -r model batch <<<"$spec"
        i=$((i + 1))  # the logs sort in run order
        bench "clip_${i}_${model}_${batch}" 60 240 "$PY" -m clip_jax.benchmark train --model="$model" --batch="$batch" \
          --dtype=bfloat16 --scan "${TRAIN_OPTS[@]}"
      done ;;
    open_clip)
      if ! "$PY" -c "import open_clip, torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "== open_clip: skipped (needs a CUDA GPU and open_clip: launch/gpu_bench.sh prepare)" \
          | tee "$LOGS/open_clip.log"
      else
        bench open_clip 60 300 "$PY" launch/open_clip_bench.py --device=cuda "${OC_SPECS[@]}"
      fi ;;
    max_batch)
      bench max_batch_clip 90 300 "$PY" -m clip_jax.benchmark max_batch --dtype=bfloat16 --scan --run "${MAX_BATCH[@]}"
      if "$PY" -c "import open_clip, torch; assert torch.cuda.is_available()" 2>/dev/null; then
        bench max_batch_open_clip 30 180 "$PY" launch/open_clip_max_batch.py "${OC_MAX_BATCH[@]}"
      else
        echo "== max_batch_open_clip: skipped (needs a CUDA GPU and open_clip)" | tee "$LOGS/max_batch_open_clip.log"
      fi ;;
    ab)
      bench ab 120 240 "$PY" -m clip_jax.benchmark ab --dtype=bfloat16 "${AB[@]}" --variant=scan:scan=True \
        --variant=plain:scan=False --variant=xla_attention:scan=True,attn=xla ;;
  esac
done

cat "$LOGS"/*.log >"$OUTDIR/bench.log"
"$PY" launch/gpu_bench_summary.py "$LOGS" "$OUTDIR"
rm -rf "$LOGS"
