"""A lane's batches of short host tasks, run in a process of its own.

A pilot's lanes are threads of one process, and each short task costs its lane about
as much Python as subprocess.run does (WORK_DIR, spawn, wait, the files the program
left). Two lanes of /bin/true-sized tasks then wait on one another for the interpreter
lock. For such batches the lane forks, once per module it runs this way: the child
runs each batch it is sent, task after task (TaskRunner._run_task, exactly as the
thread would), and sends the TaskResults back through a pipe as they finish; the lane
thread takes them in and hands them to the pilot, which alone talks to the database,
as before. The child lives as long as its lane (a fork per batch would copy the
pilot's pages again and again).

What crosses between the two:
- pilot -> child, in a shared page (LaneShared): "take no more tasks" (drain, stop,
  the app stopped) and "the job is being stopped" (a program killed by the job's end
  is lost, not failed);
- child -> pilot, in the same page: the task running and since when (the heartbeat
  marks long ones RUNNING); SIGUSR2 to the child kills its running program (app
  cancelled, lease lost);
- pilot -> child, in a pipe: each batch, with the cores and GPUs the lane has for it;
- child -> pilot, in another: the results with their durations, then at the batch's
  end the runner's state (its WORK_DIR, the failed ones it kept).
The child never touches the database, the pilot's locks or its threads; it dies with
its lane thread (PR_SET_PDEATHSIG), and the program it runs lives on in its own session
like a thread lane's would: a pilot SIGKILLed mid-batch loses its tasks to the lease.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import select
import signal
import struct
import threading
import time
import traceback

log = logging.getLogger(__name__)

STOP = 1            # take no more tasks
TERMINATED = 2      # the batch job is being stopped
_PR_SET_PDEATHSIG = 1
# Results travel in bundles this often, not one by one: a wake-up of the lane thread per
# task costs as much as the interpreter lock did.
SEND_SECONDS = 0.02
_FRAME = struct.Struct("<I")
_CURRENT = struct.Struct("<qd")     # task id (-1: none), monotonic start
# The pilot's ends of every lane process's pipes: a new child closes them, or a child
# would keep another's input open past its end.
_PILOT_FDS: set[int] = set()
_FORK_LOCK = threading.Lock()       # one lane makes its pipes and forks at a time


class LaneShared:
    """One anonymous shared page per lane, made before any fork: flags set by the pilot,
    the running task set by whichever process runs it."""

    def __init__(self):
        self.page = mmap.mmap(-1, mmap.PAGESIZE)
        self.current = None

    @property
    def flags(self) -> int:
        return self.page[0]

    def set(self, flag: int) -> None:
        self.page[0] = self.page[0] | flag

    def clear(self) -> None:
        self.page[0] = 0

    @property
    def current(self) -> tuple[int, float] | None:
        task_id, started = _CURRENT.unpack_from(self.page, 8)
        return None if task_id < 0 else (task_id, started)

    @current.setter
    def current(self, value: tuple[int, float] | None) -> None:
        _CURRENT.pack_into(self.page, 8, *(value or (-1, 0.0)))


def _send(fd: int, message) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    data = _FRAME.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _receive(fd: int):
    """The next message, or None at end of input."""
    head = _read_exactly(fd, _FRAME.size)
    body = head and _read_exactly(fd, _FRAME.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _serve(runner, lane, inbox: int, outbox: int, parent: int) -> None:
    """In the forked child: run each batch sent until told to stop, report each task."""
    stop = []

    def on_stop(signum, _frame):
        if signum != signal.SIGUSR1:
            runner.pilot.terminated = True
        stop.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGUSR2, lambda _s, _f: runner.runtime.kill())
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return
    shared = lane.shared
    while (message := _receive(inbox)) is not None:
        tasks, (lane.cpus, lane.gpus, lane.mem_mb, lane.node_gpus) = message
        # The output buffers are the lane's files: what ran last is not known here.
        runner.out.dirty = runner.err.dirty = True
        done, sent = [], time.monotonic()
        for task in tasks:
            if stop or shared.flags & STOP:
                break
            started = time.monotonic()
            result = runner._run_task(task)
            now = time.monotonic()
            done.append((result, now - started))
            if now - sent >= SEND_SECONDS:
                _send(outbox, ("results", done))
                done, sent = [], now
        _send(outbox, ("results", done))
        _send(outbox, ("end", runner.workdir_ready, runner.failed_workdirs))


class LaneProcess:
    """The pilot's side of a lane's process for one module (see the module's docstring)."""

    def __init__(self, lane, runner):
        self.lane, self.runner = lane, runner
        self.pid: int | None = None
        self.inbox = self.outbox = -1     # the child's: batches in, results out
        self.running = False

    def _start(self) -> None:
        with _FORK_LOCK:
            self._fork()

    def _fork(self) -> None:
        inbox_r, inbox_w = os.pipe()
        outbox_r, outbox_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for fd in (inbox_w, outbox_r, *_PILOT_FDS):
                    os.close(fd)
                _serve(self.runner, self.lane, inbox_r, outbox_w, parent)
            except BaseException:   # noqa: BLE001 - reported to the lane, which fails the pilot
                code = 70
                try:
                    _send(outbox_w, ("crash", traceback.format_exc()))
                except BaseException:   # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(inbox_r)
        os.close(outbox_w)
        self.pid, self.inbox, self.outbox = pid, inbox_w, outbox_r
        _PILOT_FDS.update((inbox_w, outbox_r))
        log.debug("lane %s: process %s for module %s", self.lane.index, pid, self.runner.module_name)

    def run(self, tasks, on_result, should_stop) -> None:
        """Run a batch in the child, and call on_result(result, seconds) for each task it
        ran, in order, until it returns False (the child then takes no more, and what it
        still sends is dropped). should_stop() is asked while the child runs: True tells
        it to take no more."""
        shared, lane = self.lane.shared, self.lane
        shared.clear()
        if self.runner.pilot.terminated:
            shared.set(TERMINATED)
        shared.current = None
        if should_stop():
            return
        batch = (tasks, (lane.cpus, lane.gpus, lane.mem_mb, lane.node_gpus))
        if self.pid is None:
            self._start()
        self.running = True
        try:
            try:
                _send(self.inbox, batch)
            except BrokenPipeError:     # it died since its last batch: a new one
                self.close()
                self._start()
                _send(self.inbox, batch)
            self._results(on_result, should_stop)
        finally:
            self.running = False
            shared.current = None
            # The thread may run this module's next batch: its buffers hold the child's output.
            self.runner.out.dirty = self.runner.err.dirty = True

    def _results(self, on_result, should_stop) -> None:
        listening, buffer = True, bytearray()
        while True:
            if should_stop():
                self.lane.shared.set(STOP)
            ready, _, _ = select.select([self.outbox], [], [], 0.1)
            if not ready:
                continue
            data = os.read(self.outbox, 1 << 16)
            if not data:
                self._fail("ended in the middle of a batch")
            buffer += data
            while len(buffer) >= _FRAME.size:
                (size,) = _FRAME.unpack_from(buffer)
                if len(buffer) < _FRAME.size + size:
                    break
                message = pickle.loads(bytes(buffer[_FRAME.size:_FRAME.size + size]))
                del buffer[:_FRAME.size + size]
                if message[0] == "results":
                    for result, seconds in message[1]:
                        if listening:
                            listening = on_result(result, seconds)
                            if not listening:
                                self.lane.shared.set(STOP)
                elif message[0] == "end":
                    self.runner.workdir_ready, self.runner.failed_workdirs = message[1], message[2]
                    return
                else:
                    self._fail(f"failed:\n{message[1]}")

    def _fail(self, why: str) -> None:
        self.close()
        # The WORK_DIR may be half emptied: the next task makes a fresh one.
        self.runner.workdir_ready = False
        raise RuntimeError(f"lane {self.lane.index}: its process for module {self.runner.module_name} {why}")

    def kill_program(self) -> None:
        """Stop the running program (the child kills it as its runtime would) and take
        no more tasks."""
        self.lane.shared.set(STOP)
        pid = self.pid
        if pid is not None and self.running:
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """End the child (end of its input) and reap it."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        self.lane.shared.set(STOP)
        for fd in (self.inbox, self.outbox):
            _PILOT_FDS.discard(fd)
            os.close(fd)
        self.inbox = self.outbox = -1
        os.waitpid(pid, 0)
