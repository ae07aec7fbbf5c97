#!/usr/bin/env bash
# Start (or keep running) a private, real OpenSSH sshd whose files all live under DIR: a test
# site's "login node".
#
#   eval "$(bash tests/env/sshd-up.sh DIR PORT [VAR=VALUE ...])"
#
# - Installs openssh-server and openssh-client from Debian if sshd/ssh/ssh-keygen are missing
#   (needs root; under the same machine-wide lock as slurm-up.sh). Creates /run/sshd.
# - Keeps in DIR: the host key ssh_host_ed25519_key, a passphrase-less client key client_key
#   (ed25519; both made once and then kept), authorized_keys (the client public key),
#   known_hosts ("[127.0.0.1]:PORT <host key>", the form OpenSSH and paramiko look up for a
#   non-22 port) and sshd_config: 127.0.0.1:PORT only, public keys only, root may log in,
#   StrictModes no (keys under /tmp), UsePAM no, internal-sftp, room for many sessions.
# - Each VAR=VALUE becomes part of the sshd_config's single `SetEnv` line (sshd uses only the
#   first SetEnv line), so every session on this login node sees it; e.g.
#   SLURM_CONF=/path/slurm.conf gives the login node its own cluster, as a real site's has.
# - Starts `/usr/sbin/sshd -f DIR/sshd_config -E DIR/sshd.log` (PID file DIR/sshd.pid), waits
#   until `ssh -i DIR/client_key ... -p PORT root@127.0.0.1 true` succeeds with strict host key
#   checking against DIR/known_hosts, then prints on stdout
#     export SSHD_DIR=DIR SSHD_PORT=PORT SSHD_KEY=DIR/client_key SSHD_KNOWN_HOSTS=DIR/known_hosts
#   (one export per line). Everything else goes to stderr.
# - Idempotent: an sshd that is already running for this DIR is kept; a stale PID file (reboot,
#   kill) is detected by checking /proc/PID/cmdline and replaced; if sshd_config changed, this
#   DIR's sshd is restarted. Only the listener is ever stopped, by its PID file
#   (tests/env/sshd-down.sh DIR); killing one connection's sshd child leaves the listener alone.
#
# Environment knobs (all optional):
#   SSHD_UP_TIMEOUT=30   seconds to wait for the first successful ssh login
set -euo pipefail

usage() { echo "usage: $0 DIR PORT [VAR=VALUE ...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
[ -n "$1" ] || usage

log() { echo "sshd-up: $*" >&2; }
die() { echo "sshd-up: ERROR: $*" >&2; exit 1; }

DIR_ARG=$1
case "$DIR_ARG" in *[[:space:]]*) die "DIR must not contain spaces: '$DIR_ARG'";; esac
[ "$(id -u)" = 0 ] || die "must run as root (sshd binds its port as root; packages may need installing)"
PORT=$2
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1024 ] && [ "$PORT" -le 65500 ] \
  || die "bad PORT '$PORT' (1024-65500)"
