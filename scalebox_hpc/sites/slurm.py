"""Slurm sites: pools of long-lived worker jobs submitted with sbatch.

Two layers, as in dask-jobqueue: ``SlurmCLI`` knows Slurm's commands and output
formats (a PBS site would add one such class), ``BatchSite`` knows pools: it renders
worker job scripts, rate-limits submissions, marks the site degraded after repeated
failures, and tells the controller which workers' jobs are gone, from one queue
query per site per poll interval whatever the number of jobs.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigError, ScaleboxError
from ..siteconfig import render_worker_script, walltime_seconds
from ..worker import DRAIN_MARGIN
from . import LiveWorker, Site

log = logging.getLogger(__name__)


class SchedulerError(ScaleboxError):
    """A batch system command failed."""


def _command_failed(argv: list[str], status: int, out: str, err: str, where: str = "") -> SchedulerError:
    """A scheduler command's non-zero exit, with the last line it said."""
    detail = (err or out).strip().splitlines()
    return SchedulerError(f"{shlex.join(argv[:2])} failed{where} (exit {status}): "
                          f"{detail[-1] if detail else 'no output'}")


class LocalRunner:
    """Runs the scheduler's commands on this machine (a remote site runs them over SSH)."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 60.0):
        self.env = env
        self.timeout = timeout
        self.calls: dict[str, int] = {}          # command -> how many times (benchmarks read it)

    def __call__(self, argv: list[str], input: str | None = None) -> str:
        self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=self.timeout,
                                  env=self.env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SchedulerError(f"{argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise _command_failed(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout


class TransportError(SchedulerError):
    """The way to the site failed (not the command). ``unsure``: the command may have run."""

    def __init__(self, message: str, unsure: bool, host_key: bool = False):
        super().__init__(message)
        self.unsure = unsure
        self.host_key = host_key      # an unknown or changed host key: it will not heal by itself


class SSHRunner:
    """Runs the scheduler's commands on a site's login node over one reused SSH connection."""

    def __init__(self, connection, timeout: float = 60.0):
        self.connection = connection
        self.timeout = timeout
        self.calls: dict[str, int] = {}

    def __call__(self, argv: list[str], input: str | None = None) -> str:
        from ..ssh import HostKeyError, SSHError
        self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
        try:
            status, out, err = self.connection.run(argv, input.encode() if input else None, self.timeout)
        except SSHError as exc:
            raise TransportError(str(exc), unsure=exc.sent, host_key=isinstance(exc, HostKeyError)) from None
        if status != 0:
            raise _command_failed(argv, status, out, err, f" on {self.connection.settings.host}")
        return out

    def close(self) -> None:
        self.connection.close()


@dataclass
class Job:
    id: str
    name: str
    state: str


class SlurmCLI:
    """Slurm through its command-line tools."""

    ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
              "SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED"}
    # Node states (sinfo %T, prefixes: drained, draining, failing ...) that take no new job.
    UNUSABLE = ("down", "drain", "fail", "inval")
    # What sbatch says when a --nodelist job can never run on that node.
    NODE_REFUSALS = ("Invalid node name specified", "Requested node configuration is not available")

    def __init__(self, runner=None):
        self.run = runner or LocalRunner()

    def submit(self, script: str) -> str:
        # The comment marks this very submission: if the connection drops while sbatch
        # runs, the queue tells whether it went in, so it is neither lost nor made twice.
        token = f"sbx-{uuid.uuid4().hex[:20]}"
        try:
            out = self.run(["sbatch", "--parsable", f"--comment={token}"], input=script).strip()
        except TransportError as exc:
            if not exc.unsure:
                raise
            job_id = self._submitted(token, exc)
            log.warning("sbatch's answer was lost (%s); the queue shows it submitted job %s", exc, job_id)
            return job_id
        job_id = out.split(";")[0]               # "ID" or "ID;cluster"
        if not re.fullmatch(r"\d+", job_id):
            raise SchedulerError(f"sbatch answered {out!r}, not a job id")
        return job_id

    def _submitted(self, token: str, cause: Exception, tries: int = 4) -> str:
        """The job sbatch made with this comment, asked of the queue after a lost answer.
        Raises SchedulerError when it is not there (nothing was submitted)."""
        for attempt in range(tries):
            time.sleep(min(8.0, 1.0 * 2 ** attempt))
            try:
                out = self.run(["squeue", "--me", "-h", "-t", "all", "-o", "%A|%k"])
            except TransportError:
                continue
            for line in out.splitlines():
                job, _, comment = line.strip().partition("|")
                if comment == token:
                    return job
            raise SchedulerError(f"{cause}; no job with comment {token} is in the queue, so nothing was submitted")
        # Whether it went in is unknown: if it did, its workers find their rows released and leave.
        raise SchedulerError(f"{cause}; the queue could not be asked whether it was submitted")

    def jobs(self, name_prefix: str) -> dict[str, Job]:
        """Our active jobs, array elements one by one (``-r``), in one squeue call."""
        out = self.run(["squeue", "--me", "-h", "-r", "-o", "%i|%j|%T"])
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[1].startswith(name_prefix):
                found[parts[0]] = Job(*parts)
        return found

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self.run(["scancel", *job_ids])

    def partition(self, name: str | None) -> str:
        """A partition's state and nodes ('UP, nodes n[1-2]'); None: the default one.
        Raises SchedulerError when it does not exist or is not up."""
        out = self.run(["scontrol", "show", "-o", "partition", *([name] if name else [])])
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if (name and fields.get("PartitionName") == name) or (not name and fields.get("Default") == "YES"):
                state = fields.get("State", "?")
                summary = f"{fields.get('PartitionName')} {state}, nodes {fields.get('Nodes', '?')}, " \
                          f"time limit {fields.get('MaxTime', '?')}"
                if state != "UP":
                    raise SchedulerError(f"partition {summary}: not UP")
                return summary
        raise SchedulerError(f"partition {name or '(default)'} not found")

    def nodes(self, partition: str | None) -> dict[str, tuple[str, str]]:
        """The nodes of a partition (None: the default one) as {name: (state, reason)}, in
        one sinfo call; empty when there is no such partition."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N|%P|%T|%E"])
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|", 3)
            if len(parts) != 4:
                continue
            node, part, state, reason = parts
            if (part.rstrip("*") == partition) if partition else part.endswith("*"):
                found[node] = (state, "" if reason == "none" else reason)
        return found

    @classmethod
    def node_unusable(cls, state: str) -> bool:
        """Whether a node in this sinfo state takes no new job ('idle*', not responding
        yet, still may: Slurm marks it down itself after SlurmdTimeout)."""
        return any(re.sub(r"[^a-z_]", "", word).startswith(cls.UNUSABLE) for word in state.lower().split("+"))

    @classmethod
    def refuses_node(cls, message: str) -> bool:
        return any(text in message for text in cls.NODE_REFUSALS)

    def max_array_size(self) -> int:
        out = self.run(["scontrol", "show", "config"])
        m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", out, re.M)
        return int(m.group(1)) if m else 1001


