#!/usr/bin/env bash
# Start (or keep running) a private, real Slurm test cluster whose files all live under DIR.
#
#   eval "$(bash tests/env/slurm-up.sh DIR [CLUSTER_NAME] [PORT_BASE])"
#
# - Installs slurm-wlm and munge from Debian if they are missing (needs root).
# - Starts munged if none answers (one munged serves every cluster on the machine).
# - Writes DIR/slurm.conf: slurmctld on 127.0.0.1:PORT_BASE, fake nodes n1/n2 (slurmd on
#   PORT_BASE+11 / PORT_BASE+12, CPUs=2 RealMemory=2000 each by default), partitions `main` (default) and
#   `short`, every state/spool/pid/log path under DIR; and a bigger node n3 (PORT_BASE+13, CPUs=4,
#   RealMemory=4000, two fake GPUs: gres gpu:2 on /dev/tty1 and /dev/tty2, which no task opens)
#   alone in partition `big`, for pilots that fill a node.
# - Starts slurmctld and `slurmd -N n1`, `slurmd -N n2` (PID files under DIR/run), waits until both
#   nodes are up (idle, or busy with recovered jobs), then prints `export SLURM_CONF=DIR/slurm.conf`
#   on stdout. Everything else goes to stderr.
# - Idempotent: daemons that are already running for this DIR are kept; stale PID files (from a
#   reboot or a kill) are detected by checking /proc/PID/cmdline and replaced. If slurm.conf
#   changed, the running daemons of this DIR are restarted. Job state in DIR/state survives
#   restarts (job ids keep counting up); SLURM_UP_CLEAN=1 wipes it first.
# - Daemons are only ever stopped by the PIDs they wrote; tests/env/slurm-down.sh DIR stops them.
#
# Environment knobs (all optional):
#   SLURM_UP_CLEAN=1           wipe DIR/state, DIR/spool and DIR/log before starting
#   SLURM_UP_TIMEOUT=60        seconds to wait for both nodes to come up
#   SLURM_UP_SCHED_PARAMS=...  override SchedulerParameters
#   SLURM_UP_CPUS=2            CPUs each fake node claims (more than the machine has is fine:
#                              benchmarks use it to run many one-CPU worker jobs at once)
set -euo pipefail

usage() { echo "usage: $0 DIR [CLUSTER_NAME] [PORT_BASE]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 3 ] || usage
[ -n "$1" ] || usage

log() { echo "slurm-up: $*" >&2; }
die() { echo "slurm-up: ERROR: $*" >&2; exit 1; }

mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
CLUSTER=$(printf '%s' "${2:-sbxtest}" | tr '[:upper:]' '[:lower:]')
PORT_BASE=${3:-6817}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CPUS=${SLURM_UP_CPUS:-2}
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_UP_CPUS must be a positive integer, not '$CPUS'"
NODES=(n1 n2 n3)
CONF="$DIR/slurm.conf"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

[[ "$CLUSTER" =~ ^[a-z][a-z0-9_-]*$ ]] || die "bad CLUSTER_NAME '$CLUSTER' (letters, digits, _ and -)"
[[ "$PORT_BASE" =~ ^[0-9]+$ ]] && [ "$PORT_BASE" -ge 1024 ] && [ "$PORT_BASE" -le 65500 ] \
  || die "bad PORT_BASE '$PORT_BASE' (1024-65500)"
[ "$(id -u)" = 0 ] || die "must run as root (daemons run as root; packages may need installing)"
case "$DIR" in *[[:space:]]*) die "DIR must not contain spaces: '$DIR'";; esac

# One lock for machine-wide steps (apt, munged) so that two clusters brought up at once don't race.
GLOBAL_LOCK=/tmp/.sbx-slurm-up.lock
with_global_lock() { ( flock -w 600 9 || die "could not take $GLOBAL_LOCK"; "$@" ) 9>"$GLOBAL_LOCK"; }

