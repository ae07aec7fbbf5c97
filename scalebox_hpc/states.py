"""The vocabulary of states: tasks, system codes, apps, workers and sites (and the
names of the runtimes a site may choose).

This is the only place that defines them. Python code uses these names; the SQL in
``db/*.sql`` writes task statuses and codes as ``@NAME`` (``@READY``, ``@LEASE_LOST``),
which ``db`` replaces with the numbers below when it loads the queries, and app and
worker states as the same quoted words ('RUNNING', 'PENDING') as here.

A task's status is one integer: negative states while it waits or runs, 0 when it
succeeded, the program's exit code (above 0) or a system code (-100 and below) when
it failed for good.
"""
from __future__ import annotations


class TaskStatus:
    """Where a task stands (the ``tasks.status`` column)."""
    INITIAL = -9     # not yet released (unused by this engine; upstream's 'initial')
    READY = -1       # waiting for a worker
    QUEUED = -2      # claimed into a worker's batch
    RUNNING = -3     # its program runs (marked once it has run for a moment)
    OK = 0

    NAMES = {INITIAL: "INITIAL", READY: "READY", QUEUED: "QUEUED", RUNNING: "RUNNING", OK: "OK"}
    #: statuses that still have work ahead: an app with one of them is not finished
    UNFINISHED = (INITIAL, READY, QUEUED, RUNNING)
    #: held by a worker
    HELD = (QUEUED, RUNNING)


class Code:
    """Codes an attempt can end with besides a program's own exit code, with their meanings."""
    OK = 0
    LEASE_LOST = 123         # the worker died, or its job was stopped, while holding the task
    TIMEOUT = 124            # killed after task_max_seconds
    NOT_EXECUTABLE = 126     # as a shell says: found but cannot be run
    NOT_FOUND = 127          # as a shell says: no such program
    TASK_FILE = -101         # a file the program left in WORK_DIR is malformed
    NO_DESTINATION = -102    # output messages with no sink module and no main_router
    WORKDIR = -103           # WORK_DIR could not be made
    IMAGE = -104             # the container image cannot be found, pulled or started
    SCRATCH_FULL = -105      # node-local scratch ran out of space
    HOST_GONE = -106         # a HOST-BOUND task's to_host is gone (host_fallback: fail)
    FORWARD = -107           # files for another site could not be forwarded (after retries)
    PATH_REFUSED = -108      # a message names a path that leaves its directory ('..', absolute)

    MEANINGS = {
        OK: "ok", LEASE_LOST: "lease lost (worker died or its job was stopped)",
        TIMEOUT: "timeout (task_max_seconds)", NOT_EXECUTABLE: "program not executable",
        NOT_FOUND: "program not found", TASK_FILE: "malformed task file",
        NO_DESTINATION: "output message with no destination", WORKDIR: "WORK_DIR could not be made",
        IMAGE: "container image not found / not pulled / not started", SCRATCH_FULL: "node-local scratch full",
        HOST_GONE: "the task's to_host is gone", FORWARD: "forward to another site failed",
        PATH_REFUSED: "path in a message refused (leaves its directory)",
    }
    #: how many times a lost attempt is retried when no rule names LEASE_LOST (see retry.py)
    LEASE_LOST_DEFAULT_RETRIES = 3


class AppStatus:
    INITIAL = "INITIAL"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    ALL = (INITIAL, RUNNING, PAUSED, FINISHED, FAILED, CANCELLED)
    #: an app in one of these runs nothing more (FINISHED reopens when tasks are added)
    TERMINAL = (FINISHED, FAILED, CANCELLED)


class WorkerStatus:
    PENDING = "PENDING"      # its row exists, its process or batch job has not registered yet
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    EXITED = "EXITED"        # left by itself (idle, app over, drained)
    FAILED = "FAILED"        # a hook failed or it crashed: counts against the module
    LOST = "LOST"            # declared lost by the controller (lease expired, job gone)

    ALL = (PENDING, RUNNING, DRAINING, EXITED, FAILED, LOST)
    LIVE = (PENDING, RUNNING, DRAINING)


class SiteStatus:
    OK = "OK"
    DEGRADED = "DEGRADED"    # submissions keep failing: probed once per back-off period
    UNKNOWN = "UNKNOWN"      # no controller has reported on it yet


def status_name(code: int) -> str:
    return TaskStatus.NAMES.get(code, f"FAILED({code})")


def meaning(code: int) -> str:
    """What an attempt's code says, for tables and reports."""
    return Code.MEANINGS.get(code, "exit code" if code > 0 else status_name(code))


#: container binaries, in the order a node without a site choice looks for them
CONTAINER_RUNTIMES = ("apptainer", "singularity")
#: what a site config's 'runtime' and the worker's --runtime may say ('host': no container)
RUNTIMES = ("host", *CONTAINER_RUNTIMES)
#: a site's 'container_gpu': the runtime flag that gives containers the node's GPUs
CONTAINER_GPU_FLAGS = {"nv": "--nv", "rocm": "--rocm", "none": None}


def is_failure(code: int) -> bool:
    """A final failed status: an exit code, or a system code (-100 and below)."""
    return code > TaskStatus.OK or code < TaskStatus.INITIAL


def parse_status(text: str) -> tuple[int | None, bool]:
    """A --status value: a code or a name (FAILED = any failure) -> (code, failed)."""
    name = text.strip().upper()
    if name == "FAILED":
        return None, True
    for code, known in TaskStatus.NAMES.items():
        if known == name:
            return code, False
    try:
        return int(text), False
    except ValueError:
        raise ValueError(f"unknown status {text!r}: a code or one of "
                         f"{', '.join([*TaskStatus.NAMES.values(), 'FAILED'])}") from None


def sql_constants() -> dict[str, int]:
    """The ``@NAME`` constants the SQL files may use: task statuses and codes by name."""
    values: dict[str, int] = {}
    for cls in (TaskStatus, Code):
        for name, value in vars(cls).items():
            if name.isupper() and isinstance(value, int):
                values.setdefault(name, value)
    return values
