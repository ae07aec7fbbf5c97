#!/usr/bin/env python3
"""Writes ok.txt, then sends one message to take naming the file given as the body."""
import json
import os
import sys

work = os.environ["WORK_DIR"]
with open(os.path.join(work, "ok.txt"), "w") as f:
    f.write("fine\n")
with open(os.path.join(work, "sink-tasks.txt"), "w") as f:
    f.write(json.dumps({"body": sys.argv[1], "headers": {"files": [sys.argv[1]]}}) + "\n")
