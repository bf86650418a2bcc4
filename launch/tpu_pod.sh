#!/usr/bin/env bash
# Cloud TPU pod slices (v4, v5e, v5p, v6e): create, set up, train, watch, stop, delete.
#
#   launch/tpu_pod.sh ACTION --name=NAME --zone=ZONE [options] [-- TRAIN_ARGS...]
#
#   launch/tpu_pod.sh run --name=clip-b16 --zone=us-central2-b --accelerator=v4-32 --spot -- \
#       --config=configs/clip_paper.py:ViT-B-16 --workdir=gs://my-bucket/runs/b16 \
#       --config.data.train='tfrecord:gs://my-bucket/laion/*.tfrecord'
#
# ACTION
#   create  request the slice as a queued resource; wait until it is ACTIVE
#   setup   put the code on every worker (a copy of this checkout, or --code=git:URL@REF) and
#           install it with jax[tpu]
#   train   start clip_jax.train on every worker, detached from ssh (launch/tpu_worker.sh);
#           CLIP_JAX_DISTRIBUTED=1 makes each one join the job (JAX finds its TPU peers)
#   logs    stream worker 0's log (the job's log: only process 0 logs) and append it to
#           LOG_DIR/NAME.log
#   status  the queued resource's state and every worker's training status
#   stop    SIGTERM on every worker: the run checkpoints at the current step and exits
#   delete  delete the queued resource and its slice
#   run     create + setup + train + logs, then watch every --poll seconds: when a spot slice
#           is preempted (queued resource SUSPENDED, or the trainer stopped on a preemption
#           notice) delete it, create it again and train on, which resumes from the workdir's
#           latest checkpoint. When training finished, delete the slice (unless --keep). A run
#           that failed is not retried: the last lines of each worker's log are printed.
#
# Options
#   --accelerator=TYPE  v4-32, v5e-256 (= v5litepod-256), v5p-128, v6e-64, ...
#   --runtime=VERSION   default by generation: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
#                       v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --spot | --reserved capacity (default on-demand)
#   --project=PROJECT   default: gcloud's configured project
#   --code=copy | git:URL[@REF]   default copy (tracked and untracked, not ignored, files)
#   --python=python3    the workers' python
#   --perf-flags        train with LIBTPU_INIT_ARGS=TPU_PERF_LIBTPU_ARGS (launch/lib.sh: async
#                       collectives overlapped with compute; unmeasured here)
#   --log-dir=DIR       default ./tpu_logs
#   --poll=SECONDS      default 60;  --max-restarts=N  default 20;  --keep
#   --dry-run           print the commands instead of running them
# The workdir must be on Cloud Storage (gs://...): every worker writes its share of each
# checkpoint there, and it outlives a preempted slice. Env: GCLOUD (default gcloud).
set -euo pipefail
ACTION=${1:-}
[[ -n $ACTION && $ACTION != -* ]] && shift || ACTION=""
NAME="" ZONE="" ACCEL="" RUNTIME="" CAPACITY="" PROJECT="" CODE="copy" PY="python3"
LOG_DIR="tpu_logs" POLL=60 MAX_RESTARTS=20 KEEP=0 DRY_RUN=0 PERF=0
fail() { echo "tpu_pod.sh: $*" >&2; exit 2; }
while (($#)); do
  case $1 in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator=*) ACCEL=${1#*=} ;;
    --runtime=*) RUNTIME=${1#*=} ;;
    --spot) CAPACITY="--spot" ;;
    --reserved) CAPACITY="--reserved" ;;
    --project=*) PROJECT=${1#*=} ;;
    --code=*) CODE=${1#*=} ;;
    --python=*) PY=${1#*=} ;;
    --log-dir=*) LOG_DIR=${1#*=} ;;
    --poll=*) POLL=${1#*=} ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=} ;;
    --keep) KEEP=1 ;;
    --perf-flags) PERF=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) fail "unknown option '$1' (train arguments go after --)" ;;
  esac
  shift
