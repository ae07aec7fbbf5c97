#!/usr/bin/env bash
# Provide a real Apptainer (Debian sid's) for the test suite, with every file under DIR.
#
#   eval "$(bash tests/env/apptainer-up.sh DIR)"
#
# - Installs debootstrap from Debian if it is missing (needs root).
# - DIR/rootfs: a minbase Debian sid root with apptainer, squashfs-tools, squashfuse, fuse3 (+ fuse2fs,
#   gocryptfs, only to silence apptainer's "not found" INFO lines), /etc/hosts from the host, user sbx
#   (uid 1000). Debian 12 has no Apptainer and sid's needs sid's glibc. Built in a temporary directory
#   and renamed, so an interrupted run leaves no half root behind. Once.
# - DIR/images/debian-python (sandbox directory) and DIR/images/debian-python.sif: a minbase Debian
#   bookworm with python3 (python3-minimal lacks most of the standard library, json included; apt
#   lists, docs, man pages and locales removed; 124 MB sandbox, 42 MB SIF), built with
#   `apptainer build` through the launcher. Once (rebuilt if IMAGE_RECIPE below changes); its
#   debootstrap runs concurrently with the root's. From scratch: 70-95 s in all on 2 cores.
#   Debugging: touch DIR/trace and every launcher call is logged to DIR/trace.log.
# - DIR/bin/apptainer and DIR/bin/singularity: the launcher (tests/env/apptainer-launcher.sh, read
#   its header): runs the real apptainer as uid 1000 in a private mount namespace whose root is
#   DIR/rootfs (unshare + pivot_root, exec-only: the launcher's PID is apptainer's), and
#   chowns root-owned bind sources to uid 1000 (test-environment shim). Must be called as root.
# - chmod 666 /dev/fuse (SIF images are mounted with squashfuse by uid 1000).
# - Prints on stdout:
#     export PATH=DIR/bin:$PATH
#     export SBX_TEST_IMAGE_SIF=DIR/images/debian-python.sif
#     export SBX_TEST_IMAGE_DIR=DIR/images/debian-python
#   Everything else goes to stderr.
# - Idempotent and quick (about 0.3 s, one `apptainer exec` check) when everything is there; the
#   launcher is rewritten (atomically) when it changed. Nothing keeps running, except instances that callers start
#   (tests/env/apptainer-down.sh DIR stops those).
#
# Environment knobs (all optional):
#   SBX_APPTAINER_BINDS=P1:P2   host paths the launcher always binds (at the same path), in addition
#                               to the ones named in SBX_APPTAINER_BINDS when it is called
#   APPTAINER_UP_MIRROR=URL     Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $0 DIR" >&2; exit 2; }

