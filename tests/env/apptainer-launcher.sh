# Body of the `apptainer` / `singularity` launcher that tests/env/apptainer-up.sh installs as
# DIR/bin/apptainer and DIR/bin/singularity (it prepends SBX_APPTAINER_HOME=DIR and
# SBX_APPTAINER_BAKED_BINDS=... to this file). Not meant to be run directly.
#
# TEST-ENVIRONMENT SHIM, not a production wrapper. Debian 12 has no Apptainer, so this runs sid's
# real Apptainer (DIR/rootfs) in a private mount namespace whose root is DIR/rootfs (pivot_root:
# Apptainer refuses plain chroot), as the unprivileged user sbx (uid 1000): as root, Apptainer fails
# in this container (no CAP_SYS_RESOURCE). Arguments reach apptainer byte-exact ("$@"), the
# environment passes through (APPTAINER_*, APPTAINERENV_*, SINGULARITY*, ...), except: HOME=/home/sbx,
# USER=LOGNAME=sbx, PATH=standard bin dirs of the sid root, TMPDIR=/tmp (the root caller's paths mean
# nothing to uid 1000), XDG_RUNTIME_DIR unset.
#
# The process chain is exec-only (this script -> unshare -m -> this script, stage 2: mounts and
# pivot_root -> setpriv -> sh (cd) -> apptainer), so the launcher's PID *is* apptainer's: signals, exit status
# and process group behave as with a real apptainer (SIGTERM is forwarded to the container; SIGKILL
# of apptainer alone leaves the container process running, as with a real apptainer without --pid;
# kill the process group). No private PID namespace and the host's /proc (not a fresh proc with
# over-mounts as bubblewrap's --proc makes, which breaks Apptainer's own proc mount): so
# `instance start` leaves the instance running after the launcher exits, later calls
# (`exec instance://NAME`, `instance list|stop`) find it, and --pid/--containall work.
#
# Host paths visible inside (at the same path): /tmp, /dev, /sys, /proc, DIR, the current directory,
# every existing path in SBX_APPTAINER_BINDS (colon-separated, at call time or baked in at setup),
# the host sources of -B/--bind/--mount/-H/-W/-o arguments and of APPTAINER_BIND(PATH), and every
# other absolute argument naming an existing host path outside the system directories (so an image
# or an --env-file anywhere is found). An empty mount-point directory (or file) may appear in
# DIR/rootfs for each such path outside /tmp.
#
# Side effect, as the caller is root: the host sources of writable binds (-B/--bind
# src[:dst[:opts]] lists without :ro, --mount src=, -H src, -W, -o dir, APPTAINER_BIND), the
# destination directory of `pull`/`build`, --dir of `pull` and APPTAINER_CACHEDIR/TMPDIR are
# chowned to uid 1000 if they are root-owned (that directory or file only, never recursively and
# never sticky directories like /tmp) so that the container user can write there, as a root caller
# of a real Apptainer could; so is the caller's current directory for `exec instance://NAME` (a
# task's WORK_DIR, made by the root caller under a directory the instance bound before it existed). Files the container writes belong to uid 1000; root can still read and
# delete them.

die() { echo "apptainer launcher: ERROR: $*" >&2; exit 255; }

R=$SBX_APPTAINER_HOME/rootfs

if [ "${1-}" = __sbx_stage2__ ]; then
  # Stage 2, in the new mount namespace (still as root):
  #   __sbx_stage2__ CWD N DST1..DSTN SRC1..SRCN APPTAINER-ARGS...   (SRC: DST with symlinks resolved)
  cwd=$2 n=$3; shift 3
  dsts=("${@:1:n}"); srcs=("${@:n+1:n}"); shift $((2 * n))
  mount --bind "$R" "$R" && cd "$R" && pivot_root . .oldroot && cd / || die "pivot_root into $R failed"
  mount --rbind /.oldroot/proc /proc && mount --rbind /.oldroot/dev /dev \
    && mount --rbind /.oldroot/sys /sys && mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run \
    && mount --rbind /.oldroot/tmp /tmp || die "mounting /proc, /dev, /sys, /run, /tmp failed"
  for ((i = 0; i < n; i++)); do
    mount --rbind "/.oldroot${srcs[i]}" "${dsts[i]}" || die "cannot bind ${dsts[i]}"
  done
  umount -l /.oldroot || die "cannot detach the host root"
  # enter the caller's directory as uid 1000 (apptainer needs to), else stay in /
  exec setpriv --reuid=1000 --regid=1000 --init-groups --inh-caps=-all --bounding-set=-all \
    /bin/sh -c 'cd "$0" 2>/dev/null || cd /; exec /usr/bin/apptainer "$@"' "$cwd" "$@"
  exit 255
fi

