#!/bin/bash
set -euo pipefail
sleep "$WORK_SECONDS"
printf '%s,{"repeatable":"yes"}\n' "$1" > "$WORK_DIR/sink-tasks.txt"
