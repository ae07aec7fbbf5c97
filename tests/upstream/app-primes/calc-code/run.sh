#!/bin/bash
# Count the primes in start_end and send the count back in a header.
set -eo pipefail
start=$((10#${1%_*}))
end=$((10#${1#*_}))
num=$(python3 -c '
import sys
a, b = int(sys.argv[1]), int(sys.argv[2])
print(sum(1 for n in range(max(a, 2), b + 1) if all(n % d for d in range(2, int(n ** 0.5) + 1))))
' "$start" "$end")
scalebox task add -H part_primes=$num $1
