#!/usr/bin/env python3
"""gather (slots: 1): body = `start:end:count`, headers total_ranges/max/run_id.
Records each range as a file `start_end` (holding its count) in a head-node-local
state dir, so a retried or repeated gather overwrites instead of double counting.
When all total_ranges files are present it writes the sum to app-result.txt."""
import json
import os
import sys

start, end, count = (int(x) for x in sys.argv[1].strip().split(":"))
headers = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].strip() else {}
total = int(headers["total_ranges"])
n = headers.get("max", "?")
run = f"app-{os.environ.get('APP_ID', '0')}-{headers.get('run_id', 'norun')}"
state = os.path.join(os.environ.get("GATHER_DIR", "/tmp/scalebox-app-primes"), run)
os.makedirs(state, exist_ok=True)

tmp = os.path.join(state, f".{start}_{end}.{os.getpid()}")
with open(tmp, "w") as f:
    f.write(f"{count}\n")
os.replace(tmp, os.path.join(state, f"{start}_{end}"))  # atomic, idempotent

parts = [p for p in os.listdir(state) if not p.startswith(".")]
print(f"gather: range {start}:{end} = {count}; {len(parts)}/{total} ranges in")
if len(parts) >= total:
    s = 0
    for p in parts:
        with open(os.path.join(state, p)) as f:
            s += int(f.read())
    with open(os.path.join(os.environ["WORK_DIR"], "app-result.txt"), "w") as f:
        f.write(f"{s}\n")
    print(f"gather: primes up to {n}: {s}")
