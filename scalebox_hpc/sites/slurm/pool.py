"""A Slurm site's pool policy: how many worker jobs to submit and when, and which of
them are gone.

``BatchSite`` turns the controller's worker rows into job scripts (jobscript.py) and
sends them through the scheduler adapter (scheduler.py): arrays when many, within the
per-minute submission rate and the queued-jobs cap; it marks the site DEGRADED after
repeated failures and probes it again on a backoff, and tells the controller which
workers' jobs are gone from one squeue per site per poll interval, whatever the number
of jobs (the two layers of dask-jobqueue: a PBS site would swap the adapter, not this).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import replace

from ...backoff import Backoff
from ...resources import mebibytes
from ...siteconfig import walltime_seconds
from ...transport import CommandError, TransportError
from .. import LiveWorker, Site
from ..launch import DRAIN_MARGIN, WorkerLaunch
from .jobscript import render_worker_script, worker_dsn
from .scheduler import Job, SchedulerError, SlurmCLI

log = logging.getLogger(__name__)


class BatchSite(Site):
    """A site whose workers are batch jobs. Rows for the workers exist before their job
    does; a worker row stays PENDING while its job waits in the queue."""

    kind = "slurm"
    # Queue waits can be long: a pending job's row is not declared lost by a timer but
    # when its job leaves the queue without the worker having started.
    start_timeout = 30 * 86400.0
    FAILURES_TO_DEGRADE = 3

    def __init__(self, config, settings, scheduler=None):
        self.config = config
        self.name = config.name
        self.settings = settings
        self.scheduler = scheduler or SlurmCLI()
        self.prefix = f"{config.slurm.job_name_prefix}-"
        self.pool = config.pool
        self.start_timeout = BatchSite.start_timeout
        self.recent: deque[float] = deque()      # submission times in the last minute
        self.failures = 0
        self.degraded_backoff = Backoff(30.0, 600.0)   # between probes while DEGRADED
        self.retry_at = 0.0
        self.status, self.reason = "OK", None
        self.snapshot: dict[str, Job] | None = None
        self.snapshot_at = 0.0
        self.submitted_at: dict[str, float] = {}  # job id -> when sbatch returned it
        self._max_array = config.slurm.max_array_size
        self.node_view: dict[str, tuple[str, str]] | None = None   # sinfo: node -> (state, reason)
        self.node_view_at: float | None = None
        self.refused_hosts: dict[str, str] = {}   # host -> why sbatch refused a --nodelist job for it
        self._log_dir_made = False

    @property
    def log_dir(self) -> str:
        """Where worker jobs write their output: the site's log_dir, else the controller's
        (a site reached over SSH must name its own: the controller's disk is not there)."""
        return self.config.log_dir or self.settings.log_dir

    def ensure_log_dir(self) -> None:
        if self._log_dir_made:
            return
        if self.config.ssh:
            if not self.config.log_dir:
                raise SchedulerError(f"site {self.name} is reached over SSH: set log_dir in {self.config.path} "
                                     "to a directory on the site")
            self.scheduler.run(["mkdir", "-p", self.config.log_dir])
        else:
            os.makedirs(self.log_dir, exist_ok=True)
        self._log_dir_made = True

    def close(self) -> None:
        close = getattr(getattr(self.scheduler, "run", None), "close", None)
        if close:
            close()

    @property
    def pilot_cpus(self) -> int:
        return self.config.cpus or self.config.slurm.cpus_per_task or 1

    @property
    def pilot_gpus(self) -> int:
        """From gpus/gres as written ('2', 'a100:2', 'gpu:a100:2'), or the config's gpus."""
        if self.config.gpus is not None:
            return self.config.gpus
        for text in (self.config.slurm.gpus, self.config.slurm.gres):
            if text and text.rsplit(":", 1)[-1].isdigit():
                return int(text.rsplit(":", 1)[-1])
        return 0

    @property
    def pilot_mem_mb(self) -> int | None:
        # --mem=0 is "all of the node": its size is not known here.
        mem = self.config.slurm.mem
        return mebibytes(mem) if mem and mem.strip() not in ("0", "0M", "0G") else None

    def unfit(self, module: dict) -> str | None:
        problem = super().unfit(module)
        if problem:
            return problem
        # Workers claim a task only if its task_max_seconds fits in what is left of the
        # walltime: one that never fits would leave the module submitting jobs that
        # exit at once.
        limit = module.get("task_max_seconds")
        walltime = walltime_seconds(self.config.slurm.walltime)
        if limit and float(limit) + DRAIN_MARGIN > walltime:
            return (f"task_max_seconds {limit} does not fit in the walltime of site {self.name} "
                    f"({self.config.slurm.walltime}, of which {DRAIN_MARGIN:g} s are kept for the worker "
                    f"to leave): raise slurm.walltime in {self.config.path or 'the site config'} "
                    f"or lower task_max_seconds")
        return None

    # -- admission: rate limit, queue cap, degraded state ---------------------------------
    def admit(self, wanted: int, live: int, pending: int) -> int:
        """How many of ``wanted`` new workers may be submitted now: within max_workers,
        within max_queued_jobs (pending jobs, array elements counted one by one, as
        Slurm's own limits count them), and only if an sbatch call is left this minute
        (launch() then spends the calls, an array being one)."""
        if self._submissions_left() == 0:
            return 0
        nodes = self.config.slurm.nodes
        jobs_allowed = self.pool.max_queued_jobs - math.ceil(pending / nodes)
        return max(0, min(wanted, self.pool.max_workers - live, max(0, jobs_allowed) * nodes))

    def _submissions_left(self) -> int:
        """sbatch calls allowed now: the per-minute rate, and a single probe per back-off
        period while DEGRADED."""
        now = time.monotonic()
        if self.status == "DEGRADED" and now < self.retry_at:
            return 0
        while self.recent and now - self.recent[0] > 60:
            self.recent.popleft()
        left = max(0, self.pool.max_submissions_per_minute - len(self.recent))
        return min(left, 1) if self.status == "DEGRADED" else left

    def _failed(self, exc: Exception) -> None:
        if getattr(exc, "host_key", False):
            # A host key that is unknown or changed does not heal by itself: degraded at once.
            self.failures = max(self.failures, self.FAILURES_TO_DEGRADE - 1)
        self.failures += 1
        if self.failures >= self.FAILURES_TO_DEGRADE:
            self.retry_at = time.monotonic() + self.degraded_backoff.failed()
            if self.status != "DEGRADED":
                log.error("site %s DEGRADED after %d failed submissions: %s", self.name, self.failures, exc)
            self.status, self.reason = "DEGRADED", f"{self.failures} submissions failed in a row; last: {exc}"

    def _succeeded(self) -> None:
        if self.status == "DEGRADED":
            log.info("site %s works again", self.name)
        self.failures, self.status, self.reason = 0, "OK", None
        self.degraded_backoff.reset()

    # -- submission -----------------------------------------------------------------------
    def max_array_size(self) -> int:
        if self._max_array is None:
            try:
                self._max_array = self.scheduler.max_array_size()
            except CommandError:
                return 1001
        return self._max_array

    def worker_launch(self, worker_ids: list[int]) -> WorkerLaunch:
        """What the workers of one job are told (one row per node and array element)."""
        config = self.config
        return WorkerLaunch(tuple(worker_ids), scratch=config.scratch_root, lease_seconds=self.settings.lease_seconds,
                            idle_seconds=self.pool.idle_seconds,
                            walltime_seconds=walltime_seconds(config.slurm.walltime), runtime=config.runtime,
                            image_cache=config.image_cache, container_gpu=config.container_gpu)

    def worker_env(self) -> dict[str, str]:
        return {**self.config.env, "SCALEBOX_DSN": worker_dsn(self.config, self.settings.dsn)}

    def launch(self, worker_ids: list[int], module: dict, host: str | None = None) -> dict[int, str]:
        """Submit jobs for these worker rows (arrays when many, split at MaxArraySize);
        with ``host``, one-node jobs on that node (--nodelist).

        Returns the Slurm job id of each worker submitted; rows missing from it were
        not submitted (the controller releases them)."""
        try:
            self.ensure_log_dir()                   # Slurm writes job output there
        except (CommandError, OSError) as exc:
            if not isinstance(exc, TransportError):
                exc = CommandError(f"cannot create the log directory {self.log_dir}: {exc}")
            self._failed(exc)
            self.refusal = str(exc)
            log.error("site %s: %s", self.name, exc)
            return {}
        # A job sent to a host has that one node: the other nodes of a wider job would be
        # anywhere, and their workers would not be where the tasks wait.
        config = self.config if host is None else replace(self.config, slurm=replace(self.config.slurm, nodes=1))
        nodes = config.slurm.nodes
        per_job = [worker_ids[i:i + nodes] for i in range(0, len(worker_ids), nodes)]
        chunk = max(1, self.max_array_size())
        jobs: dict[int, str] = {}
        for start in range(0, len(per_job), chunk):
            if self._submissions_left() == 0:
                self.refusal = "sbatch calls for this minute spent (pool.max_submissions_per_minute)"
                break
            group = per_job[start:start + chunk]
            ids = [w for job in group for w in job]
            array = f"0-{len(group) - 1}" if len(group) > 1 else None
            script = render_worker_script(
                config, job_name=f"{self.prefix}{module['app_id']}-{module['name']}",
                worker_argv=self.worker_launch(ids).argv(config.python), env=self.worker_env(),
                log_dir=self.log_dir, array=array, nodelist=host)
            self.recent.append(time.monotonic())   # failed calls load slurmctld as much
            try:
                job_id = self.scheduler.submit(script)
            except CommandError as exc:
                if host and SlurmCLI.refuses_node(str(exc)):
                    # That node's fault, not the site's: gone_hosts() reports it next.
                    self.refusal = self.refused_hosts[host] = f"sbatch refused a job for node {host}: {exc}"
                    log.error("site %s: module %s: %s", self.name, module["name"], self.refusal)
                    break
                where = ", ".join(f"{k} '{v}'" for k, v in (("partition", self.config.slurm.partition),
                                                             ("account", self.config.slurm.account),
                                                             ("qos", self.config.slurm.qos)) if v)
                if not isinstance(exc, TransportError):
                    exc = CommandError(f"{exc}{f' ({where})' if where else ''}")
                self._failed(exc)
                self.refusal = str(exc)
                log.error("site %s: submission for module %s failed: %s", self.name, module["name"], exc)
                break
            self._succeeded()
            now = time.monotonic()
            for index, job in enumerate(group):
                element = f"{job_id}_{index}" if array else job_id
                self.submitted_at[element] = now
                for wid in job:
                    jobs[wid] = element
            log.info("site %s: submitted job %s%s for %d worker(s) of module %s%s", self.name, job_id,
                     f" (array {array})" if array else "", len(ids), module["name"], f" on {host}" if host else "")
        return jobs

    # -- hosts (HOST-BOUND modules) ---------------------------------------------------------
    def gone_hosts(self, hosts: set[str]) -> dict[str, str]:
        """Hosts no worker job can go to: refused by sbatch, or down, drained, failed or
        not in the partition by sinfo (asked at most once per poll interval)."""
        gone = {host: self.refused_hosts.pop(host) for host in hosts & self.refused_hosts.keys()}
        nodes = self._nodes()
        if not nodes:
            # No answer, or a partition without nodes: that is the site's state, not a node's.
            return gone
        partition = self.config.slurm.partition or "(the default one)"
        for host in sorted(hosts - gone.keys()):
            if host not in nodes:
                gone[host] = f"node {host} is not in partition {partition} of site {self.name} (sinfo)"
            elif SlurmCLI.node_unusable(nodes[host][0]):
                state, reason = nodes[host]
                gone[host] = f"node {host} is {state} (sinfo{f', reason: {reason}' if reason else ''})"
        return gone

    def unknown_hosts(self, hosts: set[str]) -> dict[str, str]:
        nodes = self._nodes()
        if not nodes:
            return {}       # no answer from sinfo: nothing is refused on a guess
        partition = self.config.slurm.partition or "(the default one)"
        return {host: f"node {host} is not in partition {partition} (sinfo lists {', '.join(sorted(nodes))})"
                for host in hosts if host not in nodes}

    def _nodes(self) -> dict[str, tuple[str, str]] | None:
        now = time.monotonic()
        if self.node_view_at is not None and now - self.node_view_at < self.pool.poll_seconds:
            return self.node_view
        self.node_view_at = now
        try:
            self.node_view = self.scheduler.nodes(self.config.slurm.partition)
        except CommandError as exc:
            log.warning("site %s: cannot list nodes: %s", self.name, exc)
            self.node_view = None   # nobody is declared gone on a guess
        return self.node_view

    # -- watching ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """One squeue per poll interval, whatever the number of jobs."""
        now = time.monotonic()
        if self.snapshot is not None and now - self.snapshot_at < self.pool.poll_seconds:
            return
        try:
            self.snapshot = self.scheduler.jobs(self.prefix)
            self.snapshot_at = now
        except CommandError as exc:
            log.warning("site %s: cannot list jobs: %s", self.name, exc)
            if getattr(exc, "host_key", False):
                self._failed(exc)
            self.snapshot = None   # nothing known: nobody is declared dead on a guess

    def dead(self, workers: list[LiveWorker]) -> list[int]:
        self.refresh()
        if self.snapshot is None:
            return []
        gone = []
        for w in workers:
            job = w.slurm_job_id
            if not job:
                continue
            # A job submitted after the snapshot was taken is not in it yet.
            if self.submitted_at.get(job, 0.0) >= self.snapshot_at:
                continue
            if job not in self.snapshot and job.split("_")[0] not in self.snapshot:
                gone.append(w.id)
        for job in [j for j, t in self.submitted_at.items() if j not in self.snapshot and t < self.snapshot_at]:
            del self.submitted_at[job]
        return gone

    def cancel(self, workers: list[LiveWorker]) -> None:
        jobs = sorted({w.slurm_job_id for w in workers if w.slurm_job_id})
        try:
            self.scheduler.cancel(jobs)
        except CommandError as exc:
            log.warning("site %s: scancel failed: %s", self.name, exc)
