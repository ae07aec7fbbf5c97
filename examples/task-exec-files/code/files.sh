#!/usr/bin/env bash
# Module 'files': write data files and the optional result files a task may leave in WORK_DIR.
set -euo pipefail
cd "${WORK_DIR:?WORK_DIR not set}"
head -c 1000 /dev/zero > in.dat
head -c 2500 /dev/zero > out.dat
cat > task-exec.json <<'JSON'
{"inputBytes": 1000, "outputBytes": 2500, "inputFiles": ["in.dat"], "outputFiles": ["out.dat"], "userText": "checked 42 records", "timestamps": ["parsed,2026-01-02T03:04:05+00:00"]}
JSON
echo 'user-step,2026-01-02T03:04:06+00:00' > timestamps.txt
echo 'aux note' > auxout.txt
echo "files: wrote in.dat, out.dat and the task-exec files for '${1:-}'"
