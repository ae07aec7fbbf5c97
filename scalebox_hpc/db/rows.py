"""What the database layer hands out and takes in: plain dataclasses, one per kind of
row. A query's column names are the field names (psycopg's class_row builds them), so
other layers import these types without importing any database code."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..appdef import ModuleDef


# -- the queue ---------------------------------------------------------------------------
@dataclass
class Message:
    """A task to insert: one message addressed to one module."""
    module_id: int
    body: str
    headers: dict = field(default_factory=dict)
    created: datetime | None = None
    from_task_id: int | None = None

    @property
    def repeatable(self) -> bool:
        return str(self.headers.get("repeatable", "")).lower() in ("yes", "true", "1")

    @property
    def to_host(self) -> str | None:
        value = self.headers.get("to_host")
        return str(value) if value else None


@dataclass
class ClaimedTask:
    id: int
    body: str
    headers: str          # JSON text, handed to the program as it is
    attempt: int
    ready_at: datetime | None
    claimed_at: datetime
    module_id: int | None = None    # a pilot's claim: which module, and the lane it runs in
    slot: int | None = None


@dataclass
class TaskResult:
    """One finished attempt, as the worker hands it to ``Queue.complete``."""
    task_id: int
    attempt: int
    code: int
    record: dict[str, Any]                        # task_exec columns
    messages: list[Message] = field(default_factory=list)
    semaphores: list[tuple[str, str, int]] = field(default_factory=list)
    app_result: str | None = None
    module_id: int | None = None                  # the task's module (its retry rules, its wake-up)
    removals: list[str] = field(default_factory=list)   # removed-files.txt: deleted once committed
    committed: bool = False                       # set by Queue.complete when it applied this one


@dataclass
class ModuleContext:
    """What a worker reads once at its start: its module and the app around it."""
    module_id: int
    app_id: int
    name: str
    site: str
    host_bound: bool
    module: ModuleDef
    main_router: str | None
    modules: dict[str, int]          # module name -> id, for routing messages
    module_sites: dict[int, str]     # module id -> site, for forwarding across sites


# -- apps ----------------------------------------------------------------------------------
@dataclass
class AppRow:
    id: int
    name: str
    status: str
    site: str
    result: str | None
    message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass
class ModuleRow:
    id: int
    name: str
    site: str
    host_bound: bool
    slots: int
    min_workers: int


@dataclass
class Semaphore:
    name: str
    value: int
    updated_at: datetime


# -- pools (the controller) ----------------------------------------------------------------------
@dataclass
class LiveWorker:
    """A worker row that is PENDING, RUNNING or DRAINING, as a site checks it."""
    id: int
    module_id: int
    status: str
    host: str | None
    pid: int | None
    slurm_job_id: str | None


@dataclass
class LostWorker:
    """A worker whose lease ran out, with the state it was in."""
    id: int
    module_id: int
    status: str


@dataclass
class ModuleDemand:
    """A module of a running app: its pool settings, its ready tasks that any worker may
    take (counted up to a cap), its live workers and its run of failed ones."""
    id: int
    app_id: int
    name: str
    site: str
    slots: int
    min_workers: int
    worker_failures: int
    ready: int
    live: int
    last_failure: datetime | None
    held: int = 0           # tasks claimed by pilots, queued or running
    task_cpus: int = 1
    task_gpus: int = 0
    host_slots: dict | None = None   # upstream's per-host slots: its pilots go to these hosts


@dataclass
class HostDemand:
    """Ready tasks of a HOST-BOUND module that name one to_host, with the module's live
    workers there (``there``; ``started``: those already running) and in all (``live``)."""
    id: int
    app_id: int
    name: str
    site: str
    slots: int
    host_fallback: str
    to_host: str
    ready: int
    there: int
    started: int
    live: int


@dataclass
class SiteRow:
    name: str
    kind: str
    status: str
    reason: str | None
    updated_at: datetime


# -- reading (app show, task show, task list) ------------------------------------------------------
@dataclass
class Task:
    """What every row of a task carries: module by name, status, attempts so far."""
    id: int
    module: str
    status: int
    attempts: int
    body: str
    headers: dict
    to_host: str | None


@dataclass
class TaskRow(Task):
    """A line of 'task list'; host: where the task's last attempt ran."""
    host: str | None
    inserted_at: datetime
    finished_at: datetime | None


