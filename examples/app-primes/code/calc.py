#!/usr/bin/env python3
"""calc: body = `start:end`; count the primes in [start, end] and send
`start:end:count` to gather, passing the total_ranges/max/run_id headers on."""
import json
import os
import sys


def count_primes(start, end):
    if end < 2:
        return 0
    sieve = bytearray([1]) * (end + 1)
    sieve[0] = sieve[1] = 0
    p = 2
    while p * p <= end:
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, end + 1, p)))
        p += 1
    return sum(sieve[max(start, 0) : end + 1])


start, end = (int(x) for x in sys.argv[1].strip().split(":"))
headers = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].strip() else {}
out = {k: str(headers[k]) for k in ("total_ranges", "max", "run_id") if k in headers}
count = count_primes(start, end)
with open(os.path.join(os.environ["WORK_DIR"], "sink-tasks.txt"), "w") as f:
    f.write(f"{start}:{end}:{count},{json.dumps(out)}\n")
print(f"calc: {count} primes in [{start}, {end}]")
