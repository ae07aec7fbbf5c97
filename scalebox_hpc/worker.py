"""The worker: a pilot, one process per node of a worker job, that runs as many tasks
at once as its cores, GPUs and memory hold, of every module of its app on its site.

The loop knows no SQL (see db/queue.py). Its life:
register (with what the node has) -> setup hooks -> [pick modules for the free lanes
(policy.plan) -> one claim for all of them -> lanes run their tasks -> commit the
results together]* -> idle timeout, drain signal or app end -> running tasks finish,
unstarted ones go back -> teardown hooks -> exit.
A lane is one place a task runs (its own WORK_DIR, output buffers and runtimes), in a
thread of its own (its batches of short host programs in a process of its own,
laneproc.py); the main thread alone talks to the database, and a heartbeat
thread on a second connection renews the pilot's lease. If the controller declared the
pilot lost, the heartbeat kills every running program and the pilot stops without
committing.
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
from . import intask, taskfiles
from .laneproc import STOP, TERMINATED, LaneProcess, LaneShared
from .appdef import HOOKS, IMAGE_DIRS, ModuleDef
from .policy import Budget, Candidate, plan, stages
from .resources import NodeResources, gpu_environment, node_resources
from .sites.launch import DRAIN_MARGIN
from .runtimes import ImageError, OutputBuffer, ProgramResult, RuntimePlace, runtime_for, utcnow
from .runtimes.host import HostRuntime
from .states import CONTAINER_GPU_FLAGS, AppStatus, Code, WorkerStatus

log = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP}
MIN_FREE_BYTES = 16 << 20    # below this, scratch counts as full
SINK_FILES = ("sink-tasks.txt", "messages.txt")
# What a program leaves in WORK_DIR to talk to scalebox-hpc, as opposed to its data.
USER_FILE = "user-file.txt"      # upstream's: the task's user text, unless task-exec.json has userText
REMOVED_FILES = "removed-files.txt"   # upstream's: paths to delete once the attempt is counted
CONTROL_FILES = {*SINK_FILES, "task-exec.json", "task-exec.yaml", "extra-attrs.yaml", "timestamps.txt",
                 "input-files.txt", "output-files.txt", REMOVED_FILES, "auxout.txt", USER_FILE, "app-result.txt",
                 "semaphores.txt", taskfiles.INTASK_DIR}
# Linux caps one argv string at 32 pages (MAX_ARG_STRLEN): bigger bodies travel in a file.
MAX_ARG_BYTES = 128 * 1024 - 1
# A pilot looks for new apps on its site this often, besides when one is announced.
REFRESH_SECONDS = 10.0
BODY_FILE = ".scalebox-body"
# A batch of at least this many host tasks runs in a process of the lane's own
# (laneproc.py), where there are several lanes to share the interpreter.
PROCESS_BATCH = 8


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
    container_gpu: str | None = None  # nv / rocm: containers get --nv / --rocm when the pilot has GPUs
    cpus: int | None = None           # outside Slurm: the cores to use (None: all of the machine)
    gpus: tuple[str, ...] | None = None   # outside Slurm: the GPU ids to use (None: CUDA_VISIBLE_DEVICES)
    mem_mb: int | None = None         # outside Slurm: the memory to count (None: not counted)
    lane_processes: bool = True       # batches of short host tasks run in a process per lane


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


def upstream_variables(app_id: int, module_id: int, module_name: str, site: str, module: ModuleDef) -> dict:
    """The variables upstream Scalebox gives a module's program, in both its spellings
    (JOB_* before modules were called modules)."""
    sinks = ",".join(module.sink_modules)
    return {"APP_ID": str(app_id), "MODULE_NAME": module_name, "MODULE_ID": str(module_id),
            "JOB_NAME": module_name, "JOB_ID": str(module_id), "SINK_MODULE": sinks, "SINK_JOB": sinks,
            "SITE": site, "CLUSTER": site, "IS_SINGULARITY": "yes" if module.in_container else "",
            "CODE_PATH": module.code_path or ""}


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




class ModuleState:
    """What a pilot knows of one module it serves: read once, shared by its lanes."""

    def __init__(self, ctx, settings: WorkerSettings, host: str, ip: str, forward_targets: dict,
                 bin_dir: Path | None = None):
        self.module_id, self.app_id, self.module_name, self.site = ctx.module_id, ctx.app_id, ctx.name, ctx.site
        self.host_bound = ctx.host_bound
        self.module: ModuleDef = ctx.module
        self.modules, self.module_sites, self.main_router = ctx.modules, ctx.module_sites, ctx.main_router
        self.forward_targets = forward_targets       # site -> transfer.ForwardTarget
        self.max_batch = self.module.task_batch_size or settings.max_batch
        self.stage = 0
        # Files a task hands to the next module on the same node (with a to_host header)
        # live here: per app and node, shared by the app's workers there, outliving tasks.
        self.data_dir = Path(settings.scratch_root) / "scalebox-data" / f"app-{self.app_id}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.base_env = dict(os.environ)
        self.base_env.pop("SCALEBOX_DSN", None)   # the program has no business with the database
        self.base_env.update({
            "LOCAL_HOST": host, "LOCAL_IP": ip, "DATA_DIR": str(self.data_dir),
            **upstream_variables(ctx.app_id, ctx.module_id, ctx.name, ctx.site, self.module)})
        if bin_dir is not None:
            # The in-task `scalebox` command comes first.
            self.base_env["PATH"] = os.pathsep.join(filter(None, [str(bin_dir), os.environ.get("PATH")]))
        self.base_env.update({k: str(v) for k, v in self.module.environments.items()})
        # A threaded program uses the cores its task was given, unless told otherwise.
        self.base_env.setdefault("OMP_NUM_THREADS", str(self.module.task_cpus))
        self.avg_seconds = 1.0
        self.longest_seconds = 0.0
        self.last_served = 0.0          # monotonic time a lane last got its tasks
        self.exhausted_at: float | None = None   # a claim found fewer ready than asked (monotonic)
        self.check_until = 0.0          # the check hook's answer holds until then
        self.check_ok = True
        self.hooks: TaskRunner | None = None     # runs setup, check and teardown
        self.hooks_lock = threading.Lock()       # a hook runs, or its files go to a task
        self.active = True              # its app is RUNNING (as far as this pilot knows): claim for it
        self.ended: str | None = None   # the app's state once it left RUNNING (PAUSED may come back)


class Lane:
    """One place a task runs: a thread, its WORK_DIRs and runtimes (one per module it
    ran), and while it runs a batch, the cores and GPUs that batch was given."""

    def __init__(self, index: int):
        self.index = index
        self.busy = False
        self.work: tuple[ModuleState, list[ClaimedTask]] | None = None
        self.cpus = 0
        self.gpus: tuple[str, ...] = ()
        self.mem_mb = 0
        self.node_gpus = False          # the node has GPUs: a task sees only its own
        self.shared = LaneShared()      # flags for, and the running task of, a batch in a process
        self.processes: dict[int, LaneProcess] = {}  # module id -> its process, for short host tasks
        self.runners: dict[int, TaskRunner] = {}
        self.ready = threading.Condition()
        self.thread: threading.Thread | None = None

    @property
    def current(self) -> tuple[int, float] | None:
        """(task id, monotonic start) while a program runs, in the thread or its process."""
        return self.shared.current

    @current.setter
    def current(self, value: tuple[int, float] | None) -> None:
        self.shared.current = value

    def env(self) -> dict[str, str]:
        """What a task learns of its lane: its slot, and on a GPU node its own GPUs only."""
        env = {"SLOT_ID": str(self.index)}
        if self.node_gpus:
            env.update(gpu_environment(self.gpus))
        return env


class TaskRunner:
    """One module's programs in one lane (or its hooks): WORK_DIR, output buffers and
    runtime, and everything one attempt does, from WORK_DIR to its TaskResult."""

    def __init__(self, pilot: "Worker", state: ModuleState, lane: Lane, scratch: Path):
        self.pilot, self.state, self.lane = pilot, state, lane
        self.settings, self.worker_id, self.host, self.ip = pilot.settings, pilot.worker_id, pilot.host, pilot.ip
        self.module, self.module_id, self.module_name = state.module, state.module_id, state.module_name
        self.app_id, self.site, self.data_dir, self.base_env = state.app_id, state.site, state.data_dir, state.base_env
        self.modules, self.module_sites, self.main_router = state.modules, state.module_sites, state.main_router
        limit = self.module.stdout_limit or self.settings.stdout_limit
        self.out = OutputBuffer("stdout", limit)
        self.err = OutputBuffer("stderr", limit)
        self.scratch = scratch
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.workdir = str(self.scratch / f"work-m{self.module_id}")
        self.workdir_ready = os.path.isdir(self.workdir) and not os.listdir(self.workdir)
        self.failed_workdirs = 0
        s = self.settings
        gpu_flag = CONTAINER_GPU_FLAGS.get(s.container_gpu or "none")
        self.runtime = runtime_for(self.module, RuntimePlace(
            workdir=self.workdir, data_dir=str(self.data_dir), binary=s.runtime, pull_timeout=s.pull_timeout,
            image_cache=os.path.expandvars(s.image_cache or os.path.join(s.scratch_root, "scalebox-images")),
            root=str(pilot.scratch), instance_prefix=f"sbx-{self.worker_id}-{os.getpid()}",
            gpu_flags=(gpu_flag,) if gpu_flag and pilot.resources.gpus else (), images=pilot.images,
            bin_dir=str(pilot.bin_dir) if pilot.bin_dir else None))
        self.runtime_error: tuple[float, str] | None = None     # (when, why) prepare() last failed
        self.image_hooks: dict[str, str] | None = None          # hook -> path in the image, once looked for
        self.space_checked = (0.0, None)

    @property
    def terminated(self) -> bool:
        return self.pilot.terminated or bool(self.lane.shared.flags & TERMINATED)

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
            log.error("worker %s, module %s: %s", self.worker_id, self.module_name, exc)
            self.runtime_error = (time.monotonic(), str(exc))
            return str(exc)

    def _hook(self, name: str) -> ProgramResult | None:
        """Run a hook in this runner's own WORK_DIR (/work in a container); what it
        leaves there goes to the module's next task (hand_over)."""
        path = getattr(self.module, name)
        if not path and not self.module.hooks_in_image:
            return None
        problem = self._prepare_runtime()
        if not path and not problem:
            path = self._image_hooks().get(name)
        if not path:
            return None
        if problem:
            now = utcnow()
            return ProgramResult(Code.IMAGE, now, now, "", f"scalebox-hpc: {problem}\n")
        with self.state.hooks_lock:
            workdir = self._workdir()
            return self.runtime.run(path, "", "{}", env=dict(self.base_env, WORK_DIR=workdir), cwd=workdir,
                                    timeout=600, stdout=self.out, stderr=self.err)

    def _image_hooks(self) -> dict[str, str]:
        """Upstream's hooks in the module's image (/app/bin/check.sh, else
        /app/share/bin/check.sh, ...), looked for once."""
        if self.image_hooks is None:
            wanted = {hook: [f"{d}/{hook}.sh" for d in IMAGE_DIRS] for hook in HOOKS}
            try:
                found = self.runtime.executables([p for paths in wanted.values() for p in paths])
            except ImageError as exc:
                log.error("module %s: %s; no hooks from its image", self.module_name, exc)
                found = set()
            self.image_hooks = {hook: next(p for p in paths if p in found)
                                for hook, paths in wanted.items() if found.intersection(paths)}
            if self.image_hooks:
                log.info("module %s: hooks from its image: %s", self.module_name,
                         ", ".join(sorted(self.image_hooks.values())))
        return self.image_hooks

    def hand_over(self, workdir: str) -> None:
        """Move what the hooks left in their WORK_DIR into a task's (upstream's check
        scripts leave notes in /work for the task that follows)."""
        if not self.workdir_ready or not os.listdir(self.workdir):
            return
        # A hook running now (it holds the lock for its whole run) is not waited for: what
        # it leaves goes to a later task, and the lane starts this one at once.
        if not self.state.hooks_lock.acquire(blocking=False):
            return
        try:
            for name in os.listdir(self.workdir):
                os.replace(os.path.join(self.workdir, name), os.path.join(workdir, name))
        finally:
            self.state.hooks_lock.release()


    # -- one task -------------------------------------------------------------------------
    def _run_task(self, task: ClaimedTask) -> TaskResult:
        received = utcnow()
        record = {"task_id": task.id, "attempt": task.attempt, "worker_id": self.worker_id,
                  "t_ready": task.ready_at, "t_claimed": task.claimed_at, "t_received": received,
                  "slot": self.lane.index, "cpus": self.lane.cpus, "gpus": ",".join(self.lane.gpus) or None}
        result = TaskResult(task.id, task.attempt, 0, record, module_id=self.module_id)
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
        if self.state.hooks is not None:
            self.state.hooks.hand_over(workdir)
        env = dict(self.base_env, WORK_DIR=workdir, TASK_ID=str(task.id), ATTEMPT=str(task.attempt),
                   **self.lane.env())
        body, body_file = task.body, None
        if len(body) > MAX_ARG_BYTES // 4 and len(body.encode()) > MAX_ARG_BYTES:
            # Too big for argv: "$1" names a file holding the body byte for byte, and
            # SCALEBOX_BODY_FILE says so.
            body_file = Path(workdir, BODY_FILE)
            body_file.write_bytes(task.body.encode())
            body = env["SCALEBOX_BODY_FILE"] = str(body_file)
        timeout = self.module.task_max_seconds
        self.lane.current = (task.id, time.monotonic())
        try:
            prog = self.runtime.run(self.module.command, body, task.headers, env=env,
                                    cwd=workdir, timeout=float(timeout) if timeout else None,
                                    stdout=self.out, stderr=self.err)
        finally:
            self.lane.current = None
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
        if code == 0 and self.module.command == "@pass":
            result.messages += self._route([taskfiles.SinkMessage(module=None, body=task.body)], task.id)
            record["messages_out"] = len(result.messages)
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
        """How to reach a site's inbox, from the sites table as the pilot read it."""
        from .transfer import ForwardTarget
        return self.state.forward_targets.get(site) or ForwardTarget(site)

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

    def _removable(self, paths: list[str], workdir: str) -> tuple[list[str], list[str]]:
        """removed-files.txt's paths as this node sees them, and those refused: a program
        in a container names its own paths, so only its WORK_DIR (/work) and DATA_DIR
        (the same path inside) are known outside it."""
        inside = getattr(self.runtime, "container_work", None) if self.module.in_container else None
        removable, refused = [], []
        for path in paths:
            if not os.path.isabs(path):
                path = os.path.join(workdir, path)
            elif inside and (path == inside or path.startswith(inside + "/")):
                path = workdir + path[len(inside):]
            elif inside and not (path + "/").startswith(str(self.data_dir).rstrip("/") + "/"):
                refused.append(path)
                continue
            removable.append(os.path.normpath(path))
        return removable, refused

    def _collect(self, workdir: str, names: set[str], code: int, result: TaskResult) -> int:
        """Read what the program left in WORK_DIR. Messages, semaphores and the app
        result count only for a successful attempt; records are kept for every one."""
        if not names:
            return code
        record = result.record

        def read(name: str) -> str:
            with open(os.path.join(workdir, name), errors="replace") as fh:
                return fh.read()

        info = None
        if "task-exec.json" in names:
            info = taskfiles.parse_task_exec_json(read("task-exec.json"))
        elif "task-exec.yaml" in names:
            info = taskfiles.parse_task_exec_yaml(read("task-exec.yaml"))
        if info is not None:
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
        if "extra-attrs.yaml" in names:
            record["extras"] = taskfiles.parse_extra_attrs(read("extra-attrs.yaml"))
        if USER_FILE in names and record.get("user_text") is None:
            record["user_text"] = read(USER_FILE)[: self.out.limit]     # upstream's user-file.txt
        if code != 0:
            return code
        if REMOVED_FILES in names:
            result.removals, refused = self._removable(taskfiles.parse_file_list(read(REMOVED_FILES), REMOVED_FILES),
                                                       workdir)
            if refused:
                record["note"] = (f"{REMOVED_FILES}: not removed, outside WORK_DIR and DATA_DIR as this "
                                  f"container sees them: {', '.join(refused)[:500]}")
        for name in SINK_FILES:
            if name in names:
                messages = taskfiles.parse_sink_tasks(read(name), known_modules=self.modules, filename=name)
                result.messages += self._route(messages, result.task_id)
        if info is not None and info.message_body:
            result.messages += self._route(info.messages(self.modules), result.task_id)
        if "semaphores.txt" in names:
            result.semaphores = [(op.name, op.op, op.value)
                                 for op in taskfiles.parse_semaphores(read("semaphores.txt"))]
        if "app-result.txt" in names:
            result.app_result = read("app-result.txt").strip()
        if taskfiles.INTASK_DIR in names:
            found = taskfiles.read_intask_dir(os.path.join(workdir, taskfiles.INTASK_DIR),
                                              known_modules=self.modules)
            result.messages += self._route(found.messages, result.task_id)
            result.semaphores += [(op.name, op.op, op.value) for op in found.semaphores]
            if found.app_result is not None:
                result.app_result = found.app_result
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