def worker_dsn(config, controller_dsn: str) -> str:
    """The database address a site's workers use: the site's own (as seen from its
    compute nodes), else the controller's. It goes into job scripts, so it must hold no
    password: that belongs in a passfile or a libpq service."""
    db = config.database
    dsn = db.dsn or (f"service={db.service}" if db.service else controller_dsn)
    if "password" in conninfo_to_dict(dsn):
        raise ConfigError("the database address for this site's workers holds a password, which would "
                          "end up in job scripts: set database.passfile or database.service in the site config",
                          file=config.path or None, key="database")
    return dsn


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

    def unfit(self, module: dict) -> str | None:
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
            backoff = min(600.0, 30.0 * 2 ** (self.failures - self.FAILURES_TO_DEGRADE))
            self.retry_at = time.monotonic() + backoff
            if self.status != "DEGRADED":
                log.error("site %s DEGRADED after %d failed submissions: %s", self.name, self.failures, exc)
            self.status, self.reason = "DEGRADED", f"{self.failures} submissions failed in a row; last: {exc}"

    def _succeeded(self) -> None:
        if self.status == "DEGRADED":
            log.info("site %s works again", self.name)
        self.failures, self.status, self.reason = 0, "OK", None

    # -- submission -----------------------------------------------------------------------
    def max_array_size(self) -> int:
        if self._max_array is None:
            try:
                self._max_array = self.scheduler.max_array_size()
            except SchedulerError:
                return 1001
        return self._max_array

    def worker_argv(self, worker_ids: list[int]) -> list[str]:
        python = self.config.python or sys.executable
        argv = [python, "-m", "scalebox_hpc", "worker", "--worker-ids", ",".join(map(str, worker_ids)),
                "--lease-seconds", f"{self.settings.lease_seconds:g}",
                "--idle-seconds", f"{self.pool.idle_seconds:g}",
                "--walltime-seconds", str(walltime_seconds(self.config.slurm.walltime))]
        if self.config.scratch_root:
            argv += ["--scratch", self.config.scratch_root]
        if self.config.runtime:
            argv += ["--runtime", self.config.runtime]
        if self.config.image_cache:
            argv += ["--image-cache", self.config.image_cache]
        return argv

    def worker_env(self) -> dict[str, str]:
        return {**self.config.env, "SCALEBOX_DSN": worker_dsn(self.config, self.settings.dsn)}

    def launch(self, worker_ids: list[int], module: dict, host: str | None = None) -> dict[int, str]:
        """Submit jobs for these worker rows (arrays when many, split at MaxArraySize);
        with ``host``, one-node jobs on that node (--nodelist).

        Returns the Slurm job id of each worker submitted; rows missing from it were
        not submitted (the controller releases them)."""
        try:
            self.ensure_log_dir()                   # Slurm writes job output there
        except (SchedulerError, OSError) as exc:
            if not isinstance(exc, TransportError):
                exc = SchedulerError(f"cannot create the log directory {self.log_dir}: {exc}")
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
                worker_argv=self.worker_argv(ids), env=self.worker_env(),
                log_dir=self.log_dir, array=array, nodelist=host)
            self.recent.append(time.monotonic())   # failed calls load slurmctld as much
            try:
                job_id = self.scheduler.submit(script)
            except SchedulerError as exc:
                if host and SlurmCLI.refuses_node(str(exc)):
                    # That node's fault, not the site's: gone_hosts() reports it next.
                    self.refusal = self.refused_hosts[host] = f"sbatch refused a job for node {host}: {exc}"
                    log.error("site %s: module %s: %s", self.name, module["name"], self.refusal)
                    break
                where = ", ".join(f"{k} '{v}'" for k, v in (("partition", self.config.slurm.partition),
                                                             ("account", self.config.slurm.account),
                                                             ("qos", self.config.slurm.qos)) if v)
                if not isinstance(exc, TransportError):
                    exc = SchedulerError(f"{exc}{f' ({where})' if where else ''}")
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

    def _nodes(self) -> dict[str, tuple[str, str]] | None:
        now = time.monotonic()
        if self.node_view_at is not None and now - self.node_view_at < self.pool.poll_seconds:
            return self.node_view
        self.node_view_at = now
        try:
            self.node_view = self.scheduler.nodes(self.config.slurm.partition)
        except SchedulerError as exc:
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
        except SchedulerError as exc:
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
        except SchedulerError as exc:
            log.warning("site %s: scancel failed: %s", self.name, exc)
