#!/bin/bash
# Runs once before the module's first task; says so on both streams.
echo "setup stdout"
echo "setup stderr" >&2
