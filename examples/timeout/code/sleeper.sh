#!/usr/bin/env bash
# Module 'sleeper': print 'started', sleep SLEEP_SECONDS, print 'finished'.
# With task_max_seconds < SLEEP_SECONDS the engine kills it: status 124, only 'started' kept.
set -euo pipefail
echo started
sleep "${SLEEP_SECONDS:-20}" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; exit 143' TERM INT HUP
wait "$pid"
echo finished
