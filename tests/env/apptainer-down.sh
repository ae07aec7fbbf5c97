#!/usr/bin/env bash
# Stop what the Apptainer test environment of tests/env/apptainer-up.sh DIR left running.
#
#   bash tests/env/apptainer-down.sh DIR
#
# Nothing of apptainer-up.sh itself keeps running; what can remain are processes started through
# DIR/bin/apptainer: instances (`apptainer instance start`) and, after a launcher was killed with
# SIGKILL, orphans (squashfuse_ll of a SIF, container processes), as with a real Apptainer.
# 1. `DIR/bin/apptainer instance stop --all` (instances of this DIR only: their state lives in
#    DIR/rootfs/home/sbx/.apptainer).
# 2. Every process whose root directory is DIR/rootfs (so only processes started by this DIR's
#    launcher, found by PID through /proc/PID/root): SIGTERM, then SIGKILL after
#    APPTAINER_DOWN_GRACE seconds (default 5).
# DIR stays (root, images, launcher): apptainer-up.sh DIR brings it back in a second; rm -rf DIR
# removes it (no mounts are left on the host: the launcher mounts only in private namespaces).
set -euo pipefail

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $0 DIR" >&2; exit 2; }
log() { echo "apptainer-down: $*" >&2; }

if [ ! -d "$1" ]; then log "$1 does not exist: nothing to stop"; exit 0; fi
DIR=$(cd "$1" && pwd -P)
ROOTFS=$DIR/rootfs
GRACE=${APPTAINER_DOWN_GRACE:-5}
[ -d "$ROOTFS" ] || { log "no $ROOTFS: nothing to stop"; exit 0; }

if [ -x "$DIR/bin/apptainer" ] && [ -x "$ROOTFS/usr/bin/apptainer" ] \
   && [ -d "$ROOTFS/home/sbx/.apptainer/instances" ]; then
  n=$(cd / && "$DIR/bin/apptainer" instance list 2>/dev/null | tail -n +2 | grep -c . || true)
  if [ "${n:-0}" -gt 0 ]; then
    log "stopping $n instance(s)"
    (cd / && "$DIR/bin/apptainer" instance stop --all >&2) || log "instance stop --all failed (continuing)"
  fi
fi

root_id=$(stat -Lc '%d:%i' "$ROOTFS")
ours() {  # PIDs of processes whose root is this DIR's rootfs
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" != $$ ] || continue
    [ "$(stat -Lc '%d:%i' "$d/root" 2>/dev/null)" = "$root_id" ] && echo "$pid"
  done
  return 0
}
pids=$(ours)
if [ -n "$pids" ]; then
  log "stopping $(echo $pids | wc -w) leftover process(es): $(echo $pids)"
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq $((GRACE * 10))); do
    pids=$(ours); [ -n "$pids" ] || break
    sleep 0.1
  done
  pids=$(ours)
  if [ -n "$pids" ]; then
    log "SIGKILL to $(echo $pids)"
    kill -KILL $pids 2>/dev/null || true
  fi
fi
log "done"
