"""What a worker does to the queue: register, read its module, claim a batch, mark a
long task running, renew its lease, commit results, hand back unstarted tasks, sign
off. The hot path (claim, complete) is a fixed, small number of statements per batch."""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

from ..appdef import ModuleDef
from ..retry import RetryRules
from ..states import Code, TaskStatus
from .rows import ClaimedTask, ModuleContext, TaskResult
from .tasks import TaskWrites

log = logging.getLogger(__name__)


class Queue(TaskWrites):
    def start_worker(self, worker_id: int, *, host: str, ip: str, pid: int, slurm_job_id: str | None,
                     lease_seconds: float, cpus: int | None = None, gpus: int | None = None,
                     mem_mb: int | None = None) -> int | None:
        """Mark a PENDING worker RUNNING with what it has; its (home) module id, or None
        if it was not pending."""
        return self._value("start_worker", {"worker_id": worker_id, "host": host, "ip": ip, "pid": pid,
                                            "slurm_job_id": slurm_job_id, "lease_seconds": lease_seconds,
                                            "cpus": cpus, "gpus": gpus, "mem_mb": mem_mb})

    def served_modules(self, module_id: int) -> list[tuple[int, int, str]]:
        """(module id, app id, app status) of the modules a pilot whose home is
        ``module_id`` serves: every running or paused app's on its site, and its home app's."""
        return [tuple(row) for row in self._run("served_modules", {"module_id": module_id})]


    def claim_pilot(self, *, worker_id: int, host: str, entries: Sequence[tuple[int, int, int]]) -> list[ClaimedTask]:
        """One claim for many lanes: entries are (module id, lane, batch), those of one
        module next to each other, in the order the policy chose."""
        if not entries:
            return []
        modules, slots, batches = zip(*entries)
        return self._rows(ClaimedTask, "claim_pilot", {"worker_id": worker_id, "host": host,
                                                       "modules": list(modules), "slots": list(slots),
                                                       "batches": list(batches)})

    def module_context(self, module_id: int) -> ModuleContext:
        (mid, app_id, name, site, host_bound, definition, main_router, ids, names, sites), = \
            self._run("module_context", {"module_id": module_id}).fetchall()
        return ModuleContext(module_id=mid, app_id=app_id, name=name, site=site, host_bound=host_bound,
                             module=ModuleDef.from_json(definition), main_router=main_router,
                             modules=dict(zip(names, ids)), module_sites=dict(zip(ids, sites)))

    def site_configs(self) -> dict[str, dict]:
        """Site name -> what workers need to forward data to it (the sites table's config)."""
        return {name: config or {} for name, config in self._run("site_configs")}

    def heartbeat(self, worker_id: int, lease_seconds: float, app_ids: Sequence[int]) -> dict[int, str] | None:
        """Renew the lease; the state of each of these apps, or None when this worker's
        lease is gone."""
        statuses = self._value("heartbeat", {"worker_id": worker_id, "lease_seconds": lease_seconds,
                                             "app_ids": list(app_ids)})
        return None if statuses is None else {int(k): v for k, v in statuses.items()}

    def mark_running(self, worker_id: int, task_ids: Sequence[int]) -> None:
        self._run("mark_running", {"worker_id": worker_id, "task_ids": list(task_ids)})

    def stop_worker(self, worker_id: int, status: str, message: str | None = None,
                    count_failure: bool = False) -> None:
        with self._transaction():
            self._run("stop_worker", {"worker_id": worker_id, "status": status, "message": message})
            if count_failure:
                self._run("count_worker_failure", {"worker_id": worker_id})

    def claim(self, *, worker_id: int, module_id: int, app_id: int, host: str, host_bound: bool,
              limit: int) -> list[ClaimedTask]:
        rows = self._rows(ClaimedTask, "claim_tasks", {
            "worker_id": worker_id, "module_id": module_id, "app_id": app_id, "host": host,
            "host_bound": host_bound, "limit": limit})
        return sorted(rows, key=lambda t: t.id)

    def return_tasks(self, worker_id: int, task_ids: Sequence[int] | None) -> int:
        """Hand back the given tasks, or all the worker holds (None), without counting an attempt."""
        with self._transaction():
            modules = self._values("return_tasks", {"worker_id": worker_id,
                                                    "task_ids": None if task_ids is None else list(task_ids)})
            self._notify_ready(set(modules))
        return len(modules)

    def complete(self, *, worker_id: int, app_id: int, results: Sequence[TaskResult],
                 retry_rules: RetryRules | Mapping[int, RetryRules]) -> int:
        """Commit finished attempts, each with its exec row, sink messages, semaphores
        and app result, in one transaction. Attempts this worker no longer holds
        (lease recovered meanwhile) are dropped whole. A pilot's results may be of
        several modules: ``retry_rules`` then maps each result's module_id to its rules.
        Returns how many were applied."""
        if not results:
            return 0
        with self._transaction():
            statuses = self._final_statuses(results, retry_rules)
            held = set(self._values("complete_tasks", {
                "worker_id": worker_id,
                "task_ids": [r.task_id for r in results],
                "attempts": [r.attempt for r in results],
                "statuses": [statuses[r.task_id] for r in results],
            }))
            applied = [r for r in results if r.task_id in held]
            if len(applied) < len(results):
                log.warning("dropped %d result(s) of attempts whose lease was recovered",
                            len(results) - len(applied))
            self._write_execs(r.record for r in applied)
            for r in applied:
                r.committed = True
            # Only a successful attempt routes messages and changes app state.
            succeeded = [r for r in applied if r.code == 0]
            self._insert_messages(app_id, [m for r in succeeded for m in r.messages])
            for r in succeeded:
                for name, op, value in r.semaphores:
                    self._run("apply_semaphore", {"app_id": app_id, "name": name, "op": op, "value": value})
                if r.app_result is not None:
                    self._run("set_app_result", {"app_id": app_id, "result": r.app_result})
            retried = {r.module_id for r in applied if statuses[r.task_id] == TaskStatus.READY}
            if retried:
                # Retried tasks are READY again: wake idle workers of their module.
                self._notify_ready([m for m in retried if m is not None] or
                                   [self._value("worker_module", {"worker_id": worker_id})])
            done = sorted({r.module_id for r in applied if r.module_id is not None})
            self._run("count_done", {"worker_id": worker_id, "n": len(applied), "module_ids": done})
        return len(applied)

    def tell_idle(self, app_id: int) -> None:
        """A worker of the app found nothing to run: whoever follows the app (channel
        sbx_aAPP_ID) looks now whether it is over."""
        self._run("notify_app", {"app_id": app_id, "payload": "idle"})

    def _final_statuses(self, results: Sequence[TaskResult],
                        retry_rules: RetryRules | Mapping[int, RetryRules]) -> dict[int, int]:
        """Status each attempt leaves its task in: its code, or READY to retry."""
        def rules_of(r: TaskResult) -> RetryRules:
            return retry_rules if isinstance(retry_rules, RetryRules) else retry_rules[r.module_id]
        statuses = {r.task_id: r.code for r in results}
        failed = [r for r in results if r.code != Code.OK and rules_of(r).allows(r.code, 1)]
        if failed:
            counts: dict[tuple[int, int], int] = {}
            for task_id, code, n in self._run("exec_counts", {"task_ids": [r.task_id for r in failed]}):
                counts[(task_id, code)] = n
            for r in failed:
                if rules_of(r).allows(r.code, counts.get((r.task_id, r.code), 0) + 1):
                    statuses[r.task_id] = TaskStatus.READY
        return statuses
