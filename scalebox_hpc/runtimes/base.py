"""What every runtime shares: the Runtime interface, a program's result, the output
buffers, and the variables a task's program gets.

A runtime turns (program, body, headers, environment, WORK_DIR, timeout) into an exit
code and captured output. The worker holds one per module, chosen once by
``runtimes.runtime_for``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone

from ..resources import GPU_VARIABLES

# Variables a task's program gets from the worker (a container starts from a clean
# environment with exactly these, plus the module's 'environments'): its lane and, on a
# GPU node, the GPUs it was given.
TASK_VARIABLES = frozenset({"WORK_DIR", "DATA_DIR", "APP_ID", "MODULE_NAME", "MODULE_ID", "TASK_ID", "ATTEMPT",
                            "SITE", "LOCAL_HOST", "LOCAL_IP", "SLURM_JOB_ID", "SCALEBOX_BODY_FILE",
                            "OMP_NUM_THREADS", "SLOT_ID",
                            # upstream Scalebox's names (worker.upstream_variables)
                            "JOB_NAME", "JOB_ID", "SINK_MODULE", "SINK_JOB", "CLUSTER", "IS_SINGULARITY",
                            "CODE_PATH", *GPU_VARIABLES})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ProgramResult:
    code: int
    started: datetime
    ended: datetime
    stdout: str
    stderr: str
    timed_out: bool = False
    killed: bool = False         # stopped by the worker (lease lost, app cancelled)


class OutputBuffer:
    """An in-memory file the program writes stdout or stderr to.

    One per worker, reused for every task: no file in WORK_DIR, no pipe thread.
    Keeps ``limit`` bytes from the head or the tail.
    """

    def __init__(self, name: str, limit: int, keep: str = "tail"):
        self.fd = os.memfd_create(f"scalebox-{name}", os.MFD_CLOEXEC)
        self.limit = limit
        self.keep = keep
        self.dirty = False

    def reset(self) -> None:
        if self.dirty:       # most short programs print nothing: skip the syscalls then
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.dirty = False

    def write(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_bytes(self, data: bytes) -> None:
        os.write(self.fd, data)
        self.dirty = True

    def text(self) -> str:
        size = os.fstat(self.fd).st_size
        if size == 0:
            return ""
        self.dirty = True
        if size <= self.limit:
            data = os.pread(self.fd, size, 0)
        elif self.keep == "head":
            data = os.pread(self.fd, self.limit, 0) + b"\n[... truncated by scalebox-hpc]"
        else:
            data = b"[truncated by scalebox-hpc ...]\n" + os.pread(self.fd, self.limit, size - self.limit)
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self.fd)


class Runtime:
    """Starts one program per task."""

    #: True when WORK_DIR is bound once for the runtime's life (a container instance):
    #: the worker must then empty it in place, never replace it.
    fixed_workdir = False

    def prepare(self) -> None:
        """Get ready before the first task (containers: pull the image, start an instance)."""

    def close(self) -> None:
        """Release what prepare() made (the worker is leaving)."""

    def run(self, program: str, body: str, headers_json: str, *, env: dict[str, str], cwd: str,
            timeout: float | None, stdout: OutputBuffer, stderr: OutputBuffer) -> ProgramResult:
        raise NotImplementedError

    def executables(self, paths: list[str]) -> set[str]:
        """Which of these paths are executable files where the programs run."""
        return {path for path in paths if os.path.isfile(path) and os.access(path, os.X_OK)}

    def kill(self) -> None:
        """Stop the running program (called from another thread)."""
