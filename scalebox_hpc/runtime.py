"""How a module's program is started: on the host, or built into the worker.

A runtime turns (program, body, headers, env, WORK_DIR, timeout) into an exit code
and captured output. Container runtimes (Apptainer/Singularity) implement the same
``run`` on top of this one.
"""
from __future__ import annotations

import logging
import os
import select
import signal
from dataclasses import dataclass
from datetime import datetime, timezone

from .states import Code

log = logging.getLogger(__name__)

KILL_GRACE_SECONDS = 5.0


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
    """Starts one program per task. Subclasses decide what the argv becomes."""

    def command(self, program: str, body: str, headers_json: str) -> list[str]:
        return [program, body, headers_json]

    def spawn(self, program: str, body: str, headers_json: str, env: dict[str, str],
              cwd: str) -> tuple[str, list[str], dict[str, str]]:
        """What to start for this task: executable, argv, environment."""
        return program, self.command(program, body, headers_json), env

    def prepare(self) -> None:
        """Get ready before the first task (containers: pull the image, start an instance)."""

    def close(self) -> None:
        """Release what prepare() made (the worker is leaving)."""

    def run(self, program: str, body: str, headers_json: str, *, env: dict[str, str], cwd: str,
            timeout: float | None, stdout: OutputBuffer, stderr: OutputBuffer,
            on_start=None) -> ProgramResult:
        raise NotImplementedError


class HostRuntime(Runtime):
    """The program runs directly on the worker's node, in a session of its own.

    Started with posix_spawn rather than subprocess.Popen: for short tasks the
    per-call bookkeeping of Popen (environment conversion, fd juggling in Python)
    costs as much as starting the program itself.
    """

    def __init__(self):
        self._pid: int | None = None
        self._killed = False

    def run(self, program, body, headers_json, *, env, cwd, timeout, stdout, stderr, on_start=None):
        stdout.reset()
        stderr.reset()
        self._killed = False
        started = utcnow()
        os.chdir(cwd)   # posix_spawn has no cwd argument: the child inherits ours
        try:
            # Body and headers travel as argv elements: no shell ever sees them.
            executable, argv, env = self.spawn(program, body, headers_json, env, cwd)
            pid = os.posix_spawn(executable, argv, env,
                                 file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                               (os.POSIX_SPAWN_DUP2, stdout.fd, 1),
                                               (os.POSIX_SPAWN_DUP2, stderr.fd, 2)],
                                 setsid=True)
        except OSError as exc:
            # Same codes a shell gives for a program it cannot find or run.
            stderr.write(f"scalebox-hpc: cannot start {executable}: {exc.strerror}\n")
            return ProgramResult(126 if os.path.exists(executable) else 127, started, utcnow(),
                                 stdout.text(), stderr.text())
        self._pid = pid
        if on_start:
            on_start()
        timed_out = timeout is not None and not self._wait_exit(pid, timeout)
        if timed_out:
            self._terminate(pid)
        _, status = os.waitpid(pid, 0)
        self._pid = None
        ended = utcnow()
        code = os.waitstatus_to_exitcode(status)
        if timed_out:
            code = Code.TIMEOUT
            stderr.write(f"\nscalebox-hpc: killed after task_max_seconds={timeout:g}\n")
        elif code < 0:
            code = 128 - code  # killed by a signal: report it the way a shell does
        return ProgramResult(code, started, ended, stdout.text(), stderr.text(), timed_out, self._killed)

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> bool:
        """Wait up to timeout for the process to exit (without reaping it)."""
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        finally:
            os.close(pidfd)

    def _terminate(self, pid: int) -> None:
        """SIGTERM the whole process group, SIGKILL it after a grace period."""
        try:
            os.killpg(pid, signal.SIGTERM)
            exited = self._wait_exit(pid, KILL_GRACE_SECONDS)
            # Even if the leader exited, make sure no child of it lingers.
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not exited:
            log.warning("process group %s ignored SIGTERM; killed", pid)

    def kill(self) -> None:
        """Stop the running program (called from another thread)."""
        pid = self._pid
        if pid is not None:
            self._killed = True
            self._terminate(pid)


class BuiltinRuntime(Runtime):
    """Programs built into the worker, named '@name'. '@noop' does nothing and exits 0:
    it measures the queue itself, with no process start in the way."""

    def run(self, program, body, headers_json, *, env, cwd, timeout, stdout, stderr, on_start=None):
        now = utcnow()
        if program != "@noop":
            return ProgramResult(127, now, now, "", f"scalebox-hpc: unknown builtin program {program}\n")
        return ProgramResult(0, now, now, "", "")

    def kill(self) -> None:
        pass


def runtime_for(program: str | None, base_image: str, **container) -> Runtime:
    """The runtime for a module: builtin, host, or a container (``container`` holds the
    ContainerRuntime settings the worker knows: binary, workdir, data_dir, ...)."""
    if program and program.startswith("@"):
        return BuiltinRuntime()
    if base_image in ("host", "", None):
        return HostRuntime()
    from .containers import ContainerRuntime
    return ContainerRuntime(image=base_image, **container)
