#!/bin/bash
# Upstream's check_test check script, re-created: a coin with three sides. Only 0 lets
# the module take a task; every throw is noted in /work/user-file.txt.
code=$((RANDOM % 3))
echo "check_code:$code" >> /work/user-file.txt
exit $code
