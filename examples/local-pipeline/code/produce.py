#!/usr/bin/env python3
"""produce: body = a part name. Write FILE_MB MiB of random bytes to DATA_DIR (node-local
scratch that outlives the task) and send the file's name to consume, pinned to this
host with a to_host header: the data never leaves the node."""
import hashlib
import json
import os
import sys

part = sys.argv[1].strip()
if not part or "/" in part or part.startswith("."):
    sys.exit(f"produce: body {part!r} is not a plain name")
size = int(os.environ.get("FILE_MB", "50")) * 1024 * 1024
name = f"{part}.bin"
path = os.path.join(os.environ["DATA_DIR"], name)
digest = hashlib.sha256()
with open(path + ".tmp", "wb") as f:
    left = size
    while left:
        chunk = os.urandom(min(left, 1 << 20))
        digest.update(chunk)
        f.write(chunk)
        left -= len(chunk)
os.replace(path + ".tmp", path)   # consume never sees half a file

headers = {"to_host": os.environ["LOCAL_HOST"], "sha256": digest.hexdigest(), "size": str(size)}
work = os.environ["WORK_DIR"]
with open(os.path.join(work, "sink-tasks.txt"), "w") as f:
    f.write(f"{name},{json.dumps(headers)}\n")
with open(os.path.join(work, "task-exec.json"), "w") as f:
    json.dump({"outputBytes": size, "outputFiles": [path]}, f)
print(f"produce: {size} bytes in {path} on {os.environ['LOCAL_HOST']}")
