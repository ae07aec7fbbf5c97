#!/usr/bin/env python3
"""store-file (at the destination site): body = the forwarded file, header files = [it].
Moves it to DEST_DIR/<relative path> (relative path from the source, kept by the
forward) and sets the app result once DEST_DIR holds every file."""
import json
import os
import shutil
import sys

headers = json.loads(sys.argv[2])
(path,) = headers["files"]
rel = os.path.relpath(path, headers["inbox_dir"])
dest_root = os.environ["DEST_DIR"]
dest = os.path.join(dest_root, rel)
os.makedirs(os.path.dirname(dest), exist_ok=True)
if os.path.getsize(path) != int(headers["size"]):
    sys.exit(f"store-file: {path} has {os.path.getsize(path)} bytes, the source had {headers['size']}")
tmp = f"{dest}.part-{os.getpid()}"
shutil.copyfile(path, tmp)          # the inbox may be on another filesystem
os.replace(tmp, dest)
with open(os.path.join(os.environ["WORK_DIR"], "input-files.txt"), "w") as f:
    f.write(path + "\n")
done = sum(len([f for f in fs if ".part-" not in f]) for _, _, fs in os.walk(dest_root))
print(f"store-file: {rel} -> {dest} ({done}/{headers['total']})")
if done >= int(headers["total"]):
    with open(os.path.join(os.environ["WORK_DIR"], "app-result.txt"), "w") as f:
        f.write(f"copied {done} files\n")
