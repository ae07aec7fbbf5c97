"""The worker: claims tasks of one module in batches and runs its program per task.

The loop knows no SQL (see db/queue.py). Its life:
register -> setup hook -> [check hook -> claim batch -> run each task -> commit results]*
-> idle timeout, drain signal or app end -> return unstarted tasks -> teardown -> exit.
A heartbeat thread renews the worker's lease; if the controller declared the worker
lost, the thread kills the running program and the worker stops without committing.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .db.connection import Database
from .db.queue import Queue
from .db.rows import ClaimedTask, Message, TaskResult
from .errors import DatabaseUnavailable, TaskFileError, first_line
from . import taskfiles
from .appdef import ModuleDef
from .sites.launch import DRAIN_MARGIN
from .runtimes import ImageError, OutputBuffer, ProgramResult, RuntimePlace, runtime_for, utcnow
from .states import AppStatus, Code, WorkerStatus

log = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP}
MIN_FREE_BYTES = 16 << 20    # below this, scratch counts as full
SINK_FILES = ("sink-tasks.txt", "messages.txt")
# What a program leaves in WORK_DIR to talk to scalebox-hpc, as opposed to its data.
CONTROL_FILES = {*SINK_FILES, "task-exec.json", "timestamps.txt", "input-files.txt", "output-files.txt",
                 "auxout.txt", "app-result.txt", "semaphores.txt"}
# Linux caps one argv string at 32 pages (MAX_ARG_STRLEN): bigger bodies travel in a file.
MAX_ARG_BYTES = 128 * 1024 - 1
BODY_FILE = ".scalebox-body"


@dataclass
class WorkerSettings:
    scratch_root: str
    lease_seconds: float = 30.0
    idle_seconds: float = 30.0
    flush_seconds: float = 0.25       # longest a finished task waits for its commit
    max_batch: int = 500
    stdout_limit: int = 65536
    keep_failed_workdirs: int = 10
    job_end: float | None = None      # epoch seconds the batch job's walltime runs out
    drain_margin: float = DRAIN_MARGIN  # seconds kept free before job_end
    runtime: str | None = None        # the site's container binary: apptainer, singularity, host; None: any on PATH
    image_cache: str | None = None    # where pulled images go (default: under scratch_root)
    pull_timeout: float = 900.0


def slurm_job_id(environ) -> str | None:
    """The job id as squeue shows it: 'ARRAYJOB_INDEX' for an array element."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def job_end_time(environ, walltime_seconds: float | None) -> float | None:
    """When the batch job's walltime runs out (epoch seconds), or None outside a job.

    Slurm 23.02 and later tell it (SLURM_JOB_END_TIME); older ones give the job's start
    (SLURM_JOB_START_TIME, else now, as the worker starts with its job) to which the
    time limit the job was submitted with is added. Slurm's USR1 before the end stays
    the final word either way."""
    end = environ.get("SLURM_JOB_END_TIME")
    if end and end.isdigit():
        return float(end)
    if not walltime_seconds:
        return None
    start = environ.get("SLURM_JOB_START_TIME")
    return (float(start) if start and start.isdigit() else time.time()) + walltime_seconds


def _host_ip() -> tuple[str, str]:
    # In a Slurm job the node's name is what to_host and --nodelist speak of.
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        ip = "127.0.0.1"
    return host, ip


