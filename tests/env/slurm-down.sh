#!/usr/bin/env bash
# Stop the private Slurm test cluster that tests/env/slurm-up.sh started under DIR.
#
#   bash tests/env/slurm-down.sh DIR
#
# Stops that DIR's slurmd's and slurmctld by the PID files they wrote under DIR/run (SIGTERM, then
# SIGKILL after 10 s). A PID file is trusted only if the process's command line names
# DIR/slurm.conf, so stale PID files never hit an unrelated process. Nothing else is touched:
# no job is cancelled, munged keeps running (it may serve another cluster), and DIR stays
# (state, logs and job-completion records remain for inspection and for the next slurm-up.sh).
# Job steps that are still running keep running under their slurmstepd, as on a real cluster
# whose slurmd restarts; cancel them with scancel before calling this if that matters.
set -euo pipefail

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $0 DIR" >&2; exit 2; }
log() { echo "slurm-down: $*" >&2; }

if [ ! -d "$1" ]; then log "$1 does not exist: nothing to stop"; exit 0; fi
DIR=$(cd "$1" && pwd -P)
CONF="$DIR/slurm.conf"
GRACE=${SLURM_DOWN_GRACE:-10}

pid_of() {  # pid_of PIDFILE -> prints pid if it is a live daemon started with -f $CONF
  local f=$1 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$CONF" || return 1
  echo "$pid"
}

pids=()
shopt -s nullglob
# slurmd's first, then slurmctld (the controller would otherwise briefly see its nodes vanish).
for f in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid; do
  if pid=$(pid_of "$f"); then
    log "SIGTERM $(basename "$f" .pid) (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid:$f")
  else
    log "$(basename "$f" .pid) not running (stale PID file removed)"
    rm -f "$f"
  fi
done

alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

deadline=$((SECONDS + GRACE))
for entry in "${pids[@]}"; do
  pid=${entry%%:*}; f=${entry#*:}
  while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if alive "$pid"; then
    # Re-check identity right before the SIGKILL: the pid could in theory have been reused.
    if tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$CONF"; then
      log "pid $pid still alive after ${GRACE}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    fi
  fi
  rm -f "$f"
done
log "stopped Slurm daemons of $DIR"