shift 2
SETENV=()
for kv in "$@"; do
  name=${kv%%=*}
  [[ "$kv" == *=* ]] || die "bad argument '$kv' (want VAR=VALUE)"
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad variable name '$name' in '$kv'"
  value=${kv#*=}
  # sshd_config splits SetEnv's arguments at blanks and understands double quotes; keep values
  # to what survives that unchanged.
  case "$value" in *[[:space:]\"\'\\]*) die "value of $name must not contain blanks, quotes or backslashes";; esac
  SETENV+=("$name=$value")
done

mkdir -p "$DIR_ARG"
DIR=$(cd "$DIR_ARG" && pwd -P)
case "$DIR" in *[[:space:]]*) die "DIR must not contain spaces: '$DIR'";; esac
TIMEOUT=${SSHD_UP_TIMEOUT:-30}
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "SSHD_UP_TIMEOUT must be a positive integer, not '$TIMEOUT'"
CONF="$DIR/sshd_config"
PIDFILE="$DIR/sshd.pid"
LOGFILE="$DIR/sshd.log"
HOSTKEY="$DIR/ssh_host_ed25519_key"
CLIENTKEY="$DIR/client_key"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

# The same machine-wide lock as slurm-up.sh: apt must not run twice at once.
GLOBAL_LOCK=/tmp/.sbx-slurm-up.lock
with_global_lock() { ( flock -w 600 9 || die "could not take $GLOBAL_LOCK"; "$@" ) 9>"$GLOBAL_LOCK"; }

# ---------------------------------------------------------------- packages
export PATH="$PATH:/usr/sbin:/sbin"
need_install() {
  [ -x /usr/sbin/sshd ] || return 0
  local b
  for b in ssh ssh-keygen; do command -v "$b" >/dev/null 2>&1 || return 0; done
  return 1
}
install_packages() {
  need_install || return 0
  log "installing openssh-server openssh-client (apt-get update first)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends openssh-server openssh-client >&2
}
if need_install; then with_global_lock install_packages; fi
need_install && die "sshd/ssh/ssh-keygen still missing after install"
mkdir -p /run/sshd   # sshd's privilege separation directory
chmod 0755 /run/sshd

# Per-DIR lock: two sshd-up.sh on the same DIR at once would otherwise both start an sshd.
exec 8>"$DIR/.sshd-up.lock"
flock -w 120 8 || die "another sshd-up.sh holds $DIR/.sshd-up.lock"

# ---------------------------------------------------------------- keys
if [ ! -s "$HOSTKEY" ] || [ ! -s "$HOSTKEY.pub" ]; then
  log "creating host key $HOSTKEY"
  rm -f "$HOSTKEY" "$HOSTKEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C "sbx-test-host@$PORT" -f "$HOSTKEY" </dev/null >&2
fi
if [ ! -s "$CLIENTKEY" ] || [ ! -s "$CLIENTKEY.pub" ]; then
  log "creating client key $CLIENTKEY"
  rm -f "$CLIENTKEY" "$CLIENTKEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C "sbx-test-client" -f "$CLIENTKEY" </dev/null >&2
fi
chmod 0600 "$HOSTKEY" "$CLIENTKEY"
write_if_changed() {  # write_if_changed FILE CONTENT
  [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && return 0
  printf '%s\n' "$2" >"$1.tmp" && mv -f "$1.tmp" "$1"
}
write_if_changed "$DIR/authorized_keys" "$(cat "$CLIENTKEY.pub")"
read -r keytype keydata _ <"$HOSTKEY.pub"
write_if_changed "$DIR/known_hosts" "[127.0.0.1]:$PORT $keytype $keydata"

# ---------------------------------------------------------------- sshd_config
new_conf=$(
  cat <<EOF
# Generated by tests/env/sshd-up.sh: a private test "login node"; everything lives under $DIR.
Port $PORT
ListenAddress 127.0.0.1
HostKey $HOSTKEY
PidFile $PIDFILE
AuthorizedKeysFile $DIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
MaxSessions 100
MaxStartups 200:30:400
EOF
  if [ ${#SETENV[@]} -gt 0 ]; then echo "SetEnv ${SETENV[*]}"; fi
)

# ---------------------------------------------------------------- daemon helpers
# The PID file is trusted only if that process is alive and its command line holds `-f $CONF`
# (we always start sshd that way), so a stale file never makes us touch a stranger. The listener
# rewrites its argv into one string ("sshd: /usr/sbin/sshd -f CONF -E LOG [listener] 0 of ..."),
# hence the match on " -f $CONF " within the joined command line rather than on one argument.
# Per-connection children rename themselves ("sshd: root@notty") and never match.
ours() { { tr '\0' ' ' <"/proc/$1/cmdline"; echo " "; } 2>/dev/null | grep -qF -- " -f $CONF "; }
pid_of() {
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid=$(tr -dc '0-9' <"$PIDFILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  ours "$pid" || return 1
  echo "$pid"
}
log_tail() {
  [ -s "$LOGFILE" ] || return 0
  echo "----- tail of $LOGFILE" >&2
  tail -n 25 "$LOGFILE" >&2
}

old_conf=""
[ -f "$CONF" ] && old_conf=$(cat "$CONF")
if [ "$old_conf" != "$new_conf" ]; then
  if pid_of >/dev/null; then
    log "sshd_config for $DIR changed: restarting this sshd"
    bash "$HERE/sshd-down.sh" "$DIR" >&2
  fi
  printf '%s\n' "$new_conf" >"$CONF.tmp" && mv -f "$CONF.tmp" "$CONF"
  log "wrote $CONF (127.0.0.1:$PORT${SETENV[*]:+, SetEnv ${SETENV[*]}})"
fi

# ---------------------------------------------------------------- start
if pid=$(pid_of); then
  log "sshd already running (pid $pid)"
else
  if [ -e "$PIDFILE" ]; then log "removing stale PID file $PIDFILE"; rm -f "$PIDFILE"; fi
  /usr/sbin/sshd -t -f "$CONF" 2>"$DIR/sshd-t.err" || die "sshd -t rejects $CONF: $(cat "$DIR/sshd-t.err")"
  log "starting sshd on 127.0.0.1:$PORT"
  # sshd daemonizes itself; setsid + redirected stdio so it keeps neither the caller's stdout (the
  # $(...) of eval) nor the lock fd open.
  if ! setsid /usr/sbin/sshd -f "$CONF" -E "$LOGFILE" </dev/null >>"$LOGFILE" 2>&1 8>&-; then
    log_tail; die "sshd failed to start"
  fi
  for _ in $(seq 1 100); do
    if pid=$(pid_of); then break; fi
    sleep 0.1
  done
  pid=$(pid_of) || { log_tail; die "sshd did not write $PIDFILE (port $PORT taken?)"; }
  log "sshd started (pid $pid)"
fi

# ---------------------------------------------------------------- wait until a login works
SSH=(ssh -F none -i "$CLIENTKEY" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes
     -o UserKnownHostsFile="$DIR/known_hosts" -o ConnectTimeout=10 -p "$PORT" root@127.0.0.1)
log "waiting (up to ${TIMEOUT}s) for an ssh login on 127.0.0.1:$PORT"
deadline=$((SECONDS + TIMEOUT))
while :; do
  if err=$("${SSH[@]}" true </dev/null 2>&1 >/dev/null); then break; fi
  pid_of >/dev/null || { log_tail; die "sshd exited while waiting; ssh said: $err"; }
  if [ $SECONDS -ge $deadline ]; then
    log_tail; die "no ssh login after ${TIMEOUT}s; ssh said: $err"
  fi
  sleep 0.2
done
log "login node on 127.0.0.1:$PORT is up (sshd pid $(pid_of))"
echo "export SSHD_DIR=$DIR"
echo "export SSHD_PORT=$PORT"
echo "export SSHD_KEY=$CLIENTKEY"
echo "export SSHD_KNOWN_HOSTS=$DIR/known_hosts"
