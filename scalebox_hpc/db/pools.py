"""What the controller reads and writes: demand for workers per module and per host,
worker rows from creation to loss, lease recovery, host fallback, finished apps, the
sites table, the controller lock; and the report of 'site check's probe job."""
from __future__ import annotations

import json

import psycopg

from . import QUERIES
from ..retry import RetryRules
from ..states import Code, TaskStatus, WorkerStatus
from .rows import HostDemand, LiveWorker, LostWorker, ModuleDemand, SiteRow
from .tasks import TaskWrites


class Pools(TaskWrites):
    # -- demand -------------------------------------------------------------------------------
    def module_demand(self, ready_cap: int) -> list[ModuleDemand]:
        return self._rows(ModuleDemand, "module_demand", {"ready_cap": ready_cap})

    def host_demand(self) -> list[HostDemand]:
        return self._rows(HostDemand, "host_demand")

    # -- worker rows ----------------------------------------------------------------------------
    def create_worker(self, module_id: int, site: str, start_timeout: float, want_host: str | None = None) -> int:
        return self._value("create_worker", {"module_id": module_id, "site": site,
                                             "start_timeout": start_timeout, "want_host": want_host})

    def record_launch(self, jobs: dict[int, str | None], unsent: list[int], message: str) -> None:
        """What a site did with new worker rows: the batch job of each one it sent (None:
        the site has no jobs), and the rows it did not send stop (EXITED, ``message``)."""
        with self._transaction():
            for worker_id, job in jobs.items():
                if job is not None:
                    self._run("set_worker_job", {"worker_id": worker_id, "slurm_job_id": job})
            if unsent:
                self.stop_workers(unsent, WorkerStatus.EXITED, message)

    def live_workers(self, site: str) -> list[LiveWorker]:
        return self._rows(LiveWorker, "live_workers", {"site": site})

    def stale_pending_workers(self) -> dict[str, list[LiveWorker]]:
        """Per site: worker rows still waiting for their job while their app no longer runs."""
        by_site: dict[str, list[LiveWorker]] = {}
        for site, *worker in self._run("stale_pending_workers"):
            by_site.setdefault(site, []).append(LiveWorker(*worker))
        return by_site

    def pending_host_workers(self, module_id: int, host: str) -> list[LiveWorker]:
        return self._rows(LiveWorker, "pending_host_workers", {"module_id": module_id, "host": host})

    def mark_workers_lost(self, worker_ids: list[int], message: str) -> None:
        with self._transaction():
            self._run("mark_workers_lost", {"worker_ids": worker_ids, "message": message})

    def stop_workers(self, worker_ids: list[int], status: str, message: str) -> None:
        self._run("stop_workers", {"worker_ids": worker_ids, "status": status, "message": message})

    def count_worker_failures(self, worker_ids: list[int]) -> None:
        """Count each of these workers as a failed one of its module."""
        for worker_id in worker_ids:
            self._run("count_worker_failure", {"worker_id": worker_id})

    def last_worker_failure(self, module_id: int) -> str | None:
        """The message of the module's last failed or lost worker."""
        return self._value("last_worker_failure", {"module_id": module_id})

    # -- lease recovery -------------------------------------------------------------------------
    def recover_lost(self) -> tuple[list[LostWorker], int]:
        """Declare workers with expired leases lost and give their tasks back (code 123).

        Returns (lost workers, tasks recovered)."""
        with self._transaction():
            lost = self._rows(LostWorker, "expire_workers")
            orphans = self._run("orphaned_tasks").fetchall()
            if not orphans:
                return lost, 0
            ids, statuses, records, modules = [], [], [], set()
            for task_id, attempt, module_id, worker_id, ready, claimed, rules, lost_before in orphans:
                retry = RetryRules.from_json(rules).allows(Code.LEASE_LOST, lost_before + 1)
                ids.append(task_id)
                statuses.append(TaskStatus.READY if retry else Code.LEASE_LOST)
                modules.add(module_id)
                records.append({"task_id": task_id, "attempt": attempt, "status_code": Code.LEASE_LOST,
                                "worker_id": worker_id, "t_ready": ready, "t_claimed": claimed,
                                "note": "lease lost: the worker died or stopped heart-beating"})
            self._run("recover_tasks", {"task_ids": ids, "statuses": statuses})
            self._write_execs(records)
            self._notify_ready(modules)
        return lost, len(ids)

    # -- tasks waiting for a host that is gone ---------------------------------------------------
    def fail_host_tasks(self, module_id: int, host: str, code: int, note: str) -> int:
        """End the module's ready tasks addressed to ``host`` with ``code``, an attempt
        with ``note`` each; returns how many."""
        return len(self._run("fail_host_tasks", {"module_id": module_id, "host": host, "code": code,
                                                 "note": note}).fetchall())

    def unpin_host_tasks(self, module_id: int, host: str) -> int:
        """Let the module's ready tasks addressed to ``host`` run anywhere (their headers
        keep it as wanted_host); returns how many."""
        with self._transaction():
            n = len(self._run("unpin_host_tasks", {"module_id": module_id, "host": host}).fetchall())
            if n:
                self._notify_ready([module_id])
        return n

    # -- apps -------------------------------------------------------------------------------------
    def finish_apps(self) -> list[int]:
        """Mark FINISHED the running apps with no task left to run, telling their workers."""
        with self._transaction():
            done = self._values("finish_apps")
            for app_id in done:
                self._run("notify_app_modules", {"app_id": app_id, "payload": "FINISHED"})
        return done

    # -- sites ------------------------------------------------------------------------------------
    def upsert_site(self, name: str, kind: str, config: dict) -> None:
        self._run("upsert_site", {"name": name, "kind": kind, "config": json.dumps(config)})

    def set_site_status(self, name: str, status: str, reason: str | None) -> None:
        self._run("set_site_status", {"name": name, "status": status, "reason": reason})

    def list_sites(self) -> list[SiteRow]:
        """The sites the controller has reported on, with the status it last wrote."""
        return self._rows(SiteRow, "list_sites")

    # -- the controller lock ----------------------------------------------------------------------
    def try_controller_lock(self) -> bool:
        return bool(self._value("try_controller_lock"))

    def controller_running(self) -> bool:
        """Whether another session holds the controller lock (checked without keeping it)."""
        if self.try_controller_lock():
            self._run("release_controller_lock")
            return False
        return True


def report_probe(conn: psycopg.Connection, channel: str, payload: str) -> None:
    """The probe job's report to 'site check', on the probe's own connection."""
    conn.execute(QUERIES["probe_report"], {"channel": channel, "payload": payload})
