"""What people read about apps: 'app show' / 'app watch' (task counts per module,
rates, ETA), 'task show', 'task list', an app's workers, and the figures of the report,
which come from one snapshot (``Reporting.report``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..errors import NotFound
from ..states import TaskStatus
from .apps import Apps
from .connection import Queries
from .rows import (AppRow, CodeCount, Execution, GanttBar, ModuleAttempts, ModuleRow, ModuleStatusRow,
                   ReportWorker, SlowAttempt, Span, StageBucket, TaskDetail, TaskRow, TimeBin, WorkerCounts,
                   WorkerRow)

RATE_WINDOW = 60.0   # seconds of recent completions that rates and ETAs are measured over


class Reporting(Queries):
    def module_counts(self, app_id: int) -> dict[str, dict]:
        """Per module: tasks by state, failures by code, tasks finished per second over the
        last RATE_WINDOW seconds, and the time that rate needs for the ready and running ones."""
        per: dict[str, dict] = {}
        since: dict[str, object] = {}
        recent: dict[str, int] = {}
        now = None
        for row in self._rows(ModuleStatusRow, "module_status", {"app_id": app_id, "window": RATE_WINDOW}):
            module, status, n, now = row.module, row.status, row.n, row.now
            c = per.setdefault(module, {"ready": 0, "running": 0, "ok": 0, "failed": 0, "total": 0, "codes": {}})
            recent[module] = recent.get(module, 0) + row.done_recently
            if row.first_claimed is not None:
                since[module] = min(since.get(module, row.first_claimed), row.first_claimed)
            if status is None:
                continue
            c["total"] += n
            if status == TaskStatus.OK:
                c["ok"] += n
            elif status in TaskStatus.HELD:
                c["running"] += n
            elif status in (TaskStatus.READY, TaskStatus.INITIAL):
                c["ready"] += n
            else:
                c["failed"] += n
                c["codes"][str(status)] = n
        for module, c in per.items():
            window = min(RATE_WINDOW, (now - since[module]).total_seconds()) if module in since else 0.0
            c["rate"] = recent[module] / window if window > 0 else 0.0
            left = c["ready"] + c["running"]
            c["eta_seconds"] = 0.0 if not left else left / c["rate"] if c["rate"] else None
        return per

    def app_summary(self, app_id: int) -> dict:
        """What 'app show' prints: the app's state, result and wall time, and module_counts."""
        app = Apps(self.database).get_app(app_id)
        counts = self.module_counts(app_id)
        elapsed = (app.finished_at - app.started_at).total_seconds() if app.finished_at and app.started_at else None
        return {"id": app.id, "name": app.name, "status": app.status, "site": app.site, "result": app.result,
                "message": app.message, "elapsed_seconds": elapsed, "modules": counts}

    def worker_counts(self, app_id: int) -> WorkerCounts:
        return self._row(WorkerCounts, "app_worker_counts", {"app_id": app_id})

    def workers(self, app_id: int) -> list[WorkerRow]:
        return self._rows(WorkerRow, "list_workers", {"app_id": app_id})

    def task(self, task_id: int) -> tuple[TaskDetail, list[Execution]]:
        """A task and every attempt of it."""
        task = self._row(TaskDetail, "get_task", {"task_id": task_id})
        if task is None:
            raise NotFound(f"no task with id {task_id}")
        return task, self._rows(Execution, "task_execs", {"task_id": task_id})

    def find_tasks(self, app_id: int, *, module: str | None = None, status: int | None = None,
                   failed: bool = False, host: str | None = None, limit: int = 100) -> list[TaskRow]:
        """Tasks of an app, oldest first; each filter applies when given."""
        return self._rows(TaskRow, "find_tasks", {"app_id": app_id, "module": module, "status": status,
                                                  "failed": failed, "host": host, "limit": limit})

    @contextmanager
    def report(self, app_id: int) -> Iterator[ReportSnapshot]:
        """The report's reads, all from one snapshot so that they agree even while the app
        runs: its attempts are copied once into a temporary table the transaction drops."""
        with self._transaction():
            self._run("report_snapshot")
            self._run("report_session")
            snapshot = ReportSnapshot(self.database, Apps(self.database).get_app(app_id))
            self._run("report_exec_table", {"app_id": app_id})
            self._run("report_analyze")
            yield snapshot


class ReportSnapshot(Queries):
    """The figures of one app within ``Reporting.report``."""

    def __init__(self, database, app: AppRow):
        super().__init__(database)
        self.app = app

    def modules(self) -> list[ModuleRow]:
        return Apps(self.database).modules(self.app.id)

    def module_status(self, window: float) -> list[ModuleStatusRow]:
        return self._rows(ModuleStatusRow, "module_status", {"app_id": self.app.id, "window": window})

    def module_attempts(self) -> list[ModuleAttempts]:
        return self._rows(ModuleAttempts, "report_module_attempts")

    def span(self) -> Span:
        """The first start and the last end of an attempt on a worker (epoch seconds)."""
        return self._row(Span, "report_span")

    def stage_buckets(self, stage: str) -> list[StageBucket]:
        """One stage's durations (a key of report.STAGES) per module and bucket."""
        return self._rows(StageBucket, "report_stage_buckets", stage=stage)

    def time_bins(self, t0: float, width: float, bins: int) -> list[TimeBin]:
        return self._rows(TimeBin, "report_time_bins", {"t0": t0, "width": width, "bins": bins})

    def workers(self) -> list[ReportWorker]:
        """The workers that ran attempts, with their busy time, in module and id order."""
        return self._rows(ReportWorker, "report_workers")

    def gantt_bars(self, worker_ids: list[int], per_worker: int) -> list[GanttBar]:
        return self._rows(GanttBar, "report_gantt_bars", {"worker_ids": worker_ids, "per_worker": per_worker})

    def exit_codes(self) -> list[CodeCount]:
        return self._rows(CodeCount, "report_exit_codes")

    def slowest(self, limit: int) -> list[SlowAttempt]:
        return self._rows(SlowAttempt, "report_slowest", {"limit": limit})