[ -x "$R/usr/bin/apptainer" ] || die "$R is not set up: run tests/env/apptainer-up.sh $SBX_APPTAINER_HOME"
[ "$EUID" = 0 ] || die "must run as root (a mount namespace over $R, then uid 1000)"

if [ -e "$SBX_APPTAINER_HOME/trace" ]; then   # debugging: touch DIR/trace, read DIR/trace.log
  { echo "=== $(date +%T.%N) pid $$ cwd $PWD"; printf '%q ' "$@"; echo
    env | grep -E '^(APPTAINER|SINGULARITY)' || true; } >>"$SBX_APPTAINER_HOME/trace.log"
  exec 2> >(tee -a "$SBX_APPTAINER_HOME/trace.log" >&2)
fi

binds=()           # extra host paths bound at the same path
bound=(/tmp)
owned=()           # host paths to chown 1000 if root-owned

abspath() {        # abspath P -> $REPLY = absolute, lexically simplified enough for prefix tests
  local p=$1
  [[ $p == /* ]] || p=$PWD/$p
  while [[ $p == */./* ]]; do p=${p//\/.\//\/}; done
  while [[ $p == *//* ]]; do p=${p//\/\//\/}; done
  [[ $p == */. ]] && p=${p%/.}
  [[ $p != / && $p == */ ]] && p=${p%/}
  REPLY=$p
}

