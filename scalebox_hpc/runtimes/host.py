"""Programs run directly on the worker's node (base_image: host)."""
from __future__ import annotations

import logging
import os
import select
import signal
import threading

from ..states import Code
from .base import ProgramResult, Runtime, utcnow

log = logging.getLogger(__name__)

KILL_GRACE_SECONDS = 5.0
# The working directory is the process's, shared by a pilot's lanes: one chdir and
# spawn at a time.
_SPAWN_LOCK = threading.Lock()
# A lane that forks (laneproc.py) must not leave its child a lock another lane held.
os.register_at_fork(before=_SPAWN_LOCK.acquire, after_in_parent=_SPAWN_LOCK.release,
                    after_in_child=_SPAWN_LOCK.release)
# Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: a
# program must get them at their default, as from a shell (subprocess's restore_signals).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class HostRuntime(Runtime):
    """The program runs directly on the worker's node, in a session of its own.

    Started with posix_spawn rather than subprocess.Popen: for short tasks the
    per-call bookkeeping of Popen (environment conversion, fd juggling in Python)
    costs as much as starting the program itself.
    """

    def __init__(self):
        self._pid: int | None = None
        self._killed = False

    def spawn(self, program: str, body: str, headers_json: str, env: dict[str, str],
              cwd: str) -> tuple[str, list[str], dict[str, str]]:
        """What to start for this task: executable, argv, environment."""
        return program, [program, body, headers_json], env

    def run(self, program, body, headers_json, *, env, cwd, timeout, stdout, stderr):
        stdout.reset()
        stderr.reset()
        self._killed = False
        started = utcnow()
        try:
            # Body and headers travel as argv elements: no shell ever sees them.
            executable, argv, env = self.spawn(program, body, headers_json, env, cwd)
            with _SPAWN_LOCK:
                os.chdir(cwd)   # posix_spawn has no cwd argument: the child inherits ours
                pid = os.posix_spawn(executable, argv, env,
                                     file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                                   (os.POSIX_SPAWN_DUP2, stdout.fd, 1),
                                                   (os.POSIX_SPAWN_DUP2, stderr.fd, 2)],
                                     setsigdef=_DEFAULT_SIGNALS, setsid=True)
        except OSError as exc:
            # Same codes a shell gives for a program it cannot find or run.
            stderr.write(f"scalebox-hpc: cannot start {executable}: {exc.strerror}\n")
            return ProgramResult(Code.NOT_EXECUTABLE if os.path.exists(executable) else Code.NOT_FOUND, started, utcnow(),
                                 stdout.text(), stderr.text())
        self._pid = pid
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
        pid = self._pid
        if pid is not None:
            self._killed = True
            self._terminate(pid)
