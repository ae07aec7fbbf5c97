#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs scalebox-hpc and its test
# dependencies into ./.venv and runs pytest. The suite starts the services it needs
# itself (a private PostgreSQL per session); a missing service fails, never skips.
# Extra arguments go to pytest, e.g. tests/run.sh -k faults -x
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
