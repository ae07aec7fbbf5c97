#!/usr/bin/env bash
# Module 'hello': greet the message body and set it as the app's result text.
set -euo pipefail
body="${1:-}"
cd "${WORK_DIR:?WORK_DIR not set}"
printf 'Hello %s, it is OK!\n' "$body" > app-result.txt
echo "said hello to ${body}"
