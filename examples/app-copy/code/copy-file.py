#!/usr/bin/env python3
"""copy-file: body = a path relative to header source_dir. Sends it on to store-file,
naming the file: scalebox-hpc forwards it to store-file's site (verified, atomic) and
the message arrives there naming the copy in that site's inbox."""
import json
import os
import sys

rel = sys.argv[1]
headers = json.loads(sys.argv[2])
size = os.path.getsize(os.path.join(headers["source_dir"], rel))
msg = {"body": rel, "headers": {"files": [rel], "files_root": headers["source_dir"],
                                "total": headers["total"], "size": str(size)}}
with open(os.path.join(os.environ["WORK_DIR"], "sink-tasks.txt"), "w") as out:
    out.write(json.dumps(msg) + "\n")
