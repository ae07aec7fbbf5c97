#!/usr/bin/env bash
# Module 'retry': exit with the code given in the message body (attempt $ATTEMPT).
set -euo pipefail
code="${1:-}"
if ! [[ "$code" =~ ^[0-9]+$ ]] || (( 10#$code > 255 )); then
    echo "retry: body must be an integer 0..255, got '${code}'" >&2
    exit 2
fi
echo "retry: task ${TASK_ID:-?} attempt ${ATTEMPT:-?} exits with ${code}"
exit $((10#$code))
