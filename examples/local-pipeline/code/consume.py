#!/usr/bin/env python3
"""consume: body = a file name in DATA_DIR, headers = its sha256 and size. Read it (it is
on this node: the module is HOST-BOUND and the message has a to_host), check it, delete
it, and record the bytes read."""
import hashlib
import json
import os
import sys

name = sys.argv[1].strip()
headers = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].strip() else {}
host = os.environ["LOCAL_HOST"]
if not name or "/" in name or name.startswith("."):
    sys.exit(f"consume: body {name!r} is not a plain file name")
path = os.path.join(os.environ["DATA_DIR"], name)
if not os.path.exists(path):
    # With host_fallback: anywhere a task whose host is gone runs elsewhere, and its
    # header wanted_host says where the file was: it is not here.
    where = headers.get("wanted_host") or headers.get("to_host") or "?"
    print(f"consume: {name} is not in DATA_DIR on {host}: it was written on {where}", file=sys.stderr)
    sys.exit(3)

digest, size = hashlib.sha256(), 0
with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
if str(size) != headers.get("size") or digest.hexdigest() != headers.get("sha256"):
    print(f"consume: {name} on {host}: {size} bytes, sha256 {digest.hexdigest()}; "
          f"expected {headers.get('size')} bytes, sha256 {headers.get('sha256')}", file=sys.stderr)
    sys.exit(2)
os.remove(path)   # consumed: free the node's scratch

work = os.environ["WORK_DIR"]
with open(os.path.join(work, "task-exec.json"), "w") as f:
    json.dump({"inputBytes": size, "inputFiles": [path], "userText": f"sha256 ok on {host}"}, f)
with open(os.path.join(work, "semaphores.txt"), "w") as f:
    f.write(f"bytes_consumed +{size}\nfiles_consumed +1\n")
print(f"consume: {size} bytes of {name} checked and removed on {host}")