log() { echo "apptainer-up: $*" >&2; }
die() { echo "apptainer-up: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, debootstrap, mount namespaces over the sid root)"
[[ $1 =~ ^[A-Za-z0-9._/+@-]+$ ]] || die "DIR may only contain letters, digits and ._/+@- : '$1'"
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
[[ $DIR =~ ^[A-Za-z0-9._/+@-]+$ ]] || die "DIR may only contain letters, digits and ._/+@- : '$DIR'"
case "$DIR/" in
  /var/tmp/*) ;;
  /usr/*|/etc/*|/var/*|/proc/*|/sys/*|/dev/*|/run/*|/boot/*|/bin/*|/sbin/*|/lib*/*|/home/|/home/sbx/*|/tmp/)
    die "DIR must not be a system directory or under one: '$DIR'" ;;
esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
MIRROR=${APPTAINER_UP_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$DIR/rootfs
IMAGES=$DIR/images
SANDBOX=$IMAGES/debian-python
SIF=$IMAGES/debian-python.sif
export PATH="$PATH:/usr/sbin:/sbin"
T0=$SECONDS

# Per-DIR lock: a second apptainer-up.sh on the same DIR waits, then finds everything ready.
exec 9>"$DIR/.apptainer-up.lock"
flock -w 900 9 || die "another apptainer-up.sh holds $DIR/.apptainer-up.lock"

# ---------------------------------------------------------------- host packages
# (bubblewrap is not needed: the launcher uses util-linux's unshare and pivot_root, see its header)
for b in unshare pivot_root mount umount setpriv chroot; do
  command -v "$b" >/dev/null 2>&1 || die "$b is missing (util-linux/mount/coreutils)"
done
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 debootstrap >&2; }
  apt_install || { apt-get update -q -o DPkg::Lock::Timeout=600 >&2 && apt_install; } \
    || die "apt-get install debootstrap failed"
fi
command -v debootstrap >/dev/null 2>&1 || die "debootstrap still missing after install"
[ -c /dev/fuse ] || die "/dev/fuse is missing: SIF images cannot be mounted (squashfuse)"
chmod 666 /dev/fuse

# ---------------------------------------------------------------- helpers
# Remove a temporary build directory; debootstrap may have left /proc or /sys mounted inside it.
remove_tree() {
  local d=$1 m
  [ -e "$d" ] || return 0
  while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
    awk -v d="$d" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  rm -rf --one-file-system "$d"
}

BUILD_PIDS=()
cleanup() {
  local p
  for p in "${BUILD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP   # so that the EXIT trap runs

debootstrap_into() {  # debootstrap_into LOG SUITE TARGET PACKAGES
  local logf=$1 suite=$2 target=$3 include=$4
  if ! debootstrap --variant=minbase --include="$include" "$suite" "$target" "$MIRROR" >"$logf" 2>&1; then
    tail -n 20 "$logf" >&2
    return 1
  fi
}

# ---------------------------------------------------------------- start the image's root early
# (the sid root and the bookworm image root download at the same time: mostly network-bound)
IMG_TMP=$IMAGES/.build
IMG_PID=""
IMAGE_PACKAGES=python3
IMAGE_RECIPE="bookworm minbase $IMAGE_PACKAGES; sandbox + SIF v1"   # change it to rebuild the images
need_images() {
  [ ! -e "$SIF" ] || [ ! -e "$SANDBOX/.singularity.d/actions/exec" ] \
    || [ "$(cat "$IMAGES/.recipe" 2>/dev/null)" != "$IMAGE_RECIPE" ]
}
if need_images; then
  mkdir -p "$IMAGES"
  remove_tree "$IMG_TMP"
  mkdir -p "$IMG_TMP"
  log "debootstrap bookworm ($IMAGE_PACKAGES) for the test image, in the background"
  debootstrap --variant=minbase --include="$IMAGE_PACKAGES" bookworm "$IMG_TMP/raw" "$MIRROR" \
    >"$IMG_TMP/debootstrap.log" 2>&1 9>&- &
  IMG_PID=$!
  BUILD_PIDS+=("$IMG_PID")
fi

# ---------------------------------------------------------------- sid root with apptainer
if [ ! -x "$ROOTFS/usr/bin/apptainer" ]; then
  for old in "$DIR"/.rootfs.tmp.*; do remove_tree "$old"; done
  if [ -e "$ROOTFS" ]; then log "removing incomplete $ROOTFS"; remove_tree "$ROOTFS"; fi
  TMP_ROOT=$DIR/.rootfs.tmp.$$
  log "debootstrap sid with apptainer into $ROOTFS (about a minute)"
  debootstrap_into "$DIR/debootstrap-sid.log" sid "$TMP_ROOT" \
    apptainer,squashfs-tools,squashfuse,fuse3,fuse2fs,gocryptfs \
    || die "debootstrap of sid failed (log: $DIR/debootstrap-sid.log)"
  cp /etc/hosts "$TMP_ROOT/etc/hosts"
  chroot "$TMP_ROOT" useradd -m -u 1000 sbx
  mkdir -m 700 "$TMP_ROOT/.oldroot"   # the launcher's pivot_root puts the host root there, then drops it
  # no systemd here: the cgroups manager would only print warnings
  sed -i 's/^systemd cgroups = yes/systemd cgroups = no/' "$TMP_ROOT/etc/apptainer/apptainer.conf"
  rm -rf "$TMP_ROOT"/var/cache/apt/* "$TMP_ROOT"/var/lib/apt/lists/* "$TMP_ROOT"/usr/share/doc/* \
    "$TMP_ROOT"/usr/share/man/* "$TMP_ROOT"/usr/share/locale/*
  [ -x "$TMP_ROOT/usr/bin/apptainer" ] || die "no apptainer in the new root"
  mv -T "$TMP_ROOT" "$ROOTFS"
  log "sid root ready after $((SECONDS - T0)) s"
fi
cmp -s /etc/hosts "$ROOTFS/etc/hosts" || cp /etc/hosts "$ROOTFS/etc/hosts"

# ---------------------------------------------------------------- launcher
mkdir -p "$DIR/bin"
install_launcher() {
  local name=$1 tmp="$DIR/bin/.$1.tmp.$$"
  {
    echo '#!/bin/bash'
    echo "# Generated by tests/env/apptainer-up.sh; see the comments below."
    printf 'SBX_APPTAINER_HOME=%q\n' "$DIR"
    printf 'SBX_APPTAINER_BAKED_BINDS=%q\n' "${SBX_APPTAINER_BINDS:-}"
    cat "$HERE/apptainer-launcher.sh"
  } >"$tmp"
  chmod 755 "$tmp"
  if cmp -s "$tmp" "$DIR/bin/$name"; then rm -f "$tmp"; else mv -f "$tmp" "$DIR/bin/$name"; fi
}
install_launcher apptainer
install_launcher singularity
LAUNCHER=$DIR/bin/apptainer

# ---------------------------------------------------------------- test images
if need_images; then
  if [ -n "$IMG_PID" ]; then
    wait "$IMG_PID" || { tail -n 20 "$IMG_TMP/debootstrap.log" >&2; die "debootstrap of bookworm failed"; }
    BUILD_PIDS=()
  fi
  RAW=$IMG_TMP/raw
  # small: no apt lists/caches, docs, man pages, locales; no device nodes (apptainer binds /dev);
  # world-readable so that uid 1000 can copy it (shadow files included: a test image only)
  rm -rf "$RAW"/var/cache/apt/* "$RAW"/var/lib/apt/lists/* "$RAW"/usr/share/doc/* "$RAW"/usr/share/man/* \
    "$RAW"/usr/share/locale/* "$RAW"/usr/share/info/* "$RAW"/var/log/* "$RAW"/var/cache/debconf/*-old
  find "$RAW/dev" -mindepth 1 -delete
  chmod -R a+rX "$RAW"
  chown 1000 "$IMG_TMP"
  log "apptainer build --sandbox, then the SIF"
  "$LAUNCHER" -s build --sandbox "$IMG_TMP/debian-python" "$RAW" >&2 || die "apptainer build --sandbox failed"
  "$LAUNCHER" -s build "$IMG_TMP/debian-python.sif" "$IMG_TMP/debian-python" >&2 || die "apptainer build (SIF) failed"
  chown -R 0:0 "$IMG_TMP/debian-python" "$IMG_TMP/debian-python.sif"
  chmod 644 "$IMG_TMP/debian-python.sif"
  remove_tree "$SANDBOX"
  mv -T "$IMG_TMP/debian-python" "$SANDBOX"
  mv -f "$IMG_TMP/debian-python.sif" "$SIF"
  remove_tree "$IMG_TMP"
  echo "$IMAGE_RECIPE" >"$IMAGES/.recipe"
  log "images ready after $((SECONDS - T0)) s ($(du -sh "$SANDBOX" | cut -f1) sandbox, $(du -sh "$SIF" | cut -f1) SIF)"
fi

# ---------------------------------------------------------------- check
(cd / && "$LAUNCHER" exec "$SIF" /bin/true) || die "apptainer exec $SIF /bin/true failed"
log "ready in $((SECONDS - T0)) s: $LAUNCHER ($("$LAUNCHER" --version))"

# (DIR has no spaces or shell-special characters: checked above)
echo "export PATH=$DIR/bin:\$PATH"
echo "export SBX_TEST_IMAGE_SIF=$SIF"
echo "export SBX_TEST_IMAGE_DIR=$SANDBOX"
