"""The writes to tasks and task_exec that the queue, apps and pools share: messages
become tasks (with dedup), attempts get their records, idle workers are woken."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Sequence

from psycopg.types.json import Jsonb

from . import QUERIES
from .connection import Queries
from .rows import Message

# Columns a worker or the controller fills in a task_exec row, as the COPY names them.
# A bulk load of this many start tasks refreshes the planner's statistics at once:
# until autovacuum gets to it (a minute or more), a new database plans the claims and
# completions of the first big app as for an empty table.
ANALYZE_AFTER = 5000
EXEC_COLUMNS = tuple(re.search(r"\((.*?)\)", QUERIES["copy_task_exec"], re.S).group(1).replace(",", " ").split())
_JSON_COLUMNS = {"user_timestamps", "input_files", "output_files", "forwards", "extras"}
_EXEC_INDEX = {c: i for i, c in enumerate(EXEC_COLUMNS)}
_EMPTY_EXEC_ROW = [None] * len(EXEC_COLUMNS)
_EMPTY_EXEC_ROW[_EXEC_INDEX["messages_out"]] = 0


def _exec_row(record: dict[str, Any]) -> list:
    # On the hot path: a record holds a dozen of the columns, so fill those only.
    row = _EMPTY_EXEC_ROW.copy()
    for key, value in record.items():
        row[_EXEC_INDEX[key]] = Jsonb(value) if key in _JSON_COLUMNS and value is not None else value
    return row


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


class TaskWrites(Queries):
    """Base of the classes that write tasks or attempts; these run inside the caller's
    transaction."""

    def _insert_messages(self, app_id: int, messages: Sequence[Message]) -> dict[int, int]:
        """Insert tasks (dedup applies); inserted count per module id."""
        messages = _unique(messages)
        if not messages:
            return {}
        rows = self._run("insert_tasks", {
            "app_id": app_id,
            "module_ids": [m.module_id for m in messages],
            "bodies": [m.body for m in messages],
            "headers": [json.dumps(m.headers) for m in messages],
            "repeatable": [m.repeatable for m in messages],
            "to_hosts": [m.to_host for m in messages],
            "from_tasks": [m.from_task_id for m in messages],
            "created": [m.created for m in messages],
        }).fetchall()
        return {module_id: n for module_id, n, _notified in rows}

    def _copy_start_tasks(self, app_id: int, messages: Sequence[Message]) -> None:
        """Start tasks of an app being created: its modules are new, so dedup is only
        among these, and COPY is several times faster than INSERT for big FILE: lists."""
        messages = _unique(messages)
        with self._copy("copy_task_keys") as copy:
            for m in messages:
                if not m.repeatable:
                    copy.write_row((m.module_id, hashlib.md5(m.body.encode()).hexdigest()))
        with self._copy("copy_tasks") as copy:
            for m in messages:
                copy.write_row((app_id, m.module_id, m.body, json.dumps(m.headers), m.repeatable, m.to_host))
        if len(messages) >= ANALYZE_AFTER:
            self._run("analyze_sample")
            self._run("analyze_tasks")
        self._notify_ready({m.module_id for m in messages})

    def _write_execs(self, records: Iterable[dict[str, Any]]) -> None:
        """One task_exec row per attempt record (task_exec columns by name)."""
        with self._copy("copy_task_exec") as copy:
            for record in records:
                copy.write_row(_exec_row(record))

    def _notify_ready(self, module_ids: Iterable[int]) -> None:
        """Wake the idle workers of these modules: they have READY tasks."""
        for module_id in module_ids:
            self._run("notify_module", {"module_id": module_id, "payload": "ready"})
