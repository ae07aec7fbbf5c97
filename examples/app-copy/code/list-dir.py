#!/usr/bin/env python3
"""list-dir: body = a directory on this site. One message per file to copy-file:
`relative/path,{"source_dir": DIR, "total": "N"}`."""
import json
import os
import sys

root = os.path.realpath(sys.argv[1].strip())
if not os.path.isdir(root):
    sys.exit(f"list-dir: {root} is not a directory")
files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
headers = json.dumps({"source_dir": root, "total": str(len(files))})
with open(os.path.join(os.environ["WORK_DIR"], "sink-tasks.txt"), "w") as out:
    for rel in files:
        out.write(json.dumps({"body": rel, "headers": json.loads(headers)}) + "\n")
print(f"list-dir: {len(files)} files in {root}")