done
TRAIN_ARGS=("$@")
case $ACTION in
  create|setup|train|logs|status|stop|delete|run) ;;
  *) fail "usage: $0 create|setup|train|logs|status|stop|delete|run --name=NAME --zone=ZONE [options] [-- TRAIN_ARGS]" ;;
esac
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || fail "--name=NAME is required (lowercase letters, digits and '-')"
[[ -n $ZONE ]] || fail "--zone=ZONE is required (e.g. us-central2-b for v4, us-west4-a for v5e)"
[[ $POLL =~ ^[0-9]+([.][0-9]+)?$ ]] || fail "--poll must be a number of seconds, got '$POLL'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || fail "--max-restarts must be a non-negative integer, got '$MAX_RESTARTS'"

# --- the slice: accelerator type -> gcloud's name, chips, hosts, default runtime -------------
CHIPS=0 HOSTS=0
if [[ $ACTION == create || $ACTION == run ]]; then
  [[ $ACCEL =~ ^(v4|v5e|v5litepod|v5p|v6e)-([1-9][0-9]*)$ ]] ||
    fail "--accelerator=TYPE is required: v4-N, v5e-N (or v5litepod-N), v5p-N or v6e-N, got '$ACCEL'"
  GEN=${BASH_REMATCH[1]} N=${BASH_REMATCH[2]}
  case $GEN in
    v4|v5p) CHIPS=$((N / 2)); HOSTS=$(( CHIPS > 4 ? CHIPS / 4 : 1 )) ;;  # N counts TensorCores, 2 per chip
    v5e|v5litepod|v6e) CHIPS=$N; HOSTS=$(( N > 8 ? N / 4 : 1 )) ;;     # N counts chips
  esac
  [[ $GEN == v5e ]] && ACCEL="v5litepod-$N" && GEN=v5litepod
  if [[ -z $RUNTIME ]]; then
    case $GEN in
      v4) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p) RUNTIME=v2-alpha-tpuv5 ;;
      v6e) RUNTIME=v2-alpha-tpuv6e ;;
    esac
  fi