system_path() {    # paths the sid root provides itself: never shadow them with host paths
  case $1 in
    /|/bin|/bin/*|/sbin|/sbin/*|/usr|/usr/*|/lib|/lib/*|/lib32|/lib32/*|/lib64|/lib64/*|/libx32|/libx32/*) return 0 ;;
    /etc|/etc/*|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/run|/run/*|/boot|/boot/*) return 0 ;;
    /var/tmp/*) return 1 ;;
    /var|/var/*) return 0 ;;   # /var/run, /var/lock: absolute symlinks in the root
    /home|/home/sbx|/home/sbx/*|*/..|*/../*) return 0 ;;
  esac
  return 1
}

want_bind() {      # want_bind PATH: make host PATH visible inside if it exists and is not already
  local p b
  abspath "$1"; p=$REPLY
  system_path "$p" && return 0
  for b in "${bound[@]}"; do
    [[ $p == "$b" || $p == "$b"/* ]] && return 0
  done
  [ -e "$p" ] || return 0
  [[ $p == *$'\n'* ]] && return 0
  bound+=("$p"); binds+=("$p")
  # its mount point in the root (parents mode 755, so that uid 1000 can pass)
  if [ -d "$p" ]; then
    [ -d "$R$p" ] || (umask 022 && mkdir -p -- "$R$p") || true
  elif [ ! -e "$R$p" ]; then
    (umask 022 && mkdir -p -- "$R${p%/*}" && : >"$R$p") || true
  fi
}

want_owned() {     # want_owned PATH: chown 1000 later if root-owned (and not a shared/system dir)
  abspath "$1"
  system_path "$REPLY" && return 0
  [[ $REPLY == "$SBX_APPTAINER_HOME" || $REPLY == "$SBX_APPTAINER_HOME"/* ]] && return 0
  [ -e "$REPLY" ] && owned+=("$REPLY")
  return 0
}

bind_specs() {     # bind_specs "src[:dst[:opts]],..." -> bind (and own unless :ro) every src
  local spec src opts rest
  local IFS=,
  for spec in $1; do
    [ -n "$spec" ] || continue
    src=${spec%%:*}; rest=${spec#"$src"}; opts=${rest#:}; opts=${opts#*:}
    [[ $rest == :*:* ]] || opts=""
    [ -n "$src" ] || continue
    want_bind "$src"
    [[ ,$opts, == *,ro,* ]] || want_owned "$src"
  done
}

mount_spec() {     # --mount type=bind,src=...,dst=...[,ro]
  local f src="" ro=""
  local IFS=,
  for f in $1; do
    case $f in
      src=*|source=*) src=${f#*=} ;;
      ro|readonly|ro=true|readonly=true) ro=1 ;;
    esac
  done
  [ -n "$src" ] || return 0
  want_bind "$src"
  [ -n "$ro" ] || want_owned "$src"
}

dest_dir() {       # pull/build destination: its directory must be writable by uid 1000
  local d
  [[ $1 == *://* || $1 == *:* && $1 != /* && $1 != ./* ]] && return 0   # a URI, not a path
  abspath "$1"; d=${REPLY%/*}; [ -n "$d" ] || d=/
  want_bind "$d"; want_owned "$d"
  [ -f "$REPLY" ] && want_owned "$REPLY"
  return 0
}

# ---- scan the arguments (read-only: "$@" is passed on untouched)
sub="" sub2="" positional=0 expect="" dest=""
for a in "$@"; do
  if [ -n "$expect" ]; then
    case $expect in
      bind) bind_specs "$a" ;;
      mount) mount_spec "$a" ;;
      own) want_bind "${a%%:*}"; want_owned "${a%%:*}" ;;
      pulldir) want_bind "$a"; want_owned "$a" ;;
      path) want_bind "$a" ;;
      skip) ;;
    esac
    expect=""; continue
  fi
  case $a in
    -B|--bind) expect=bind; continue ;;
    -B=*|--bind=*) bind_specs "${a#*=}"; continue ;;
    -B?*) bind_specs "${a#-B}"; continue ;;
    --mount) expect=mount; continue ;;
    --mount=*) mount_spec "${a#*=}"; continue ;;
    -H|--home|-W|--workdir|-o|--overlay) expect=own; continue ;;
    --home=*|--workdir=*|--overlay=*) want_bind "${a#*=}"; want_owned "${a#*=}"; continue ;;
    --dir) [ "$sub" = pull ] && expect=pulldir || expect=path; continue ;;
    --dir=*) want_bind "${a#*=}"; [ "$sub" = pull ] && want_owned "${a#*=}"; continue ;;
    # other options that take a value (apptainer 1.4): the value is a path, or skipped
    -c|--config|--env-file|--pem-path|--apply-cgroups|--authfile|--build-arg-file|--pid-file)
      expect=path; continue ;;
    --add-caps|--app|--blkio-weight|--blkio-weight-device|--cpu-shares|--cpus|--cpuset-cpus|\
    --cpuset-mems|--cwd|--pwd|--dns|--docker-host|--drop-caps|--env|--fusemount|--hostname|\
    --memory|--memory-reservation|--memory-swap|--netns-path|--network|--network-args|--no-mount|\
    --pids-limit|-S|--scratch|--security|--arch|--arch-variant|--library|--build-arg|\
    --mksquashfs-args|--section|--dmtcp-launch|--dmtcp-restart|--signal|--timeout|--user)
      expect=skip; continue ;;
    -*) continue ;;
  esac
  # a positional argument
  if [ -z "$sub" ]; then sub=$a; continue; fi
  if [ "$sub" = instance ] && [ -z "$sub2" ]; then sub2=$a; continue; fi
  positional=$((positional + 1))
  if [ "$positional" = 1 ] && { [ "$sub" = pull ] || [ "$sub" = build ]; }; then dest=$a; fi
  if [ "$positional" = 1 ] && [ "$sub" = exec ] && [[ $a == instance://* ]]; then want_owned "$PWD"; fi
  [[ $a == /* ]] && want_bind "$a"
done
[ -n "$dest" ] && dest_dir "$dest"
[ -n "${APPTAINER_BIND:-}" ] && bind_specs "$APPTAINER_BIND"
[ -n "${APPTAINER_BINDPATH:-}" ] && bind_specs "$APPTAINER_BINDPATH"
[ -n "${SINGULARITY_BIND:-}" ] && bind_specs "$SINGULARITY_BIND"
[ -n "${SINGULARITY_BINDPATH:-}" ] && bind_specs "$SINGULARITY_BINDPATH"
for v in APPTAINER_CACHEDIR APPTAINER_TMPDIR SINGULARITY_CACHEDIR SINGULARITY_TMPDIR; do
  [ -n "${!v:-}" ] && { want_bind "${!v}"; want_owned "${!v}"; }
done
IFS=: read -r -a extra <<<"${SBX_APPTAINER_BINDS:-}:$SBX_APPTAINER_BAKED_BINDS"
for p in "${extra[@]}"; do [ -n "$p" ] && want_bind "$p"; done
want_bind "$SBX_APPTAINER_HOME"
want_bind "$PWD"
cwd=/
system_path "$PWD" || cwd=$PWD

if [ ${#owned[@]} -gt 0 ]; then
  find "${owned[@]}" -maxdepth 0 \( -type d -o -type f \) -user 0 ! -perm -1000 \
    -exec chown 1000 -- {} + 2>/dev/null || true
fi

export HOME=/home/sbx USER=sbx LOGNAME=sbx TMPDIR=/tmp
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
unset XDG_RUNTIME_DIR
[ -d "$R/.oldroot" ] || mkdir -m 700 "$R/.oldroot"
# the host paths behind the binds, symlinks resolved (after pivot_root they would resolve in the root)
srcs=()
if [ ${#binds[@]} -gt 0 ]; then
  mapfile -d '' -t srcs < <(readlink -f -z -- "${binds[@]}")
  [ ${#srcs[@]} -eq ${#binds[@]} ] || srcs=("${binds[@]}")
fi
self=${BASH_SOURCE[0]}
[[ $self == /* ]] || self=$PWD/$self
exec /usr/bin/unshare --mount --propagation private -- /bin/bash "$self" __sbx_stage2__ "$cwd" \
  "${#binds[@]}" "${binds[@]}" "${srcs[@]}" "$@"
