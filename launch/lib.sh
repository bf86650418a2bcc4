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
