#!/usr/bin/env bash
# Stop the private test sshd that tests/env/sshd-up.sh started under DIR.
#
#   bash tests/env/sshd-down.sh DIR
#
# Stops the listening sshd by the PID file it wrote (DIR/sshd.pid): SIGTERM, then SIGKILL after
# 10 s. The PID file is trusted only if the process's command line holds -f DIR/sshd_config, so a
# stale PID file never hits an unrelated process. Sessions that are still open keep running
# under their own per-connection sshd, as with any sshd restart. DIR (keys, known_hosts, log)
# stays for inspection and for the next sshd-up.sh.
set -euo pipefail

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $0 DIR" >&2; exit 2; }
log() { echo "sshd-down: $*" >&2; }

if [ ! -d "$1" ]; then log "$1 does not exist: nothing to stop"; exit 0; fi
DIR=$(cd "$1" && pwd -P)
CONF="$DIR/sshd_config"
PIDFILE="$DIR/sshd.pid"
GRACE=${SSHD_DOWN_GRACE:-10}

# The listener rewrites its argv into one string ("sshd: /usr/sbin/sshd -f CONF -E LOG [listener] ..."):
# match " -f $CONF " in the joined command line.
ours() { { tr '\0' ' ' <"/proc/$1/cmdline"; echo " "; } 2>/dev/null | grep -qF -- " -f $CONF "; }
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

pid=""
[ -s "$PIDFILE" ] && pid=$(tr -dc '0-9' <"$PIDFILE")
if [ -z "$pid" ] || ! alive "$pid" || ! ours "$pid"; then
  [ -e "$PIDFILE" ] && log "sshd not running (stale PID file removed)"
  rm -f "$PIDFILE"
  log "no sshd of $DIR is running"
  exit 0
fi

log "SIGTERM sshd (pid $pid)"
kill -TERM "$pid" 2>/dev/null || true
deadline=$((SECONDS + GRACE))
while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
if alive "$pid" && ours "$pid"; then   # re-check identity right before the SIGKILL
  log "pid $pid still alive after ${GRACE}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
fi
alive "$pid" && { log "ERROR: sshd pid $pid did not exit"; exit 1; }
rm -f "$PIDFILE"
log "stopped sshd of $DIR"