fi
if [[ $ACTION == train || $ACTION == run ]]; then
  source "$(dirname "$0")/lib.sh"
  WORKDIR=$(train_workdir "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  [[ -n $WORKDIR ]] || fail "pass the train arguments after --, at least --config=... and --workdir=gs://..."
  [[ $WORKDIR == gs://* ]] || fail "--workdir=$WORKDIR: on a pod the workdir must be on Cloud Storage (gs://BUCKET/...): every worker writes its share of the checkpoints there, and it must outlive a preempted slice"
fi
case $CODE in
  copy) ;;
  git:*) REPO_URL=${CODE#git:}; REF=main
         if [[ $REPO_URL =~ ^(.+)@([^@/:]+)$ ]]; then REPO_URL=${BASH_REMATCH[1]}; REF=${BASH_REMATCH[2]}; fi ;;
  *) fail "--code must be 'copy' or 'git:URL[@REF]', got '$CODE'" ;;
esac

GCLOUD=${GCLOUD:-gcloud}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SCOPE=(--zone="$ZONE")
[[ -n $PROJECT ]] && SCOPE+=(--project="$PROJECT")
REMOTE_DIR='~/clip_jax'  # expanded by the workers' shell
WORKER="bash $REMOTE_DIR/launch/tpu_worker.sh"
TARBALL="${TMPDIR:-/tmp}/clip_jax-$NAME.tgz"
DESCRIBE=("$GCLOUD" compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" --format='value(state.state)')
SSH=("$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}")
STATUS="if [ -f $REMOTE_DIR/launch/tpu_worker.sh ]; then $WORKER status; else echo no-code; fi"

say() { echo "tpu_pod.sh: $*" >&2; }
q() {  # shell-quote one word readably: bare if safe, else '...' or "..."
  if [[ $1 =~ ^[-A-Za-z0-9_./:=@,+%]+$ ]]; then printf '%s' "$1"
  elif [[ $1 != *"'"* ]]; then printf "'%s'" "$1"
  elif [[ $1 != *[\"\$\`\\!]* ]]; then printf '"%s"' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qq() {  # the same, preferring "..." (for words inside a remote command, which show() wraps in '...')
  if [[ $1 =~ ^[-A-Za-z0-9_./:=@,+%]+$ || $1 == *[\"\$\`\\!]* ]]; then q "$1"; else printf '"%s"' "$1"; fi
}
show() { q "$1"; shift; local a; for a in "$@"; do printf ' '; q "$a"; done; printf '\n'; }
cmd() {  # run a command, or print it under --dry-run
  if [[ $DRY_RUN == 1 ]]; then show "$@"; else "$@"; fi
}
ssh_workers() {  # ssh_workers WORKER COMMAND: one command on one worker or on all of them
  cmd "${SSH[@]}" --worker="$1" --command="$2"
}
qr_state() {  # the queued resource's state; empty when there is none
  "${DESCRIBE[@]}" 2>/dev/null || true
}

do_create() {
  say "requesting $ACCEL ($CHIPS chips on $HOSTS hosts, runtime $RUNTIME${CAPACITY:+, ${CAPACITY#--}}) as queued resource $NAME"
  cmd "$GCLOUD" compute tpus queued-resources create "$NAME" --node-id="$NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${CAPACITY:+"$CAPACITY"}
  if [[ $DRY_RUN == 1 ]]; then
    echo "# then every ${POLL}s until ACTIVE (FAILED stops):"
    show "${DESCRIBE[@]}"
    return
  fi
  local state
  while :; do
    state=$(qr_state)
    case $state in
      ACTIVE) say "$NAME is ACTIVE"; return ;;
      FAILED|SUSPENDED) say "queued resource $NAME is $state"; return 1 ;;
    esac
    say "$NAME: ${state:-not visible yet}; waiting"
    sleep "$POLL"
  done
}

do_setup() {
  if [[ $CODE == copy ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      echo "# this checkout's tracked and untracked (not ignored) files:"
      echo "git -C $(q "$REPO") ls-files -z --cached --others --exclude-standard | tar czf $(q "$TARBALL") -C $(q "$REPO") --null -T -"
    else
      git -C "$REPO" ls-files -z --cached --others --exclude-standard | tar czf "$TARBALL" -C "$REPO" --null -T -
    fi
    cmd "$GCLOUD" compute tpus tpu-vm scp "$TARBALL" "$NAME:clip_jax.tgz" "${SCOPE[@]}" --worker=all
    ssh_workers all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf ~/clip_jax.tgz -C $REMOTE_DIR"
  else
    ssh_workers all "rm -rf $REMOTE_DIR && git clone -q $(qq "$REPO_URL") $REMOTE_DIR && git -C $REMOTE_DIR checkout -q $(qq "$REF")"
  fi
  ssh_workers all "cd $REMOTE_DIR && $(qq "$PY") -m pip install -q -e \".[data]\" \"jax[tpu]\" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

do_train() {
  local quoted
  quoted=$(for a in "${TRAIN_ARGS[@]}"; do printf ' '; qq "$a"; done)
  local env="PYTHON=$(qq "$PY")"
  [[ $PERF == 1 ]] && env="LIBTPU_INIT_ARGS=$(qq "$TPU_PERF_LIBTPU_ARGS") $env"
  ssh_workers all "cd $REMOTE_DIR && $env $WORKER start$quoted"
}

do_logs() {  # streams until the connection ends (the slice stops, or Ctrl-C)
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s | tee -a %s\n' "$(ssh_workers 0 "tail -n +1 -F ~/clip_jax_train.log")" "$(q "$LOG_DIR/$NAME.log")"
  else
    mkdir -p "$LOG_DIR"
    ssh_workers 0 "tail -n +1 -F ~/clip_jax_train.log" | tee -a "$LOG_DIR/$NAME.log"
  fi
}

do_delete() {
  cmd "$GCLOUD" compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
}

worker_status() {  # worker 0's training status (the job's: its processes end together), "no-code" or "unreachable"
  local out
  out=$("${SSH[@]}" --worker=0 --command="$STATUS" 2>/dev/null) \
    && [[ -n $out ]] && echo "${out##*$'\n'}" || echo unreachable
}

do_run() {
  if [[ $DRY_RUN == 1 ]]; then
    do_create; do_setup; do_train; do_logs
    echo "# then every ${POLL}s: the queued resource's state and worker 0's training status:"
    show "${DESCRIBE[@]}"
    ssh_workers 0 "$STATUS"
    echo "# preempted: delete, create, setup and train again (the run resumes from its checkpoint):"
    do_delete
    if [[ $KEEP == 1 ]]; then echo "# finished: --keep, the slice stays"; else echo "# finished:"; do_delete; fi
    return
  fi
  local restarts=0 state fresh st tail_pid=""
  trap '[[ -n $tail_pid ]] && kill $tail_pid 2>/dev/null; exit 130' INT TERM
  while :; do
    state=$(qr_state) fresh=0
    case $state in
      ACTIVE) ;;
      "") do_create || { sleep "$POLL"; continue; }; fresh=1 ;;
      WAITING_FOR_RESOURCES|PROVISIONING|ACCEPTED|CREATING) say "$NAME: $state; waiting"; sleep "$POLL"; continue ;;
      SUSPENDING|SUSPENDED|FAILED)
        say "queued resource $NAME is $state: deleting it to request the slice again"
        do_delete || true
        continue ;;
      *) say "queued resource $NAME is $state: waiting"; sleep "$POLL"; continue ;;
    esac
    st=none
    [[ $fresh == 1 ]] || st=$(worker_status)
    if [[ $fresh == 1 || $st == no-code ]]; then
      do_setup || { say "setup failed; retrying"; sleep "$POLL"; continue; }
      st=none
    fi
    if [[ $st != running ]]; then
      do_train || { say "could not start training; retrying"; sleep "$POLL"; continue; }
    fi
    do_logs & tail_pid=$!
    while :; do
      sleep "$POLL"
      st=$(worker_status)
      [[ $st == running ]] && continue
      [[ $st == unreachable && $(qr_state) == ACTIVE ]] && continue  # a dropped connection, not the slice
      break
    done
    kill "$tail_pid" 2>/dev/null || true; wait "$tail_pid" 2>/dev/null || true; tail_pid=""
    case $st in
      finished)
        say "training finished"
        [[ $KEEP == 1 ]] || do_delete
        return 0 ;;
      failed*)
        say "training ${st}: the last lines of every worker's log follow; the slice is kept for inspection"
        ssh_workers all "tail -n 30 ~/clip_jax_train.log" || true
        return 1 ;;
    esac
    restarts=$((restarts + 1))
    if ((restarts > MAX_RESTARTS)); then
      say "preempted $restarts times (--max-restarts=$MAX_RESTARTS): giving up; the workdir holds the latest checkpoint"
      return 1
    fi
    say "the slice was preempted ($st, queued resource: $(qr_state)); restart $restarts of at most $MAX_RESTARTS"
  done
}

case $ACTION in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) do_logs ;;
  status)
    if [[ $DRY_RUN == 1 ]]; then
      show "${DESCRIBE[@]}"
    else
      echo "queued resource $NAME: $(qr_state)"
    fi
    ssh_workers all "$WORKER status" ;;
  stop) ssh_workers all "$WORKER stop" ;;
  delete) do_delete ;;
  run) do_run ;;
esac
