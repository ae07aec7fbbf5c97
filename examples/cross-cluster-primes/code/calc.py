#!/usr/bin/env python3
"""calc (at site B): body = `start:end`. Writes the primes of [start, end] one per line
to primes-START-END.txt in WORK_DIR and sends `start:end:count` to gather with header
files=[that file]: scalebox-hpc forwards the file to gather's site and rewrites the
header to the path it has there."""
import json
import os
import sys

start, end = (int(x) for x in sys.argv[1].strip().split(":"))
headers = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].strip() else {}
sieve = bytearray([1]) * (end + 1)
sieve[:2] = b"\0\0"[: min(2, end + 1)]
p = 2
while p * p <= end:
    if sieve[p]:
        sieve[p * p :: p] = bytes(len(range(p * p, end + 1, p)))
    p += 1
primes = [n for n in range(max(start, 0), end + 1) if sieve[n]]
name = f"primes-{start}-{end}.txt"
with open(os.path.join(os.environ["WORK_DIR"], name), "w") as f:
    f.writelines(f"{n}\n" for n in primes)
out = {k: str(headers[k]) for k in ("total_ranges", "max", "run_id") if k in headers}
out["files"] = [name]
with open(os.path.join(os.environ["WORK_DIR"], "sink-tasks.txt"), "w") as f:
    f.write(f"{start}:{end}:{len(primes)},{json.dumps(out)}\n")
print(f"calc on {os.environ.get('SITE')}: {len(primes)} primes in [{start}, {end}] -> {name}")
