#!/bin/bash
set -euo pipefail
if [ -n "${SCALEBOX_BODY_FILE:-}" ]; then
    cp "$SCALEBOX_BODY_FILE" "$OUT_DIR/$TASK_ID"
else
    printf '%s' "$1" > "$OUT_DIR/$TASK_ID"
fi
case "$1" in
    sleep:*)
        sleep "${1#sleep:}" ;;
    emit:*)
        printf 'good-line\n' > "$WORK_DIR/sink-tasks.txt"
        printf 'bad-line,{"not json\n' >> "$WORK_DIR/sink-tasks.txt" ;;
esac