# ---------------------------------------------------------------- packages
need_install() {
  local b
  for b in slurmctld slurmd sbatch srun squeue sinfo scontrol munged munge unmunge; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 0
  done
  return 1
}
install_packages() {
  need_install || return 0
  log "installing slurm-wlm munge (apt-get update first)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends slurm-wlm munge >&2
}
export PATH="$PATH:/usr/sbin:/sbin"
if need_install; then with_global_lock install_packages; fi
need_install && die "slurm/munge binaries still missing after install"

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
start_munge() {
  munge_ok && return 0
  local pidf=/run/munge/munged.pid pid force=""
  if [ -s "$pidf" ]; then
    pid=$(cat "$pidf")
    if [ -d "/proc/$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q munged; then
      log "munged (pid $pid) is running but does not answer; waiting for it"
      for _ in $(seq 1 50); do munge_ok && return 0; sleep 0.1; done
      die "munged pid $pid does not answer 'munge -n | unmunge'"
    fi
    log "removing stale munged PID file ($pid)"
    rm -f "$pidf"
    force=--force   # stale socket/lock from a dead munged
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null; then runuser -u munge -- mungekey --create >&2
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged $force </dev/null >&2 9>&-   # must not inherit the lock fd
  for _ in $(seq 1 50); do munge_ok && return 0; sleep 0.1; done
  die "munged did not start: $(tail -n 20 /var/log/munge/munged.log 2>/dev/null)"
}
with_global_lock start_munge

# ---------------------------------------------------------------- slurm.conf
# Scheduling: without `defer`, slurmctld tries to start each job when it is submitted and again on
# every job end; batch_sched_delay / sched_min_interval keep that event-driven pass immediate, and
# sched_interval / bf_interval (backfill) bound the wait for anything the event pass missed.
SCHED_PARAMS=${SLURM_UP_SCHED_PARAMS:-sched_interval=2,sched_min_interval=100000,batch_sched_delay=0,bf_interval=1,bf_resolution=1,default_queue_depth=1000,max_rpc_cnt=0}

new_conf=$(
  cat <<EOF
# Generated by tests/env/slurm-up.sh: private Slurm test cluster; everything lives under $DIR.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt

SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=$SCHED_PARAMS

ReturnToService=2
MinJobAge=600
KillWait=5
MaxArraySize=1001
InactiveLimit=0
Waittime=0
SlurmctldTimeout=10
SlurmdTimeout=20
MessageTimeout=10

EOF
  echo "GresTypes=gpu"
  for i in 1 2; do
    echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 10 + i)) CPUs=$CPUS RealMemory=$((1000 * CPUS)) State=UNKNOWN"
  done
  echo "NodeName=n3 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 13)) CPUs=4 RealMemory=4000 Gres=gpu:2 State=UNKNOWN"
  echo "PartitionName=main Nodes=n[1-2] Default=YES State=UP MaxTime=INFINITE"
  echo "PartitionName=short Nodes=n[1-2] Default=NO State=UP MaxTime=INFINITE"
  echo "PartitionName=big Nodes=n3 Default=NO State=UP MaxTime=INFINITE"
)
# n3's GPUs are two device files that exist everywhere; Slurm hands out their indices
# (CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS) and, with task/none, constrains nothing.
new_gres=$'AutoDetect=off\nNodeName=n3 Name=gpu File=/dev/tty[1-2]'

# ---------------------------------------------------------------- daemon helpers
# A PID file is trusted only if that process is alive and its command line names our slurm.conf
# (we always start the daemons with `-f $CONF`), so a stale file never makes us touch a stranger.
pid_of() {  # pid_of PIDFILE -> prints pid if it is our live daemon
  local f=$1 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$CONF" || return 1
  echo "$pid"
}
ctld_pidfile="$DIR/run/slurmctld.pid"
slurmd_pidfile() { echo "$DIR/run/slurmd-$1.pid"; }

running_any() {
  pid_of "$ctld_pidfile" >/dev/null && return 0
  local n
  for n in "${NODES[@]}"; do pid_of "$(slurmd_pidfile "$n")" >/dev/null && return 0; done
  return 1
}

# Per-DIR lock: two slurm-up.sh on the same DIR at once would otherwise both start daemons.
exec 8>"$DIR/.slurm-up.lock"
flock -w 120 8 || die "another slurm-up.sh holds $DIR/.slurm-up.lock"

old_conf=""
[ -f "$CONF" ] && old_conf=$(cat "$CONF")
if [ "$old_conf" != "$new_conf" ] && running_any; then
  log "slurm.conf for $DIR changed: restarting this cluster's daemons"
  bash "$HERE/slurm-down.sh" "$DIR" >&2
