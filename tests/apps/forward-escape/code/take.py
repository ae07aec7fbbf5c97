#!/usr/bin/env python3
"""Prints the forwarded file."""
import json
import sys

(path,) = json.loads(sys.argv[2])["files"]
print(open(path).read())
