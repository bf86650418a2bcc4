# Helpers the launch scripts source (not run on its own).

# The --workdir of a train command line, printed; nothing when --config or --workdir is missing.
train_workdir() {
  local a workdir="" config=0
  for a in "$@"; do
    case $a in
      --workdir=*) workdir=${a#--workdir=} ;;
      --config=*) config=1 ;;
    esac
  done
  [[ $config == 1 ]] && printf '%s' "$workdir"
  return 0
}

# XLA_FLAGS for $1 simulated CPU devices: the caller's other XLA flags are kept, a device count
# of theirs is replaced.
host_xla_flags() {
  local other
  other=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +| +$//g; s/  +/ /g')
  printf '%s' "--xla_force_host_platform_device_count=$1${other:+ $other}"
}

# Opt-in (--perf-flags) compiler flags for multi-accelerator jobs, as the JAX/NVIDIA GPU
# performance guides and MaxText's TPU recipes give them. They let collectives (the gradient
# all-reduce, FSDP all-gathers / reduce-scatters) run asynchronously, overlapped with compute.
# Not yet measured on clip_jax (no GPU or TPU reachable when they were added): try them with
# python -m clip_jax.benchmark train before a long run. Unknown flags abort XLA at start-up, so
# a jaxlib/libtpu that dropped one fails fast rather than silently.
GPU_PERF_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true"
TPU_PERF_LIBTPU_ARGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"

# The host allocator of a CPU training process, as NAME=VALUE lines for `env`: tcmalloc preloaded
# where installed (CLIP_JAX_TCMALLOC=PATH picks one, =0 keeps glibc's malloc), else glibc's malloc
# told to keep freed memory (never mmap, never trim, one arena), so that a step reuses the memory
# of the step before instead of faulting it in again (clip_jax/cpu/allocator.py).
TCMALLOC_GLOBS="/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/*-linux-gnu/libtcmalloc.so.4 \
/usr/lib64/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc.so.4"
cpu_allocator_env() {
  local lib=${CLIP_JAX_TCMALLOC:-} p
  if [[ -n $lib && $lib != 0 && ! -f $lib ]]; then
    echo "CLIP_JAX_TCMALLOC=$lib is not a file: point it at libtcmalloc*.so, or set it to 0 for glibc's malloc" >&2
    return 2
  fi
  if [[ -z $lib ]]; then
    for p in $TCMALLOC_GLOBS; do
      if [[ -f $p ]]; then lib=$p; break; fi
    done
  fi
  if [[ -n $lib && $lib != 0 ]]; then
    printf '%s\n' "LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  else
    printf '%s\n' MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4611686018427387904 MALLOC_ARENA_MAX=1
  fi
}
