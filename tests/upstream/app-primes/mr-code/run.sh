#!/bin/bash
# The main router: the start task is the upper end of the range; counts come back from
# my-module in the header part_primes.
set -e
from='"from_module": *"([^"]*)"'
part='"part_primes": *"([0-9]+)"'
if [[ $2 =~ $from ]] && [ "${BASH_REMATCH[1]}" = my-module ]; then
    [[ $2 =~ $part ]] || { echo "no part_primes in $2" >&2; exit 4; }
    scalebox semaphore increment-n app-primes:sum_value "${BASH_REMATCH[1]}"
    echo "part_sum=${BASH_REMATCH[1]}"
    exit 0
fi
total=$1
groups=${NUM_GROUPS:-10}
size=$(( (total + groups - 1) / groups ))
for ((start = 1; start <= total; start += size)); do
    end=$((start + size - 1))
    ((end > total)) && end=$total
    printf 'my-module,%09d_%09d,{"len":"%d"}\n' "$start" "$end" "$size" >> "${WORK_DIR:-.}/sink-tasks.txt"
done