class Worker:
    """The pilot (see the module's docstring)."""

    def __init__(self, dsn: str, worker_id: int, settings: WorkerSettings):
        self.worker_id = worker_id
        self.settings = settings
        self.database = Database(dsn, async_commit=True, name=f"scalebox-hpc worker {worker_id}")
        self.queue = Queue(self.database)
        self.host, self.ip = _host_ip()
        self.slurm_job_id = slurm_job_id(os.environ)
        self.draining = threading.Event()   # running tasks finish, the rest go back
        self.stopped = threading.Event()    # lost or cancelled: stop now, commit nothing more
        self.wake = threading.Event()       # a lane finished its batch
        self.finished = False               # lanes exit
        self.stop_reason = ""               # why it stopped, in words (the worker row's message)
        self.app_status: str | None = None  # the app's state, once it is no longer RUNNING
        self.lost = False                   # the controller declared this worker lost
        self.terminated = False
        self.crash: BaseException | None = None    # a lane thread's unexpected failure
        self.lock = threading.Lock()        # guards pending
        self.pending: list[TaskResult] = []
        self.pending_since = 0.0
        self.states: dict[int, ModuleState] = {}
        self.targets = None                 # site -> transfer.ForwardTarget, read with the first module
        self.refreshed = 0.0                # monotonic time the served modules were last read
        self.giveback: list[int] = []       # held tasks of apps that stopped running, to hand back
        self.beat_statuses: dict[int, str] | None = None   # app states the heartbeat saw, for the main thread
        self.lanes: list[Lane] = []
        self.resources = NodeResources(cpus=1)
        self.images = {}                    # container images of its modules, one instance each (runtimes)
        self.scratch = Path(settings.scratch_root) / f"worker-{worker_id}"
        self.bin_dir: Path | None = None    # where the in-task `scalebox` command is
        # How long to keep trying an unreachable database before giving up.
        self.patience = max(60.0, 10 * settings.lease_seconds)

    # -- setup ---------------------------------------------------------------------
    def _load_modules(self) -> list[ModuleState]:
        """Take up the modules of the apps on this pilot's site that it does not serve
        yet (each with its hooks' runner, listened to), and those of an app that runs
        again (resumed, or finished and given new tasks); the new ones, for their setup
        hooks."""
        added: list[ModuleState] = []
        # Kept aside until all are read: a retry after a database error starts over.
        for module_id, app_id, status in self.queue.served_modules(self.home_id):
            state = self.states.get(module_id)
            if state is not None:
                if status == AppStatus.RUNNING and not state.active and state.ended != "setup failed":
                    # Resumed, or finished and given new tasks.
                    state.active, state.ended = True, None
                continue
            if self.targets is None:
                from .transfer import ForwardTarget
                self.targets = {name: ForwardTarget.from_json(name, data)
                                for name, data in self.queue.site_configs().items()}
            if self.bin_dir is None:
                self.bin_dir = intask.install(self.scratch / intask.BIN_DIR)
            state = ModuleState(self.queue.module_context(module_id), self.settings, self.host, self.ip,
                                self.targets, self.bin_dir)
            state.hooks = TaskRunner(self, state, Lane(-1), self.scratch / f"hooks-m{module_id}")
            if status != AppStatus.RUNNING:
                state.active, state.ended = False, status
            self.database.listen(f"sbx_m{module_id}")
            added.append(state)
        for state in added:
            self.states[state.module_id] = state
        # Stages count within each app, from its main router.
        for app_id in {s.app_id for s in added}:
            names = {s.module_name: s for s in self.states.values() if s.app_id == app_id}
            main_router = next(iter(names.values())).main_router
            for name, stage in stages({n: s.module.sink_modules for n, s in names.items()}, main_router).items():
                names[name].stage = stage
        self.refreshed = time.monotonic()
        return added

    def _set_up(self, states: list[ModuleState]) -> str | None:
        """Run the setup hooks of newly served modules; why the pilot cannot go on (a
        failed setup of its home app), or None. A failed setup of another app's module
        leaves that module to other pilots."""
        for state in states:
            setup = self._hook(state, "setup")
            if setup is None or setup.code == 0:
                continue
            reason = (f"setup hook of module {state.module_name} failed with exit code "
                      f"{setup.code}: {setup.stderr.strip()[-300:]}")
            if state.app_id == self.home.app_id:
                return reason
            log.error("%s; app %s's module is left to other pilots", reason, state.app_id)
            state.active, state.ended = False, "setup failed"
        return None

    def _hook(self, state: ModuleState, name: str) -> ProgramResult | None:
        return state.hooks._hook(name)

    def _runner(self, lane: Lane, state: ModuleState) -> TaskRunner:
        runner = lane.runners.get(state.module_id)
        if runner is None:
            runner = lane.runners[state.module_id] = TaskRunner(self, state, lane,
                                                                self.scratch / f"slot-{lane.index}")
        return runner

    def _runners(self):
        for lane in self.lanes:
            yield from lane.runners.values()
        for state in self.states.values():
            if state.hooks is not None:
                yield state.hooks

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
        s = self.settings
        self.resources = res = node_resources(os.environ, cpus=s.cpus, gpus=s.gpus, mem_mb=s.mem_mb)
        try:
            home = self._db(lambda: self.queue.start_worker(
                self.worker_id, host=self.host, ip=self.ip, pid=os.getpid(), slurm_job_id=self.slurm_job_id,
                lease_seconds=s.lease_seconds, cpus=res.cpus, gpus=len(res.gpus), mem_mb=res.mem_mb),
                "register worker")
            if home is None:
                log.error("worker %s is not pending (already started or declared lost); exiting", self.worker_id)
                return 1
            self.home_id = home
            self._db(lambda: self.database.listen("sbx_sites"), "listen")
            first = self._db(self._load_modules, "read modules")
        except DatabaseUnavailable as exc:
            log.error("worker %s: %s", self.worker_id, exc)
            return 3
        # Everything allocated so far lives as long as the worker: keep the garbage
        # collector from walking it again and again in the task loop.
        gc.freeze()
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        log.info("worker %s on %s: %s; modules %s, scratch %s", self.worker_id, self.host, res.describe(),
                 self._describe(self.states.values()), self.scratch)
        if self.home.module.idle_seconds is not None:
            self.settings.idle_seconds = self.home.module.idle_seconds
        failed = self._set_up(first)
        if failed:
            self.stop_reason = failed
            log.error(self.stop_reason)
            return self._sign_off(WorkerStatus.FAILED, count_failure=True)
        node_gpus = bool(res.gpus)
        for i in range(res.cpus):
            lane = Lane(i)
            lane.node_gpus = node_gpus
            lane.thread = threading.Thread(target=self._lane_loop, args=(lane,), name=f"lane-{i}", daemon=True)
            lane.thread.start()
            self.lanes.append(lane)
        try:
            self._loop()
        except DatabaseUnavailable as exc:
            # Its leases have run out meanwhile: the controller hands its tasks to others.
            log.error("worker %s: %s; exiting", self.worker_id, exc)
            self._stop(str(exc))
            self._end_lanes()
            return 3
        except Exception as exc:
            # A bug or an unexpected failure: its tasks go back through lease recovery
            # (counted attempts), and the controller counts the failed worker.
            log.exception("worker %s crashed", self.worker_id)
            self.stop_reason = f"crashed: {type(exc).__name__}: {exc}"
            self._stop(self.stop_reason)
            self._end_lanes()
            return self._sign_off(WorkerStatus.FAILED, count_failure=True)
        self._end_lanes()
        if self.lost:
            return self._sign_off(WorkerStatus.LOST)
        return self._sign_off(WorkerStatus.EXITED)

    @property
    def home(self) -> ModuleState:
        return self.states[self.home_id]

    def _end_lanes(self) -> None:
        """Let the running tasks finish (their lanes take nothing more) and the lanes exit."""
        self.finished = True
        for lane in self.lanes:
            with lane.ready:
                lane.ready.notify()
        for lane in self.lanes:
            lane.thread.join()

    def _sign_off(self, status: str, count_failure: bool = False) -> int:
        try:
            if status == WorkerStatus.EXITED:
                self._flush()
                # Whatever is still held was never started (or was stopped by a cancel): free of cost.
                self._db(lambda: self.queue.return_tasks(self.worker_id, None), "return tasks", finishing=True)
            for state in self.states.values():
                teardown = self._hook(state, "teardown")
                if teardown is not None and teardown.code != 0:
                    log.warning("teardown hook of module %s exited with %s", state.module_name, teardown.code)
            self._db(lambda: self.queue.stop_worker(self.worker_id, status, self.stop_reason or None,
                                                    count_failure=count_failure), "stop worker", finishing=True)
        except DatabaseUnavailable as exc:
            log.error("worker %s: %s", self.worker_id, exc)
        finally:
            self.stopped.set()
            runners = list(self._runners())
            for runner in runners:
                runner.runtime.close()
            for image in self.images.values():
                image.close()
            if not any(r.failed_workdirs for r in runners):
                shutil.rmtree(self.scratch, ignore_errors=True)
            for state in self.states.values():
                if state.ended in AppStatus.TERMINAL:
                    # The app is over: its node-local data is of no more use to anyone.
                    shutil.rmtree(state.data_dir, ignore_errors=True)
            log.info("worker %s stopped: %s (%s)", self.worker_id, status, self.stop_reason or "done")
        return 0 if status == WorkerStatus.EXITED else 1

    def _on_signal(self, signum, _frame) -> None:
        log.info("worker %s: %s received, draining", self.worker_id, signal.Signals(signum).name)
        self.stop_reason = f"drained on {signal.Signals(signum).name}"
        if signum != signal.SIGUSR1:
            self.terminated = True      # the batch system stops the job: its programs too
        for lane in self.lanes:
            lane.shared.set(STOP | (TERMINATED if self.terminated else 0))
        self.draining.set()
        self.wake.set()

    def _loop(self) -> None:
        s = self.settings
        idle_since = time.monotonic()
        told_idle = False
        if not any(st.active for st in self.states.values()):
            # Its app stopped before the pilot started (and no other app runs on its site).
            self.app_status = self.home.ended
            self.stop_reason = f"app is {self.home.ended}"
            return
        while not (self.draining.is_set() or self.stopped.is_set()):
            if self.crash is not None:
                raise self.crash
            now = time.monotonic()
            if self._app_changes():
                return
            if now - self.refreshed >= REFRESH_SECONDS:
                self._take_up_new_apps()
            if self.giveback:
                with self.lock:
                    held, self.giveback = self.giveback, []
                self._db(lambda: self.queue.return_tasks(self.worker_id, held), "return tasks")
            free = [lane for lane in self.lanes if not lane.busy]
            if free and self.pending:
                # Finished tasks hold their module's slots until committed: commit first.
                self._flush()
            claimed, blocked = self._claim(free, now) if free else (0, None)
            busy = any(lane.busy for lane in self.lanes)
            if busy or claimed:
                idle_since = now
                told_idle = False
            self._flush_due(busy)
            if not busy and not told_idle and not self.pending:
                # Out of work, all committed: its apps may be over; whoever follows them looks now.
                for app_id in sorted({st.app_id for st in self.states.values() if st.active}):
                    self._db(lambda a=app_id: self.queue.tell_idle(a), "tell idle")
                told_idle = True
            if not busy:
                if blocked:
                    self.stop_reason = blocked
                    return
                idle = now - idle_since
                if idle >= s.idle_seconds:
                    self.stop_reason = f"idle for {s.idle_seconds:g} s"
                    return
                if self._notified(self._wait(min(0.5, s.idle_seconds - idle))):
                    return
            elif len(free) > claimed and not blocked:
                # Lanes free, nothing ready for them: new tasks or a lane's end wake us.
                if self._notified(self._wait(0.01)):
                    return
            else:
                self.wake.wait(max(0.001, s.flush_seconds / 2))
                self.wake.clear()

    def _notified(self, notes: list[tuple[str, str]]) -> bool:
        """Take in notifications: new tasks make modules worth a claim again; a new app
        on this site is taken up; an app's end or pause takes its modules out (true
        when no app is left to serve)."""
        if not notes:
            return False
        for channel, payload in notes:
            if channel == "sbx_sites":
                if payload == self.home.site:
                    self._take_up_new_apps()
                continue
            state = self.states.get(int(channel.removeprefix("sbx_m")))
            if state is None:
                continue
            if payload in AppStatus.TERMINAL or payload == AppStatus.PAUSED:
                if self._end_app(state.app_id, payload):
                    return True
            elif not state.active:
                self._take_up_new_apps()      # resumed, or given new tasks after it finished
        for state in self.states.values():
            state.exhausted_at = None
        return False

    def _take_up_new_apps(self) -> None:
        added = self._db(self._load_modules, "read modules")
        if added:
            log.info("worker %s takes up %s", self.worker_id, self._describe(added))
            self._set_up(added)

    @staticmethod
    def _describe(states) -> str:
        apps: dict[int, list[str]] = {}
        for state in states:
            apps.setdefault(state.app_id, []).append(state.module_name)
        return "; ".join(f"{', '.join(names)} (app {app_id})" for app_id, names in sorted(apps.items()))

    def _app_changes(self) -> bool:
        """Apply the app states the heartbeat read; true when no app is left to serve."""
        statuses, self.beat_statuses = self.beat_statuses, None
        for app_id, status in sorted((statuses or {}).items()):
            if status != AppStatus.RUNNING and self._end_app(app_id, status):
                return True
        return False

    def _end_app(self, app_id: int, status: str) -> bool:
        """An app left RUNNING: no more claims for its modules; those it has running
        finish (CANCELLED: are stopped and count for nothing), those held and not
        started go back. True when this pilot has no running app left: it leaves."""
        states = [st for st in self.states.values() if st.app_id == app_id]
        if any(st.active for st in states):
            log.info("worker %s: app %s is %s: no more of its tasks here", self.worker_id, app_id, status)
        for state in states:
            state.active, state.ended = False, status
        if status == AppStatus.CANCELLED:
            self._kill_app(app_id)
        if any(st.active for st in self.states.values()):
            return False
        self.app_status = status
        self.stop_reason = f"app is {status}"
        return True

    def _wait(self, timeout: float) -> list[str]:
        try:
            return self.database.wait_notify(timeout)
        except Exception as exc:  # noqa: BLE001 - a broken connection is retried by the next claim
            log.warning("waiting for notifications failed: %s", exc)
            self.database.reset()
            time.sleep(min(timeout, 1.0))
            return []

    def _claimable(self, state: ModuleState, now: float) -> bool:
        """May this module's tasks be claimed now: something may be ready, its check
        hook agrees and its scratch and DATA_DIR have room."""
        if not state.active or (state.exhausted_at is not None and now - state.exhausted_at < 1.0):
            return False
        if (state.module.check or state.module.hooks_in_image) and now >= state.check_until:
            check = self._hook(state, "check")
            state.check_ok = check is None or check.code == 0
            state.check_until = time.monotonic() + (1.0 if state.check_ok else 5.0)
        if not state.check_ok:
            return False
        return state.hooks._space_problem() is None

    def _claim(self, free: list[Lane], now: float) -> tuple[int, str | None]:
        """One claim for the free lanes: (how many lanes got tasks, why nothing more can
        ever be claimed here, or None)."""
        res = self.resources
        busy = [lane for lane in self.lanes if lane.busy]
        used_gpus = {g for lane in busy for g in lane.gpus}
        budget = Budget(res.cpus - sum(lane.cpus for lane in busy), len(res.gpus) - len(used_gpus),
                        None if res.mem_mb is None else res.mem_mb - sum(lane.mem_mb for lane in busy))
        candidates, batches, walltime = [], {}, 0
        active = [state for state in self.states.values() if state.active]
        for state in active:
            if not self._claimable(state, now):
                continue
            batch = self._batch_size(state)
            if batch == 0:
                walltime += 1
                continue
            batches[state.module_id] = batch
            m = state.module
            running = sum(1 for lane in busy if lane.work and lane.work[0] is state)
            candidates.append(Candidate(state.module_id, state.stage, ready=len(free),
                                        room=max(0, m.slots - running) if m.slots else None,
                                        cpus=max(1, m.task_cpus), gpus=m.task_gpus, mem_mb=m.task_mem or 0,
                                        last_served=state.last_served))
        if not candidates:
            blocked = "walltime: no time left for another task" if active and walltime == len(active) else None
            return 0, blocked
        picks = plan(candidates, budget)
        free_gpus = [g for g in res.gpus if g not in used_gpus]
        lanes = iter(free)
        entries, asked = [], {}
        order = sorted(picks, key=lambda mid: (-self.states[mid].stage, self.states[mid].last_served, mid))
        for module_id in order:
            m = self.states[module_id].module
            for _ in range(picks[module_id]):
                lane = next(lanes, None)
                if lane is None:
                    break
                lane.cpus, lane.mem_mb = max(1, m.task_cpus), m.task_mem or 0
                lane.gpus, free_gpus = tuple(free_gpus[:m.task_gpus]), free_gpus[m.task_gpus:]
                entries.append((module_id, lane.index, batches[module_id]))
                asked[lane.index] = (module_id, batches[module_id])
        if not entries:
            return 0, None
        rows = self._db(lambda: self.queue.claim_pilot(worker_id=self.worker_id, host=self.host, entries=entries),
                        "claim tasks")
        by_lane: dict[int, list[ClaimedTask]] = {}
        for task in rows:
            by_lane.setdefault(task.slot, []).append(task)
        now = time.monotonic()
        for index, (module_id, batch) in asked.items():
            lane, tasks = self.lanes[index], sorted(by_lane.get(index, []), key=lambda t: t.id)
            state = self.states[module_id]
            if len(tasks) < batch:
                state.exhausted_at = now
            if not tasks:
                lane.cpus, lane.gpus, lane.mem_mb = 0, (), 0
                continue
            state.last_served = now
            with lane.ready:
                lane.work = (state, tasks)
                lane.busy = True
                lane.ready.notify()
        return len(by_lane), None

    def _batch_size(self, state: ModuleState) -> int:
        """How many tasks one lane claims in a row: about one flush interval of work
        (long tasks one by one, short ones in batches), and only what fits before the
        job's walltime ends: 0 when not even one task fits."""
        size = max(1, min(state.max_batch, int(self.settings.flush_seconds / max(state.avg_seconds, 1e-4))))
        if self.settings.job_end is None:
            return size
        left = self.settings.job_end - self.settings.drain_margin - time.time()
        # A task is claimed only if its task_max_seconds fits; without one, if 1.5 times
        # the longest task seen so far fits (nothing seen yet: one is tried).
        limit = state.module.task_max_seconds
        expect = float(limit) if limit else 1.5 * state.longest_seconds
        if left <= 0 or left < expect:
            return 0
        if not state.longest_seconds:
            return 1
        return max(1, min(size, int(left / max(state.avg_seconds, 1e-4))))

    # -- lanes ------------------------------------------------------------------------------
    def _lane_loop(self, lane: Lane) -> None:
        try:
            while True:
                with lane.ready:
                    while lane.work is None and not self.finished:
                        lane.ready.wait()
                    if lane.work is None:
                        return
                    state, tasks = lane.work
                try:
                    self._run_batch(lane, state, tasks)
                except BaseException as exc:   # noqa: BLE001 - the main thread fails the pilot
                    log.exception("lane %s crashed", lane.index)
                    self.crash = exc
                finally:
                    with lane.ready:
                        lane.work = None
                        lane.busy = False
                    self.wake.set()
        finally:
            for process in lane.processes.values():
                process.close()

    def _run_batch(self, lane: Lane, state: ModuleState, tasks: list[ClaimedTask]) -> None:
        """Run a lane's tasks one after the other; those not started when the pilot
        drains stay held and go back at sign-off, free of cost."""
        runner = self._runner(lane, state)
        if self._in_process(state, runner, tasks):
            return self._run_batch_in_process(lane, state, runner, tasks)
        for i, task in enumerate(tasks):
            if self.draining.is_set() or self.stopped.is_set():
                return
            if not state.active:
                self._give_back(tasks[i:])      # its app stopped running (the pilot serves on)
                return
            t0 = time.monotonic()
            result = runner._run_task(task)
            if not self._take(state, tasks, i, result, time.monotonic() - t0):
                return

    def _in_process(self, state: ModuleState, runner: TaskRunner, tasks: list[ClaimedTask]) -> bool:
        """Whether this batch runs in a process of the lane's own: short host programs
        (a batch of several), several lanes, no hooks to hand files over, nothing to
        forward to another site (laneproc.py)."""
        module = state.module
        return (self.settings.lane_processes and len(self.lanes) > 1 and len(tasks) >= PROCESS_BATCH
                and type(runner.runtime) is HostRuntime and not module.hooks_in_image
                and not any(getattr(module, hook) for hook in HOOKS)
                and all(site == state.site for site in state.module_sites.values()))

    def _run_batch_in_process(self, lane: Lane, state: ModuleState, runner: TaskRunner,
                              tasks: list[ClaimedTask]) -> None:
        process = lane.processes.get(state.module_id)
        if process is None:
            process = lane.processes[state.module_id] = LaneProcess(lane, runner)
        done, cut = [0], [False]

        def on_result(result: TaskResult, took: float) -> bool:
            done[0] += 1
            cut[0] = not self._take(state, tasks, done[0] - 1, result, took)
            return not cut[0]

        process.run(tasks, on_result, lambda: self.draining.is_set() or self.stopped.is_set() or not state.active)
        if done[0] < len(tasks) and not cut[0] and not state.active \
                and not (self.draining.is_set() or self.stopped.is_set()):
            self._give_back(tasks[done[0]:])    # its app stopped running (the pilot serves on)

    def _give_back(self, tasks: list[ClaimedTask]) -> None:
        with self.lock:
            self.giveback.extend(t.id for t in tasks)

    def _take(self, state: ModuleState, tasks: list[ClaimedTask], i: int, result: TaskResult,
              took: float) -> bool:
        """Count the result of tasks[i] (which took `took` s); False: the lane stops here."""
        state.avg_seconds = 0.8 * state.avg_seconds + 0.2 * took
        state.longest_seconds = max(state.longest_seconds, took)
        if self.stopped.is_set():
            return False    # lost while it ran: the result must not count
        if state.ended == AppStatus.CANCELLED:
            self._give_back(tasks[i:])      # cancelled while it ran: nothing counts, all go back
            return False
        with self.lock:
            if not self.pending:
                self.pending_since = time.monotonic()
            self.pending.append(result)
        return True

    def _flush_due(self, busy: bool) -> None:
        """Commit what finished once the oldest result waited flush_seconds, or at once
        when nothing runs."""
        if self.pending and (not busy or time.monotonic() - self.pending_since >= self.settings.flush_seconds):
            self._flush()

    def _flush(self) -> None:
        with self.lock:
            results, self.pending = self.pending, []
        if not results:
            return
        rules = {mid: st.module.retry_rules for mid, st in self.states.items()}
        by_app: dict[int, list[TaskResult]] = {}
        for result in results:
            by_app.setdefault(self.states[result.module_id].app_id, []).append(result)
        for app_id, group in by_app.items():
            self._db(lambda a=app_id, g=group: self.queue.complete(worker_id=self.worker_id, app_id=a, results=g,
                                                                   retry_rules=rules),
                     "commit task results", finishing=True)
        # What the programs asked to delete goes only once their attempts are on record:
        # an attempt lost before that runs again with its inputs still there.
        for result in results:
            for path in result.removals if result.committed else ():
                try:
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("task %s: removed-files.txt: cannot remove %s: %s", result.task_id, path, exc)

    # -- heartbeat ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        beat = Queue(Database(self.database.dsn, async_commit=True, name=self.database.name))
        interval = self.settings.lease_seconds / 3
        next_beat = 0.0
        last_ok = time.monotonic()
        marked: set[int] = set()
        while not self.stopped.is_set():
            now = time.monotonic()
            if now - last_ok > self.patience:
                self._stop(f"database unreachable for {self.patience:.0f} s")
                break
            try:
                # Tasks that run for a while show as RUNNING; short ones go from QUEUED to done
                # without the extra round trip on the hot path.
                long = [c[0] for c in (lane.current for lane in self.lanes)
                        if c and c[0] not in marked and now - c[1] > 0.2]
                if long:
                    beat.mark_running(self.worker_id, long)
                    marked = (marked | set(long)) if len(marked) < 100000 else set(long)
                if now >= next_beat:
                    served = {st.app_id for st in list(self.states.values()) if st.active}
                    statuses = beat.heartbeat(self.worker_id, self.settings.lease_seconds, sorted(served))
                    next_beat, last_ok = now + interval, now
                    if statuses is None:
                        self.lost = True
                        self._stop("lease lost: the controller declared this worker lost")
                        continue
                    if any(status != AppStatus.RUNNING for status in statuses.values()):
                        # The main thread takes the apps that stopped running out.
                        self.beat_statuses = statuses
                        self.wake.set()
                        for app_id, status in statuses.items():
                            if status == AppStatus.CANCELLED:
                                self._kill_app(app_id)
            except Exception as exc:  # noqa: BLE001 - keep beating through database outages
                log.warning("heartbeat failed: %s", first_line(exc))
                beat.database.reset()
                next_beat = now + 1.0
            time.sleep(0.1)
        beat.database.close()

    def _kill_app(self, app_id: int) -> None:
        """Stop the running programs of a cancelled app (from the heartbeat thread)."""
        for lane in self.lanes:
            work = lane.work
            if work is not None and work[0].app_id == app_id:
                work[0].ended = AppStatus.CANCELLED
                self._kill_lane(lane)

    def _stop(self, message: str) -> None:
        log.warning("worker %s: %s; stopping the running programs", self.worker_id, message)
        self.stop_reason = message
        self.stopped.set()
        self.wake.set()
        for lane in self.lanes:
            self._kill_lane(lane)

    @staticmethod
    def _kill_lane(lane: Lane) -> None:
        for process in list(lane.processes.values()):
            process.kill_program()
        for runner in list(lane.runners.values()):
            runner.runtime.kill()
