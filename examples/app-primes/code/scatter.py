#!/usr/bin/env python3
"""scatter: body = N. Split [1..N] into ranges of RANGE_SIZE and send one
calc message per range: `start:end,{"total_ranges":"K","max":"N","run_id":"..."}`."""
import json
import os
import sys
import uuid

n = int(sys.argv[1].strip())
size = int(os.environ.get("RANGE_SIZE", "1000"))
if n < 1 or size < 1:
    sys.exit(f"scatter: need N >= 1 and RANGE_SIZE >= 1, got N={n} RANGE_SIZE={size}")
k = (n + size - 1) // size
# run_id keys gather's state so a re-used APP_ID (e.g. a fresh database) never mixes runs.
run_id = uuid.uuid4().hex[:12]
headers = json.dumps({"total_ranges": str(k), "max": str(n), "run_id": run_id})
with open(os.path.join(os.environ["WORK_DIR"], "sink-tasks.txt"), "w") as f:
    for i in range(k):
        start, end = i * size + 1, min((i + 1) * size, n)
        f.write(f"{start}:{end},{headers}\n")
print(f"scatter: N={n} -> {k} ranges of {size}")
