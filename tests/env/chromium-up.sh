#!/usr/bin/env bash
# Make a headless Chromium available for the report tests and print its path on stdout.
#
#   CHROMIUM=$(bash tests/env/chromium-up.sh)
#
# Uses $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH; installs Debian's
# `chromium` (plus a basic font, so text is drawn) with apt-get when none is found, which
# needs root. Exits non-zero with the reason on stderr when no browser can be had.
set -euo pipefail

log() { echo "chromium-up: $*" >&2; }

find_browser() {
  local b
  for b in ${CHROMIUM:-} chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

if path=$(find_browser); then echo "$path"; exit 0; fi
[ "$(id -u)" = 0 ] || { log "no chromium on PATH and not root: install it (apt-get install chromium)"; exit 1; }
command -v apt-get >/dev/null || { log "no chromium on PATH and no apt-get to install it"; exit 1; }

# Other environment scripts may be installing at the same time: wait for dpkg's lock.
log "installing chromium (apt-get update first)"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update >&2
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends chromium fonts-dejavu-core >&2
path=$(find_browser) || { log "chromium still missing after apt-get install"; exit 1; }
echo "$path"