@dataclass
class TaskDetail(Task):
    """A task as 'task show' prints it."""
    app_id: int
    repeatable: bool
    from_task_id: int | None
    message_created: datetime | None
    inserted_at: datetime
    ready_at: datetime | None
    claimed_at: datetime | None
    finished_at: datetime | None


@dataclass
class Execution:
    """One attempt with its full record, the worker's place and the task's own times.
    The t_ fields are in the order the stages happen ('task show' prints them so)."""
    attempt: int
    status_code: int
    worker_id: int | None
    site: str | None
    host: str | None
    ip: str | None
    slurm_job_id: str | None
    t_message_created: datetime | None
    t_inserted: datetime | None
    t_ready: datetime | None
    t_claimed: datetime | None
    t_received: datetime | None
    t_check_start: datetime | None
    t_check_end: datetime | None
    t_stagein_start: datetime | None
    t_stagein_end: datetime | None
    t_program_start: datetime | None
    t_program_end: datetime | None
    t_stageout_start: datetime | None
    t_stageout_end: datetime | None
    t_sink_committed: datetime | None
    t_completed: datetime | None
    t_forward_start: datetime | None
    t_forward_end: datetime | None
    user_timestamps: list | None
    stdout: str | None
    stderr: str | None
    user_text: str | None
    auxout: str | None
    input_bytes: int | None
    output_bytes: int | None
    input_files: list | None
    output_files: list | None
    messages_out: int | None
    note: str | None
    forward_bytes: int | None
    forward_files: int | None
    forwards: list | None
    extras: dict | None = None      # upstream's extra-attrs.yaml


@dataclass
class WorkerRow:
    id: int
    module: str
    site: str
    status: str
    host: str | None
    pid: int | None
    slurm_job_id: str | None
    tasks_done: int
    started_at: datetime | None
    heartbeat_at: datetime | None
    stopped_at: datetime | None
    message: str | None


@dataclass
class WorkerCounts:
    """An app's live workers: queued (job not started) and started."""
    pending: int
    started: int


@dataclass
class ModuleStatusRow:
    """Per module and task status: how many, how many finished within the window, when
    the module's work began, and the database's clock."""
    module: str
    status: int | None
    n: int
    done_recently: int
    first_claimed: datetime | None
    now: datetime


# -- the report --------------------------------------------------------------------------------------
@dataclass
class Span:
    t0: float | None
    t1: float | None


@dataclass
class ModuleAttempts:
    module_id: int
    attempts: int
    retries: int
    failed_attempts: int
    lost: int
    run_seconds: float
    busy_seconds: float


@dataclass
class StageBucket:
    """Durations of one stage of one module within one bucket (report_stage_buckets)."""
    module_id: int
    bucket: int
    n: int
    total: float
    low: float
    high: float


@dataclass
class TimeBin:
    """Attempts starting and ending in one time bin, of a module (per_module) or a worker,
    with the time left in the bin after each start and each end."""
    per_module: bool
    module_id: int | None
    worker_id: int | None
    bin: int
    starts: int
    ends: int
    ok: int
    start_rest: float
    end_rest: float


@dataclass
class ReportWorker:
    id: int
    module_id: int
    host: str | None
    site: str
    slurm_job_id: str | None
    status: str
    attempts: int
    busy_seconds: float


@dataclass
class GanttBar:
    task_id: int
    attempt: int
    worker_id: int
    code: int
    start: float
    end: float
    run: float | None


@dataclass
class CodeCount:
    """Attempts of a module that ended with a code, and how many left their task in it."""
    module_id: int
    code: int
    attempts: int
    final: int


@dataclass
class SlowAttempt:
    task_id: int
    attempt: int
    module_id: int
    code: int
    host: str | None
    worker_id: int | None
    run: float
    queue_wait: float | None
    busy: float | None
    body: str