fi

if [ "${SLURM_UP_CLEAN:-0}" = 1 ]; then
  running_any && bash "$HERE/slurm-down.sh" "$DIR" >&2
  log "SLURM_UP_CLEAN=1: wiping $DIR/{state,spool,log}"
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
fi

mkdir -p "$DIR/state" "$DIR/run" "$DIR/log"
for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
printf '%s\n' "$new_gres" >"$DIR/gres.conf.tmp" && mv -f "$DIR/gres.conf.tmp" "$DIR/gres.conf"
if [ "$old_conf" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" >"$CONF.tmp" && mv -f "$CONF.tmp" "$CONF"
  log "wrote $CONF (cluster $CLUSTER, slurmctld port $PORT_BASE, slurmd ports $((PORT_BASE + 11))-$((PORT_BASE + 10 + ${#NODES[@]})))"
fi
# slurmctld refuses a state directory written for another cluster name: start that state afresh.
if [ -s "$DIR/state/clustername" ] && [ "$(cat "$DIR/state/clustername")" != "$CLUSTER" ]; then
  log "state in $DIR/state belongs to cluster '$(cat "$DIR/state/clustername")': wiping it"
  rm -rf "$DIR/state"; mkdir -p "$DIR/state"
fi

export SLURM_CONF="$CONF"

log_tails() {
  local f
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-*.log "$DIR"/log/*.stderr; do
    [ -s "$f" ] || continue
    echo "----- tail of $f" >&2
    tail -n 25 "$f" >&2
  done
}

# start_daemon PIDFILE NAME CMD...: start a self-daemonizing Slurm daemon unless it already runs.
start_daemon() {
  local pidf=$1 name=$2; shift 2
  local pid
  if pid=$(pid_of "$pidf"); then
    log "$name already running (pid $pid)"
    return 0
  fi
  if [ -e "$pidf" ]; then log "removing stale PID file $pidf"; rm -f "$pidf"; fi
  log "starting $name"
  # setsid + redirected stdio: the daemon must not keep the caller's stdout (the $(...) of eval) open.
  if ! setsid "$@" </dev/null >>"$DIR/log/$name.stderr" 2>&1 8>&-; then  # 8>&-: not the lock
    log_tails; die "$name failed to start"
  fi
  for _ in $(seq 1 100); do
    if pid=$(pid_of "$pidf"); then log "$name started (pid $pid)"; return 0; fi
    sleep 0.1
  done
  log_tails; die "$name did not write $pidf"
}

# ---------------------------------------------------------------- start
# -i: recover saved state but ignore errors in it (e.g. jobs that were running before a reboot).
start_daemon "$ctld_pidfile" slurmctld /usr/sbin/slurmctld -f "$CONF" -i
for n in "${NODES[@]}"; do
  start_daemon "$(slurmd_pidfile "$n")" "slurmd-$n" /usr/sbin/slurmd -f "$CONF" -N "$n"
done

# ---------------------------------------------------------------- wait until the nodes are up
log "waiting (up to ${TIMEOUT}s) for nodes ${NODES[*]} to be idle"
deadline=$((SECONDS + TIMEOUT))
while :; do
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
  ok=1
  for n in "${NODES[@]}"; do
    st=$(awk -v n="$n" '$1 == n { print $2; exit }' <<<"$states")
    # idle = ready; mixed/allocated = ready and already running recovered jobs. A trailing '*'
    # (not responding) or down/drain/unknown states are not ready.
    case "$st" in idle | mixed | allocated) ;; *) ok=0 ;; esac
  done
  [ $ok = 1 ] && break
  for f in "$ctld_pidfile" $(for n in "${NODES[@]}"; do slurmd_pidfile "$n"; done); do
    pid_of "$f" >/dev/null || { log_tails; die "daemon for $f exited while waiting; node states: $(echo $states)"; }
  done
  if [ $SECONDS -ge $deadline ]; then
    log_tails
    die "nodes not idle after ${TIMEOUT}s; sinfo says: $(echo $states)"
  fi
  sleep 0.2
done
log "cluster '$CLUSTER' is up: $(echo $states)"
echo "export SLURM_CONF=$CONF"
