"""The `scalebox` command a task's program can call (upstream Scalebox's in-task CLI).

The command is a POSIX sh script (``scalebox`` beside this file), so that it runs in any
container image. A pilot copies it into its scratch and puts it first on every task's
PATH; containers get that directory bound at CONTAINER_BIN, first on their PATH.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

SCRIPT = Path(__file__).with_name("scalebox")
BIN_DIR = ".sbx-bin"                  # under the pilot's scratch
CONTAINER_BIN = "/scalebox-hpc/bin"   # where containers see it


def install(bin_dir: Path) -> Path:
    """Copy the command into ``bin_dir`` (executable whatever the install kept) and return the directory."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "scalebox"
    shutil.copyfile(SCRIPT, target)
    os.chmod(target, 0o755)
    return bin_dir
