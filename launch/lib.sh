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
