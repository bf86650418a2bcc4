#!/usr/bin/env bash
# Runs ON each Cloud TPU VM worker (launch/tpu_pod.sh calls it over ssh --worker=all), from the
# code directory. It keeps the training detached from the ssh session, so a dropped connection
# on the launching side does not stop the run.
#
#   bash launch/tpu_worker.sh start [train args...]  # start clip_jax.train unless it already runs
#   bash launch/tpu_worker.sh status                 # none | running | finished | preempted | failed N
#   bash launch/tpu_worker.sh stop                   # SIGTERM: checkpoint at the current step, exit
#
# Files: ~/clip_jax_train.log (this worker's output; process 0 holds the job's log),
#        ~/clip_jax_train.pid, ~/clip_jax_train.exit (the exit status once it ended).
# Env: PYTHON (default python3), CLIP_JAX_STATE_DIR (default $HOME).
set -euo pipefail
STATE=${CLIP_JAX_STATE_DIR:-$HOME}
LOG=$STATE/clip_jax_train.log PID=$STATE/clip_jax_train.pid EXIT=$STATE/clip_jax_train.exit
FROM=$STATE/clip_jax_train.from
PY=${PYTHON:-python3}

running() { [[ -f $PID ]] && kill -0 "$(cat "$PID")" 2>/dev/null; }

case ${1:-} in
  start)
    shift
    if running; then
      echo "tpu_worker: clip_jax.train already runs (pid $(cat "$PID")); not starting another"
      exit 0
    fi
    rm -f "$EXIT"
    echo "=== $(date -u +%FT%TZ) start on $(hostname): $*" >> "$LOG"
    wc -l < "$LOG" > "$FROM"  # this run's part of the log starts after that line
    # setsid + nohup: outlives the ssh session. The exit status is written when training ends.
    CLIP_JAX_DISTRIBUTED=1 setsid nohup bash -c '
      "$1" -m clip_jax.train "${@:4}" >> "$2" 2>&1 &
      echo $! > "$3.pid.tmp" && mv "$3.pid.tmp" "$3.pid"
      wait $!
      echo $? > "$3.exit"' _ "$PY" "$LOG" "$STATE/clip_jax_train" "$@" < /dev/null > /dev/null 2>&1 &
    for _ in $(seq 50); do [[ -f $PID ]] && break; sleep 0.1; done
    echo "tpu_worker: started clip_jax.train (pid $(cat "$PID" 2>/dev/null || echo '?')), log $LOG"
    ;;
  status)
    if running; then
      echo running
    elif [[ -f $EXIT ]]; then
      code=$(cat "$EXIT")
      # The trainer exits 0 after a preemption notice too: its log says which it was.
      if [[ $code == 0 ]] && tail -n "+$(($(cat "$FROM" 2>/dev/null || echo 0) + 1))" "$LOG" |
          grep -q "preemption notice (SIGTERM)"; then
        echo preempted
      elif [[ $code == 0 ]]; then
        echo finished
      else
        echo "failed $code"
      fi
    else
      echo none
    fi
    ;;
  stop)
    if running; then
      kill -TERM "$(cat "$PID")"
      echo "tpu_worker: sent SIGTERM to clip_jax.train (pid $(cat "$PID")): it checkpoints and exits"
    else
      echo "tpu_worker: clip_jax.train is not running"
    fi
    ;;
  *)
    echo "usage: $0 start [train args...] | status | stop" >&2
    exit 2
    ;;
esac