class Worker:
    def __init__(self, dsn: str, worker_id: int, settings: WorkerSettings):
        self.worker_id = worker_id
        self.settings = settings
        self.database = Database(dsn, async_commit=True)
        self.queue = Queue(self.database)
        self.host, self.ip = _host_ip()
        self.slurm_job_id = slurm_job_id(os.environ)
        self.draining = threading.Event()   # finish the current task, return the rest
        self.stopped = threading.Event()    # lost or cancelled: stop now, commit nothing more
        self.stop_reason = ""               # why it stopped, in words (the worker row's message)
        self.app_status: str | None = None  # the app's state, once it is no longer RUNNING
        self.lost = False                   # the controller declared this worker lost
        self.terminated = False
        self.current: tuple[int, float] | None = None   # (task id, monotonic start) while a program runs
        self.pending: list[TaskResult] = []
        self.pending_since = 0.0
        self.failed_workdirs = 0
        self.avg_seconds = 1.0
        self.longest_seconds = 0.0
        # How long to keep trying an unreachable database before giving up.
        self.patience = max(60.0, 10 * settings.lease_seconds)

    # -- setup ---------------------------------------------------------------------
    def _load_module(self, module_id: int) -> None:
        ctx = self.queue.module_context(module_id)
        self.module_id, self.app_id, self.module_name, self.site = ctx.module_id, ctx.app_id, ctx.name, ctx.site
        self.host_bound = ctx.host_bound
        self.module: ModuleDef = ctx.module
        module = self.module
        self.modules, self.module_sites = ctx.modules, ctx.module_sites
        self.forward_targets: dict | None = None    # site -> transfer.ForwardTarget, read at the first forward
        self.main_router = ctx.main_router
        limit = module.stdout_limit or self.settings.stdout_limit
        self.out = OutputBuffer("stdout", limit)
        self.err = OutputBuffer("stderr", limit)
        self.max_batch = module.task_batch_size or self.settings.max_batch
        if module.idle_seconds is not None:
            self.settings.idle_seconds = module.idle_seconds
        self.scratch = Path(self.settings.scratch_root) / f"worker-{self.worker_id}"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.workdir = str(self.scratch / "work")
        self.workdir_ready = os.path.isdir(self.workdir) and not os.listdir(self.workdir)
        # Files a task hands to the next module on the same node (with a to_host header)
        # live here: per app and node, shared by the app's workers there, outliving tasks.
        self.data_dir = Path(self.settings.scratch_root) / "scalebox-data" / f"app-{self.app_id}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        self.runtime = runtime_for(module, RuntimePlace(
            workdir=self.workdir, data_dir=str(self.data_dir), binary=s.runtime, pull_timeout=s.pull_timeout,
            image_cache=os.path.expandvars(s.image_cache or os.path.join(s.scratch_root, "scalebox-images")),
            instance_name=f"sbx-{self.worker_id}-{os.getpid()}"))
        self.runtime_error: tuple[float, str] | None = None     # (when, why) prepare() last failed
        self.space_checked = (0.0, None)
        self.base_env = dict(os.environ)
        self.base_env.pop("SCALEBOX_DSN", None)   # the program has no business with the database
        self.base_env.update({
            "APP_ID": str(self.app_id), "MODULE_NAME": self.module_name, "MODULE_ID": str(self.module_id),
            "SITE": self.site, "LOCAL_HOST": self.host, "LOCAL_IP": self.ip, "DATA_DIR": str(self.data_dir),
            **{k: str(v) for k, v in module.environments.items()}})
        # A threaded program uses the cores its task was given, unless told otherwise.
        self.base_env.setdefault("OMP_NUM_THREADS", str(module.task_cpus))

    def _prepare_runtime(self) -> str | None:
        """Pull the image / start the instance, once; why it failed, or None. After a
        failure the tasks fail fast for a minute before the next try."""
        if self.runtime_error and time.monotonic() - self.runtime_error[0] < 60:
            return self.runtime_error[1]
        try:
            self.runtime.prepare()
            self.runtime_error = None
            return None
        except (ImageError, OSError) as exc:
            log.error("worker %s: %s", self.worker_id, exc)
            self.runtime_error = (time.monotonic(), str(exc))
            return str(exc)

    def _hook(self, name: str) -> ProgramResult | None:
        path = getattr(self.module, name)
        if not path:
            return None
        problem = self._prepare_runtime()
        if problem:
            now = utcnow()
            return ProgramResult(Code.IMAGE, now, now, "", f"scalebox-hpc: {problem}\n")
        return self.runtime.run(path, "", "{}", env=self.base_env, cwd=str(self.scratch), timeout=600,
                                stdout=self.out, stderr=self.err)

    # -- main ----------------------------------------------------------------------------
    def _db(self, fn, what: str, *, finishing: bool = False):
        """A database call retried through outages for at most ``patience`` seconds: by
        then the controller has given this worker's tasks to others. Claims give up at
        once when the worker is asked to stop; finishing calls (commit, hand back, sign
        off) keep trying unless the worker was declared lost."""
        stop = self.stopped.is_set if finishing else (lambda: self.stopped.is_set() or self.draining.is_set())
        return self.database.retrying(fn, what=what, give_up_after=self.patience, stop=stop)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        try:
            module_id = self._db(lambda: self.queue.start_worker(
                self.worker_id, host=self.host, ip=self.ip, pid=os.getpid(), slurm_job_id=self.slurm_job_id,
                lease_seconds=self.settings.lease_seconds), "register worker")
            if module_id is None:
                log.error("worker %s is not pending (already started or declared lost); exiting", self.worker_id)
                return 1
            self._load_module(module_id)
            self._db(lambda: self.database.listen(f"sbx_m{self.module_id}"), "listen")
        except DatabaseUnavailable as exc:
            log.error("worker %s: %s", self.worker_id, exc)
            return 3
        # Everything allocated so far lives as long as the worker: keep the garbage
        # collector from walking it again and again in the task loop.
        gc.freeze()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker %s: module %s (app %s) on %s, scratch %s", self.worker_id, self.module_name,
                 self.app_id, self.host, self.scratch)
        setup = self._hook("setup")
        if setup is not None and setup.code != 0:
            self.stop_reason = f"setup hook failed with exit code {setup.code}: {setup.stderr.strip()[-300:]}"
            log.error(self.stop_reason)
            return self._sign_off(WorkerStatus.FAILED, count_failure=True)
        try:
            self._loop()
        except DatabaseUnavailable as exc:
            # Its leases have run out meanwhile: the controller hands its tasks to others.
            log.error("worker %s: %s; exiting", self.worker_id, exc)
            self.stopped.set()
            return 3
        except Exception as exc:
            # A bug or an unexpected failure: its tasks go back through lease recovery
            # (counted attempts), and the controller counts the failed worker.
            log.exception("worker %s crashed", self.worker_id)
            self.stop_reason = f"crashed: {type(exc).__name__}: {exc}"
            return self._sign_off(WorkerStatus.FAILED, count_failure=True)
        if self.lost:
            return self._sign_off(WorkerStatus.LOST)
        return self._sign_off(WorkerStatus.EXITED)

    def _sign_off(self, status: str, count_failure: bool = False) -> int:
        try:
            if status == WorkerStatus.EXITED:
                self._flush()
                # Whatever is still held was never started (or was stopped by a cancel): free of cost.
                self._db(lambda: self.queue.return_tasks(self.worker_id, None), "return tasks", finishing=True)
            teardown = self._hook("teardown")
            if teardown is not None and teardown.code != 0:
                log.warning("teardown hook exited with %s", teardown.code)
            self._db(lambda: self.queue.stop_worker(self.worker_id, status, self.stop_reason or None,
                                                    count_failure=count_failure), "stop worker", finishing=True)
        except DatabaseUnavailable as exc:
            log.error("worker %s: %s", self.worker_id, exc)
        finally:
            self.stopped.set()
            self.runtime.close()
            if not self.failed_workdirs:
                shutil.rmtree(self.scratch, ignore_errors=True)
            if self.app_status in AppStatus.TERMINAL:
                # The app is over: its node-local data is of no more use to anyone.
                shutil.rmtree(self.data_dir, ignore_errors=True)
            log.info("worker %s stopped: %s (%s)", self.worker_id, status, self.stop_reason or "done")
        return 0 if status == WorkerStatus.EXITED else 1

    def _on_signal(self, signum, _frame) -> None:
        log.info("worker %s: %s received, draining", self.worker_id, signal.Signals(signum).name)
        self.stop_reason = f"drained on {signal.Signals(signum).name}"
        if signum != signal.SIGUSR1:
            self.terminated = True      # the batch system stops the job: its programs too
        self.draining.set()

    def _loop(self) -> None:
        s = self.settings
        idle_since = time.monotonic()
        while not (self.draining.is_set() or self.stopped.is_set()):
            if self.module.check:
                check = self._hook("check")
                if check is not None and check.code != 0:
                    self._flush()
                    if time.monotonic() - idle_since > s.idle_seconds:
                        self.stop_reason = "check hook kept refusing"
                        return
                    self._wait(min(5.0, s.idle_seconds))
                    continue
            problem = self._space_problem()
            if problem:
                # Claiming now would only fail tasks: wait for space (other tasks of the
                # app finishing, the next module consuming DATA_DIR), then give up.
                self._flush()
                if time.monotonic() - idle_since > s.idle_seconds:
                    self.stop_reason = problem
                    return
                self._wait(min(5.0, s.idle_seconds))
                continue
            limit = self._batch_size()
            if limit == 0:
                self.stop_reason = "walltime: no time left for another task"
                return
            try:
                batch = self._db(lambda: self.queue.claim(
                    worker_id=self.worker_id, module_id=self.module_id, app_id=self.app_id, host=self.host,
                    host_bound=self.host_bound, limit=limit), "claim tasks")
            except DatabaseUnavailable:
                if self.draining.is_set() or self.stopped.is_set():
                    return
                raise
            if not batch:
                self._flush()
                idle = time.monotonic() - idle_since
                if idle >= s.idle_seconds:
                    self.stop_reason = f"idle for {s.idle_seconds:g} s"
                    return
                payloads = self._wait(min(2.0, s.idle_seconds - idle))
                ended = [p for p in payloads if p in AppStatus.TERMINAL or p == AppStatus.PAUSED]
                if ended:
                    self.app_status = ended[-1]
                    self.stop_reason = f"app is {ended[-1]}"
                    return
                continue
            self._run_batch(batch)
            idle_since = time.monotonic()

    def _wait(self, timeout: float) -> list[str]:
        try:
            return self.database.wait_notify(timeout)
        except Exception as exc:  # noqa: BLE001 - a broken connection is retried by the next claim
            log.warning("waiting for notifications failed: %s", exc)
            self.database.reset()
            time.sleep(min(timeout, 1.0))
            return []

    def _batch_size(self) -> int:
        """How many tasks to claim: about one flush interval of work (long tasks one by
        one, short ones in batches), and only what fits before the job's walltime ends:
        0 when not even one task fits."""
        size = max(1, min(self.max_batch, int(self.settings.flush_seconds / max(self.avg_seconds, 1e-4))))
        if self.settings.job_end is None:
            return size
        left = self.settings.job_end - self.settings.drain_margin - time.time()
        # A task is claimed only if its task_max_seconds fits; without one, if 1.5 times
        # the longest task seen so far fits (nothing seen yet: one is tried).
        limit = self.module.task_max_seconds
        expect = float(limit) if limit else 1.5 * self.longest_seconds
        if left <= 0 or left < expect:
            return 0
        if not self.longest_seconds:
            return 1
        return max(1, min(size, int(left / max(self.avg_seconds, 1e-4))))

    def _run_batch(self, batch: list[ClaimedTask]) -> None:
        for i, task in enumerate(batch):
            if self.draining.is_set() or self.stopped.is_set():
                if not self.stopped.is_set():
                    rest = [t.id for t in batch[i:]]
                    self._flush()
                    n = self._db(lambda: self.queue.return_tasks(self.worker_id, rest), "return tasks",
                                 finishing=True)
                    log.info("returned %d unstarted task(s)", n)
                return
            t0 = time.monotonic()
            result = self._run_task(task)
            took = time.monotonic() - t0
            self.avg_seconds = 0.8 * self.avg_seconds + 0.2 * took
            self.longest_seconds = max(self.longest_seconds, took)
            if self.stopped.is_set():
                return      # lost or cancelled while it ran: the result must not count
            if not self.pending:
                self.pending_since = time.monotonic()
            self.pending.append(result)
            if time.monotonic() - self.pending_since >= self.settings.flush_seconds:
                self._flush()
        self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        results, self.pending = self.pending, []
        self._db(lambda: self.queue.complete(worker_id=self.worker_id, app_id=self.app_id, results=results,
                                             retry_rules=self.module.retry_rules), "commit task results",
                 finishing=True)

    # -- one task -------------------------------------------------------------------------
    def _run_task(self, task: ClaimedTask) -> TaskResult:
        received = utcnow()
        record = {"task_id": task.id, "attempt": task.attempt, "worker_id": self.worker_id,
                  "t_ready": task.ready_at, "t_claimed": task.claimed_at, "t_received": received}
        result = TaskResult(task.id, task.attempt, 0, record)
        try:
            workdir = self._workdir()
        except OSError as exc:
            full = self._scratch_full()
            code = Code.SCRATCH_FULL if full else Code.WORKDIR
            record.update(status_code=code, note=f"cannot create WORK_DIR: {exc}" + (f" ({full})" if full else ""))
            result.code = code
            return result
        problem = self._prepare_runtime()
        if problem:
            record.update(status_code=Code.IMAGE, note=problem, stderr=f"scalebox-hpc: {problem}\n",
                          t_stageout_end=utcnow())
            result.code = Code.IMAGE
            return result
        env = dict(self.base_env, WORK_DIR=workdir, TASK_ID=str(task.id), ATTEMPT=str(task.attempt))
        body, body_file = task.body, None
        if len(body) > MAX_ARG_BYTES // 4 and len(body.encode()) > MAX_ARG_BYTES:
            # Too big for argv: "$1" names a file holding the body byte for byte, and
            # SCALEBOX_BODY_FILE says so.
            body_file = Path(workdir, BODY_FILE)
            body_file.write_bytes(task.body.encode())
            body = env["SCALEBOX_BODY_FILE"] = str(body_file)
        timeout = self.module.task_max_seconds
        self.current = (task.id, time.monotonic())
        try:
            prog = self.runtime.run(self.module.command, body, task.headers, env=env,
                                    cwd=workdir, timeout=float(timeout) if timeout else None,
                                    stdout=self.out, stderr=self.err)
        finally:
            self.current = None
        record.update(t_program_start=prog.started, t_program_end=prog.ended, t_stageout_start=prog.ended)
        if prog.stdout:
            record["stdout"] = prog.stdout
        if prog.stderr:
            record["stderr"] = prog.stderr
        code = prog.code
        try:
            names = set(os.listdir(workdir)) - {BODY_FILE}
        except OSError:
            names = set()
        if body_file is not None:
            body_file.unlink(missing_ok=True)
        if code - 128 in _STOP_SIGNALS and not prog.timed_out and not self.terminated:
            # A job's end signals every process of it a moment apart: a program killed by
            # such a signal may be seen dead before the worker's own signal arrives.
            deadline = time.monotonic() + 1.0
            while not self.terminated and time.monotonic() < deadline:
                time.sleep(0.02)
        if code != 0 and self.terminated and not prog.timed_out:
            # scancel, preemption or the walltime signalled the whole job, the program
            # with it: the attempt was lost to the job's end, not failed, and is retried
            # (code 123) like one whose worker vanished.
            return self._system_failure(result, Code.LEASE_LOST, "interrupted: the worker's batch job was stopped "
                                        f"(program exit code {code})", workdir, task, names)
        full = self._scratch_full() if code != 0 and not prog.timed_out else None
        if full:
            return self._system_failure(result, Code.SCRATCH_FULL, f"{full} (program exit code {code})",
                                        workdir, task, names)
        try:
            code = self._collect(workdir, names, code, result)
        except TaskFileError as exc:
            code = Code.TASK_FILE
            result.messages, result.semaphores, result.app_result = [], [], None
            record["stderr"] = record.get("stderr", "") + f"\nscalebox-hpc: {exc}\n"
            record["note"] = str(exc)
        if record.get("output_files") is None and names - CONTROL_FILES:
            # The program said nothing of its output: record the files it left in WORK_DIR.
            left = sorted(names - CONTROL_FILES)
            record["output_files"] = left
            if record.get("output_bytes") is None:
                record["output_bytes"] = taskfiles.sum_file_sizes(left, workdir)
        record["t_stageout_end"] = utcnow()
        if code == 0 and result.messages:
            code = self._forward(workdir, task, result)
        record["status_code"] = code
        result.code = code
        self._cleanup(workdir, code, task, names)
        return result

    # -- forwarding to other sites --------------------------------------------------------
    def _forward(self, workdir: str, task: ClaimedTask, result: TaskResult) -> int:
        """Send the files of messages bound for modules at other sites into those sites'
        inboxes, before anything is committed; the messages then name the forwarded
        paths. A failure (after the transfer's own retries) fails the attempt and
        commits none of its messages."""
        by_site: dict[str, list[Message]] = {}
        for msg in result.messages:
            site = self.module_sites.get(msg.module_id)
            if site and site != self.site:
                by_site.setdefault(site, []).append(msg)
        if not by_site:
            return 0
        from . import transfer
        record = result.record
        declared = record.get("output_files") or []
        forwards = []
        record["t_forward_start"] = utcnow()
        try:
            for site, messages in by_site.items():
                target = self._forward_target(site)
                wanted = {id(m): m.headers["files"] for m in messages if "files" in m.headers}
                if not wanted and declared:
                    wanted = {id(m): list(declared) for m in messages}
                if not wanted:
                    continue          # messages only: nothing to carry
                if not target.inbox:
                    raise transfer.TransferError(f"site {site} has no inbox for forwarded files: set 'inbox' "
                                                 "in its site config")
                roots = {m.headers.get("files_root") for m in messages if id(m) in wanted}
                if len(roots) > 1:
                    raise transfer.PathRefused("messages of one task to one site name different files_root headers")
                paths = list(dict.fromkeys(f for files in wanted.values() for f in files))
                items, names = transfer.plan(paths, workdir, roots.pop())
                dest = f"app-{self.app_id}/task-{task.id}"

                def retrying(attempt, exc, site=site):
                    log.warning("task %s: forward to site %s failed (try %d), sending again: %s",
                                task.id, site, attempt, exc)

                sent = transfer.send(target, dest, items, mode=self.module.forward_mode,
                                     retries=self.module.forward_retries, on_retry=retrying)
                forwards.append({"site": site, **sent})
                for m in messages:
                    files = wanted.get(id(m))
                    if files is None:
                        continue
                    moved = {f: f"{sent['path']}/{names[f]}" for f in files}
                    headers = {k: v for k, v in m.headers.items() if k != "files_root"}
                    m.headers = {**headers, "files": [moved[f] for f in files], "inbox_dir": sent["path"]}
                    if m.body in moved:
                        m.body = moved[m.body]
        except (transfer.TransferError, transfer.PathRefused) as exc:
            code = Code.PATH_REFUSED if isinstance(exc, transfer.PathRefused) else Code.FORWARD
            record["t_forward_end"] = utcnow()
            record["note"] = str(exc)
            record["stderr"] = record.get("stderr", "") + f"\nscalebox-hpc: {exc}\n"
            record["forwards"] = forwards or None
            result.messages, result.semaphores, result.app_result = [], [], None
            log.error("task %s: %s", task.id, exc)
            return code
        record["t_forward_end"] = utcnow()
        if forwards:
            record["forwards"] = forwards
            record["forward_bytes"] = sum(f["bytes"] for f in forwards)
            record["forward_files"] = sum(f["files"] for f in forwards)
        return 0

    def _forward_target(self, site: str):
        """How to reach a site's inbox, from the sites table (read again for a site it
        did not have: a controller may have added it since)."""
        from .transfer import ForwardTarget
        if self.forward_targets is None or site not in self.forward_targets:
            stored = self._db(self.queue.site_configs, "read site configs", finishing=True)
            self.forward_targets = {name: ForwardTarget.from_json(name, data) for name, data in stored.items()}
        return self.forward_targets.get(site) or ForwardTarget(site)

    def _system_failure(self, result: TaskResult, code: int, note: str, workdir: str, task: ClaimedTask,
                        names: set[str]) -> TaskResult:
        """End an attempt with a system code: nothing it left in WORK_DIR is applied."""
        record = result.record
        record["stderr"] = record.get("stderr", "") + f"\nscalebox-hpc: {note}\n"
        record["note"] = note
        record["status_code"] = result.code = code
        record["t_stageout_end"] = utcnow()
        self._cleanup(workdir, code, task, names)
        return result

    def _collect(self, workdir: str, names: set[str], code: int, result: TaskResult) -> int:
        """Read what the program left in WORK_DIR. Messages, semaphores and the app
        result count only for a successful attempt; records are kept for every one."""
        if not names:
            return code
        record = result.record

        def read(name: str) -> str:
            with open(os.path.join(workdir, name), errors="replace") as fh:
                return fh.read()

        if "task-exec.json" in names:
            info = taskfiles.parse_task_exec_json(read("task-exec.json"))
            if info.status_code is not None and code == 0:
                code = info.status_code
            record.update(input_bytes=info.input_bytes, output_bytes=info.output_bytes,
                          input_files=info.input_files, output_files=info.output_files,
                          user_text=info.user_text)
            if info.timestamps:
                record["user_timestamps"] = [list(t) for t in info.timestamps]
        if "timestamps.txt" in names:
            record["user_timestamps"] = (record.get("user_timestamps") or []) + [
                list(t) for t in taskfiles.parse_timestamps(read("timestamps.txt"))]
        for kind in ("input", "output"):
            name = f"{kind}-files.txt"
            if name in names:
                files = taskfiles.parse_file_list(read(name), name)
                record[f"{kind}_files"] = (record.get(f"{kind}_files") or []) + files
                if record.get(f"{kind}_bytes") is None:
                    record[f"{kind}_bytes"] = taskfiles.sum_file_sizes(files, workdir)
        if "auxout.txt" in names:
            record["auxout"] = read("auxout.txt")[: self.out.limit]
        if code != 0:
            return code
        for name in SINK_FILES:
            if name in names:
                messages = taskfiles.parse_sink_tasks(read(name), known_modules=self.modules, filename=name)
                result.messages += self._route(messages, result.task_id)
        if "semaphores.txt" in names:
            result.semaphores = [(op.name, op.op, op.value)
                                 for op in taskfiles.parse_semaphores(read("semaphores.txt"))]
        if "app-result.txt" in names:
            result.app_result = read("app-result.txt").strip()
        record["messages_out"] = len(result.messages)
        if result.messages and any(m.module_id is None for m in result.messages):
            record["note"] = "output messages have no destination: set sink_modules or main_router"
            result.messages = []
            return Code.NO_DESTINATION
        return code

    def _route(self, messages: list[taskfiles.SinkMessage], task_id: int) -> list[Message]:
        now = utcnow()
        origin = {"from_module": self.module_name, "from_host": self.host, "from_ip": self.ip}
        out = []
        for msg in messages:
            if msg.module:
                targets = [msg.module]
            else:
                targets = list(self.module.sink_modules) or (
                    [self.main_router] if self.main_router else [None])
            for target in targets:
                out.append(Message(self.modules.get(target) if target else None, msg.body,
                                   {**origin, **msg.headers}, created=now, from_task_id=task_id))
        return out

    def _space_problem(self) -> str | None:
        """Why not to claim now: scratch below the module's free_space_gb, or DATA_DIR
        above its dir_quota_gb (measured at most every 10 s)."""
        free_gb, quota_gb = self.module.free_space_gb, self.module.dir_quota_gb
        if not free_gb and not quota_gb:
            return None
        now = time.monotonic()
        if now - self.space_checked[0] < 10:
            return self.space_checked[1]
        problem = None
        free = _free_bytes(self.settings.scratch_root)
        if free_gb and free is not None and free < float(free_gb) * (1 << 30):
            problem = (f"scratch full: {free / (1 << 30):.2f} GB free in {self.settings.scratch_root} on "
                       f"{self.host}, free_space_gb is {free_gb}")
        elif quota_gb:
            used = _tree_bytes(str(self.data_dir))
            if used > float(quota_gb) * (1 << 30):
                problem = (f"DATA_DIR over quota: {used / (1 << 30):.2f} GB in {self.data_dir} on {self.host}, "
                           f"dir_quota_gb is {quota_gb}")
        self.space_checked = (now, problem)
        return problem

    def _scratch_full(self) -> str | None:
        free = _free_bytes(self.settings.scratch_root)
        if free is not None and free < MIN_FREE_BYTES:
            return f"node-local scratch full: {free >> 10} KiB free in {self.settings.scratch_root} on {self.host}"
        return None

    def _workdir(self) -> str:
        """The task's WORK_DIR: empty, on node-local scratch. A directory the previous
        task left empty is handed on as it is (an empty directory is as fresh as a new
        one, and mkdir/rmdir per task is costly on overlay filesystems)."""
        if not self.workdir_ready:
            os.mkdir(self.workdir)
            self.workdir_ready = True
        return self.workdir

    def _cleanup(self, workdir: str, code: int, task: ClaimedTask, names: set[str]) -> None:
        if not names:
            return
        # Kept for inspection when it failed, unless keeping it would fill the scratch further.
        keep = code not in (0, Code.SCRATCH_FULL) and self.failed_workdirs < self.settings.keep_failed_workdirs
        if keep:
            self.failed_workdirs += 1
        kept = self.scratch / f"failed-task-{task.id}-{task.attempt}"
        if self.runtime.fixed_workdir:
            # A container instance has this very directory bound at /work: empty it in place.
            if keep:
                kept.mkdir()
            for name in os.listdir(workdir):
                path = os.path.join(workdir, name)
                if keep:
                    os.rename(path, kept / name)
                elif os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        else:
            self.workdir_ready = False
            # Renamed first, so the next task gets an empty WORK_DIR even if some file
            # cannot be removed.
            target = kept if keep else self.scratch / f".trash-{task.id}-{task.attempt}"
            os.rename(workdir, target)
            if not keep:
                shutil.rmtree(target, ignore_errors=True)
        if keep:
            log.info("kept WORK_DIR of failed task %s for inspection: %s", task.id, kept)

    # -- heartbeat ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        beat = Queue(Database(self.database.dsn, async_commit=True))
        interval = self.settings.lease_seconds / 3
        next_beat = 0.0
        last_ok = time.monotonic()
        marked = None
        while not self.stopped.is_set():
            now = time.monotonic()
            if now - last_ok > self.patience:
                self._stop(f"database unreachable for {self.patience:.0f} s")
                break
            try:
                current = self.current
                # Tasks that run for a while show as RUNNING; short ones go from QUEUED to done
                # without the extra round trip on the hot path.
                if current and current[0] != marked and now - current[1] > 0.2:
                    beat.mark_running(self.worker_id, current[0])
                    marked = current[0]
                if now >= next_beat:
                    app_status = beat.heartbeat(self.worker_id, self.settings.lease_seconds)
                    next_beat, last_ok = now + interval, now
                    if app_status is None:
                        self.lost = True
                        self._stop("lease lost: the controller declared this worker lost")
                    elif app_status != AppStatus.RUNNING:
                        self.app_status = app_status
                        if app_status == AppStatus.CANCELLED:
                            self._stop("app cancelled")
                        else:
                            self.stop_reason = f"app is {app_status}"
                            self.draining.set()
            except Exception as exc:  # noqa: BLE001 - keep beating through database outages
                log.warning("heartbeat failed: %s", first_line(exc))
                beat.database.reset()
                next_beat = now + 1.0
            time.sleep(0.1)
        beat.database.close()

    def _stop(self, message: str) -> None:
        log.warning("worker %s: %s; stopping the running program", self.worker_id, message)
        self.stop_reason = message
        self.stopped.set()
        self.runtime.kill()
