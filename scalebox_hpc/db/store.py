"""Python calls over the named queries: what workers, the controller and the CLI do
to the database. Each method is one transaction unless it says otherwise."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Sequence

import psycopg
from psycopg.types.json import Jsonb

from . import QUERIES, connect, with_retry
from ..retry import RetryRules
from ..states import Code, TaskStatus

log = logging.getLogger(__name__)

# Columns a worker or the controller fills in a task_exec row, as the COPY names them.
EXEC_COLUMNS = tuple(re.search(r"\((.*?)\)", QUERIES["copy_task_exec"], re.S).group(1).replace(",", " ").split())
_JSON_COLUMNS = {"user_timestamps", "input_files", "output_files", "forwards"}


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


@dataclass
class TaskResult:
    """One finished attempt, as the worker hands it to ``complete``."""
    task_id: int
    attempt: int
    code: int
    record: dict[str, Any]                        # task_exec columns
    messages: list[Message] = field(default_factory=list)
    semaphores: list[tuple[str, str, int]] = field(default_factory=list)
    app_result: str | None = None


_EXEC_INDEX = {c: i for i, c in enumerate(EXEC_COLUMNS)}
_EMPTY_EXEC_ROW = [None] * len(EXEC_COLUMNS)
_EMPTY_EXEC_ROW[_EXEC_INDEX["messages_out"]] = 0


def _exec_row(record: dict[str, Any]) -> list:
    # On the hot path: a record holds a dozen of the columns, so fill those only.
    row = _EMPTY_EXEC_ROW.copy()
    for key, value in record.items():
        row[_EXEC_INDEX[key]] = Jsonb(value) if key in _JSON_COLUMNS and value is not None else value
    return row


class Store:
    """A database connection plus the operations on it.

    ``retrying`` runs an operation again after reconnecting while the database is
    down, so callers may treat a PostgreSQL restart as a pause.

    Workers use ``async_commit``: their commits do not wait for the WAL flush. A
    PostgreSQL crash (not a restart) can then forget the last fraction of a second of
    claims and completions, each whole: those tasks simply run again, and since a
    completion and its messages share one transaction, routing stays exactly once.
    """

    def __init__(self, dsn: str, *, listen: Sequence[str] = (), async_commit: bool = False):
        self.dsn = dsn
        self.listen = tuple(listen)
        self.async_commit = async_commit
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.dsn, async_commit=self.async_commit)
            for channel in self.listen:
                self._conn.execute(f"LISTEN {channel}")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
            self._conn = None

    def retrying(self, fn, *, what: str, give_up_after: float | None = None, stop=None):
        return with_retry(fn, what=what, give_up_after=give_up_after, on_retry=self._reset, stop=stop)

    def q(self, name: str, params: dict | None = None) -> psycopg.Cursor:
        return self.conn.execute(QUERIES[name], params or {})

    def one(self, name: str, params: dict | None = None):
        row = self.q(name, params).fetchone()
        return row[0] if row else None

    def wait_notify(self, timeout: float) -> list[str]:
        """Payloads of notifications on the LISTENed channels, waiting up to timeout."""
        return [n.payload for n in self.conn.notifies(timeout=timeout, stop_after=1)]

    # -- apps -------------------------------------------------------------------
    def create_app(self, app_json: dict, modules: list[dict], start: Iterable[tuple[str, str]],
                   status: str = "RUNNING") -> int:
        """App, modules and start tasks in one transaction: all or nothing."""
        with self.conn.transaction():
            app_id = self.one("create_app", {"name": app_json["name"], "status": status,
                                             "site": app_json.get("site", "local"),
                                             "definition": Jsonb(app_json)})
            ids = {}
            for mod in modules:
                ids[mod["name"]] = self.one("create_module", {
                    "app_id": app_id, "name": mod["name"], "site": mod["site"],
                    "definition": Jsonb(mod), "host_bound": mod.get("task_dist_mode") == "HOST-BOUND",
                    "slots": mod.get("slots", 1), "min_workers": mod.get("min_workers", 0)})
            self._copy_start_tasks(app_id, [Message(ids[m], body) for m, body in start])
        return app_id

    @staticmethod
    def _unique(messages: Sequence[Message]) -> list[Message]:
        """Drop repeats of a non-repeatable (module, body) within one batch."""
        seen: set[tuple[int, str]] = set()
        unique = []
        for m in messages:
            if not m.repeatable:
                if (m.module_id, m.body) in seen:
                    continue
                seen.add((m.module_id, m.body))
            unique.append(m)
        return unique

    def _copy_start_tasks(self, app_id: int, messages: Sequence[Message]) -> None:
        """Start tasks of an app being created: its modules are new, so dedup is only
        among these, and COPY is several times faster than INSERT for big FILE: lists."""
        messages = self._unique(messages)
        cur = self.conn.cursor()
        with cur.copy(QUERIES["copy_task_keys"]) as copy:
            for m in messages:
                if not m.repeatable:
                    copy.write_row((m.module_id, hashlib.md5(m.body.encode()).hexdigest()))
        with cur.copy(QUERIES["copy_tasks"]) as copy:
            for m in messages:
                copy.write_row((app_id, m.module_id, m.body, json.dumps(m.headers), m.repeatable, m.to_host))
        for module_id in {m.module_id for m in messages}:
            self.q("notify_module", {"module_id": module_id, "payload": "ready"})

    def insert_messages(self, app_id: int, messages: Sequence[Message]) -> dict[int, int]:
        """Insert tasks (dedup applies); returns inserted count per module id."""
        messages = self._unique(messages)
        if not messages:
            return {}
        rows = self.q("insert_tasks", {
            "app_id": app_id,
            "module_ids": [m.module_id for m in messages],
            "bodies": [m.body for m in messages],
            "headers": [json.dumps(m.headers) for m in messages],
            "repeatable": [m.repeatable for m in messages],
            "to_hosts": [m.to_host for m in messages],
            "from_tasks": [m.from_task_id for m in messages],
            "created": [m.created for m in messages],
        }).fetchall()
        return {r[0]: r[1] for r in rows}

    def add_tasks(self, app_id: int, module_id: int, bodies: Sequence[str], headers: dict) -> int:
        with self.conn.transaction():
            self.q("reopen_app", {"app_id": app_id})
            counts = self.insert_messages(app_id, [Message(module_id, b, dict(headers)) for b in bodies])
        return sum(counts.values())

    def set_app_status(self, app_id: int, status: str, from_states: Sequence[str],
                       message: str | None = None) -> bool:
        with self.conn.transaction():
            changed = self.one("set_app_status", {"app_id": app_id, "status": status,
                                                  "from_states": list(from_states), "message": message})
            if changed:
                self.q("notify_app_modules", {"app_id": app_id, "payload": status})
        return changed is not None

    # -- workers ----------------------------------------------------------------
    def start_worker(self, worker_id: int, *, host: str, ip: str, pid: int, slurm_job_id: str | None,
                     lease_seconds: float) -> int | None:
        return self.one("start_worker", {"worker_id": worker_id, "host": host, "ip": ip, "pid": pid,
                                         "slurm_job_id": slurm_job_id, "lease_seconds": lease_seconds})

    def heartbeat(self, worker_id: int, lease_seconds: float) -> str | None:
        """The app's status, or None when this worker's lease is gone."""
        return self.one("heartbeat", {"worker_id": worker_id, "lease_seconds": lease_seconds})

    def stop_worker(self, worker_id: int, status: str, message: str | None = None,
                    count_failure: bool = False) -> None:
        with self.conn.transaction():
            self.q("stop_worker", {"worker_id": worker_id, "status": status, "message": message})
            if count_failure:
                self.q("count_worker_failure", {"worker_id": worker_id})

    # -- the task queue -------------------------------------------------------------
    def claim(self, *, worker_id: int, module_id: int, app_id: int, host: str, host_bound: bool,
              limit: int) -> list[ClaimedTask]:
        rows = self.q("claim_tasks", {"worker_id": worker_id, "module_id": module_id, "app_id": app_id,
                                      "host": host, "host_bound": host_bound, "limit": limit}).fetchall()
        return sorted((ClaimedTask(*r) for r in rows), key=lambda t: t.id)

    def mark_running(self, worker_id: int, task_id: int) -> None:
        self.q("mark_running", {"worker_id": worker_id, "task_id": task_id})

    def return_tasks(self, worker_id: int, task_ids: Sequence[int] | None) -> int:
        """Hand back the given tasks, or all the worker holds (None), without counting an attempt."""
        with self.conn.transaction():
            rows = self.q("return_tasks", {"worker_id": worker_id,
                                           "task_ids": None if task_ids is None else list(task_ids)}).fetchall()
            for module_id in {r[0] for r in rows}:
                self.q("notify_module", {"module_id": module_id, "payload": "ready"})
        return len(rows)

    def complete(self, *, worker_id: int, app_id: int, results: Sequence[TaskResult],
                 retry_rules: RetryRules) -> int:
        """Commit finished attempts, each with its exec row, sink messages, semaphores
        and app result, in one transaction. Attempts this worker no longer holds
        (lease recovered meanwhile) are dropped whole. Returns how many were applied."""
        if not results:
            return 0
        with self.conn.transaction():
            statuses = self._final_statuses(results, retry_rules)
            rows = self.q("complete_tasks", {
                "worker_id": worker_id,
                "task_ids": [r.task_id for r in results],
                "attempts": [r.attempt for r in results],
                "statuses": [statuses[r.task_id] for r in results],
            }).fetchall()
            held = {r[0] for r in rows}
            applied = [r for r in results if r.task_id in held]
            if len(applied) < len(results):
                log.warning("dropped %d result(s) of attempts whose lease was recovered",
                            len(results) - len(applied))
            with self.conn.cursor().copy(QUERIES["copy_task_exec"]) as copy:
                for r in applied:
                    copy.write_row(_exec_row(r.record))
            # Only a successful attempt routes messages and changes app state.
            succeeded = [r for r in applied if r.code == 0]
            self.insert_messages(app_id, [m for r in succeeded for m in r.messages])
            for r in succeeded:
                for name, op, value in r.semaphores:
                    self.q("apply_semaphore", {"app_id": app_id, "name": name, "op": op, "value": value})
                if r.app_result is not None:
                    self.q("set_app_result", {"app_id": app_id, "result": r.app_result})
            if any(statuses[r.task_id] == TaskStatus.READY for r in applied):
                # Retried tasks are READY again: wake idle workers of this module.
                self.q("notify_module", {"module_id": self.one("worker_module", {"worker_id": worker_id}),
                                         "payload": "ready"})
            self.q("count_done", {"worker_id": worker_id, "n": len(applied)})
        return len(applied)

    def _final_statuses(self, results: Sequence[TaskResult], rules: RetryRules) -> dict[int, int]:
        """Status each attempt leaves its task in: its code, or READY to retry."""
        statuses = {r.task_id: r.code for r in results}
        failed = [r for r in results if r.code != Code.OK and rules.allows(r.code, 1)]
        if failed:
            counts: dict[tuple[int, int], int] = {}
            for task_id, code, n in self.q("exec_counts", {"task_ids": [r.task_id for r in failed]}):
                counts[(task_id, code)] = n
            for r in failed:
                if rules.allows(r.code, counts.get((r.task_id, r.code), 0) + 1):
                    statuses[r.task_id] = TaskStatus.READY
        return statuses

    # -- controller -------------------------------------------------------------------
    def recover_lost(self) -> tuple[list[tuple[int, int, str]], int]:
        """Declare workers with expired leases lost and give their tasks back (code 123).

        Returns (lost workers, tasks recovered)."""
        with self.conn.transaction():
            lost = self.q("expire_workers").fetchall()
            orphans = self.q("orphaned_tasks").fetchall()
            if not orphans:
                return lost, 0
            ids, attempts, statuses, records, modules = [], [], [], [], set()
            for task_id, attempt, module_id, worker_id, ready, claimed, rules, lost_before in orphans:
                retry = RetryRules.from_json(rules).allows(Code.LEASE_LOST, lost_before + 1)
                ids.append(task_id)
                attempts.append(attempt)
                statuses.append(TaskStatus.READY if retry else Code.LEASE_LOST)
                modules.add(module_id)
                records.append({"task_id": task_id, "attempt": attempt, "status_code": Code.LEASE_LOST,
                                "worker_id": worker_id, "t_ready": ready, "t_claimed": claimed,
                                "note": "lease lost: the worker died or stopped heart-beating"})
            self.q("recover_tasks", {"task_ids": ids, "statuses": statuses})
            with self.conn.cursor().copy(QUERIES["copy_task_exec"]) as copy:
                for rec in records:
                    copy.write_row(_exec_row(rec))
            for module_id in modules:
                self.q("notify_module", {"module_id": module_id, "payload": "ready"})
        return lost, len(ids)

    def create_worker(self, module_id: int, site: str, start_timeout: float, want_host: str | None = None) -> int:
        return self.one("create_worker", {"module_id": module_id, "site": site,
                                          "start_timeout": start_timeout, "want_host": want_host})

    def fail_host_tasks(self, module_id: int, host: str, code: int, note: str) -> int:
        """End the module's ready tasks addressed to ``host`` with ``code``, an attempt
        with ``note`` each; returns how many."""
        return len(self.q("fail_host_tasks", {"module_id": module_id, "host": host, "code": code,
                                              "note": note}).fetchall())

    def unpin_host_tasks(self, module_id: int, host: str) -> int:
        """Let the module's ready tasks addressed to ``host`` run anywhere (their headers
        keep it as wanted_host); returns how many."""
        with self.conn.transaction():
            n = len(self.q("unpin_host_tasks", {"module_id": module_id, "host": host}).fetchall())
            if n:
                self.q("notify_module", {"module_id": module_id, "payload": "ready"})
        return n

    def try_controller_lock(self) -> bool:
        return bool(self.one("try_controller_lock"))

    def controller_running(self) -> bool:
        """Whether another session holds the controller lock (checked without keeping it)."""
        if self.try_controller_lock():
            self.q("release_controller_lock")
            return False
        return True

    def finish_apps(self) -> list[int]:
        with self.conn.transaction():
            done = [r[0] for r in self.q("finish_apps").fetchall()]
            for app_id in done:
                self.q("notify_app_modules", {"app_id": app_id, "payload": "FINISHED"})
        return done
