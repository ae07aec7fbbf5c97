#!/usr/bin/env python3
"""gather (at site A, slots: 1): body = `start:end:count`; header files = the forwarded
primes file, in this site's inbox. Checks the file against the count, records the range
in GATHER_DIR (idempotent), and writes the total to app-result.txt once all are in."""
import json
import os
import sys

start, end, count = (int(x) for x in sys.argv[1].strip().split(":"))
headers = json.loads(sys.argv[2])
(path,) = headers["files"]
with open(path) as f:
    found = sum(1 for line in f if line.strip())
if found != count:
    sys.exit(f"gather: {path} holds {found} primes, the message says {count}")
state = os.path.join(os.environ["GATHER_DIR"], f"app-{os.environ['APP_ID']}-{headers.get('run_id', 'norun')}")
os.makedirs(state, exist_ok=True)
tmp = os.path.join(state, f".{start}_{end}.{os.getpid()}")
with open(tmp, "w") as f:
    f.write(f"{found}\n")
os.replace(tmp, os.path.join(state, f"{start}_{end}"))
parts = [p for p in os.listdir(state) if not p.startswith(".")]
print(f"gather on {os.environ.get('SITE')}: {path}: {found}; {len(parts)}/{headers['total_ranges']} ranges in")
if len(parts) >= int(headers["total_ranges"]):
    total = 0
    for p in parts:
        with open(os.path.join(state, p)) as f:
            total += int(f.read())
    with open(os.path.join(os.environ["WORK_DIR"], "app-result.txt"), "w") as f:
        f.write(f"{total}\n")
