"""Module programs inside Apptainer/Singularity containers.

The site chooses the runtime binary (`apptainer` or `singularity`); the module chooses
the image (a .sif file, a sandbox directory, or a docker:// / oras:// / library:// URI
pulled once per site into the image cache) and the mode:

- ``exec``: one `apptainer exec` per task;
- ``instance``: one `apptainer instance start` per pilot and image (ContainerImage),
  shared by all its lanes and stopped when the pilot leaves. Each lane runs one small
  agent in it (a POSIX shell loop, started once with `exec instance://NAME`) that
  starts that lane's programs: a task then costs a fork and an exec, not a container
  entry, and the lanes' tasks run side by side in the one instance. The task's argv and environment reach the program
  through a NUL-separated file read by `xargs -0` (never through a shell string); an
  image without `xargs` and `env`, or a call too large for one `xargs` command line,
  falls back to one `exec instance://NAME` per task.

Commands are built with spython's client (its command layer, pointed at the site's
binary); they are started like host programs (posix_spawn, pidfd timeouts, captured
output), and pulls and instance starts run with time limits, so a registry that does
not answer fails the task rather than hanging the worker.

Inside the container: WORK_DIR is the working directory: /work in exec mode (bound per
task), /work/slot-N/work-mM in an instance (the pilot's scratch is bound at /work);
code_path is at /app/bin (read-only), DATA_DIR at its own path, and the module's
volumes. The environment is clean (--cleanenv) plus exactly the task's variables
(with its own GPUs); a site's `container_gpu` adds --nv or --rocm on a pilot with GPUs.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time

from .. import intask
from ..errors import ScaleboxError, last_line
from ..states import CONTAINER_RUNTIMES, Code
from .base import ProgramResult, utcnow
from .host import HostRuntime

log = logging.getLogger(__name__)

REMOTE_IMAGE = re.compile(r"^(docker|oras|library|shub|https?)://")
CONTAINER_WORK = "/work"
CONTAINER_CODE = "/app/bin"
# The agent in an instance, one per lane, started in the lane's WORK_DIR: for each line
# on stdin, run the call in .sbx-call (NUL-separated: VAR=value..., program, body,
# headers) with a clean environment (the container's PATH and HOME kept), output to
# files in WORK_DIR, and answer the exit status.
# The script is constant: no task data is ever part of a shell string.
AGENT_CALL, AGENT_OUT, AGENT_ERR = ".sbx-call", ".sbx-stdout", ".sbx-stderr"
AGENT_FILES = (AGENT_CALL, AGENT_OUT, AGENT_ERR)
AGENT_SCRIPT = (
    'command -v xargs >/dev/null && command -v env >/dev/null || { echo "no xargs/env"; exit 3; }; '
    'echo ready; '
    'while IFS= read -r _; do '
    'xargs -0 -x sh -c \'env -i PATH="$PATH" HOME="$HOME" "$@" 3>&-; echo "$?" >&3\' sh '
    '3>&1 <' + AGENT_CALL + ' >' + AGENT_OUT + ' 2>' + AGENT_ERR + ' || echo 126; '
    'done')
# xargs must never split a call in two: larger calls take the per-task exec path.
AGENT_MAX_CALL = 96 * 1024
# Variables the runtime binary itself needs from the worker's environment.
PASS_THROUGH = ("PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "LANG", "XDG_RUNTIME_DIR")


class ImageError(ScaleboxError):
    """The module's image cannot be used on this node."""


def find_runtime(wanted: str | None) -> str | None:
    """Path of the container binary: the site's choice, else whichever is on PATH."""
    if wanted == "host":
        return None
    for name in ([wanted] if wanted else CONTAINER_RUNTIMES):
        path = shutil.which(name)
        if path:
            return path
    return None


def spython_client(binary: str):
    """spython's client, building commands for this binary (spython itself assumes
    'singularity' is on PATH)."""
    from spython.main import get_client

    client = get_client(quiet=True)

    def init_command(action, flags=None):
        return [binary, *(flags or []), *(action if isinstance(action, list) else [action])]

    client._init_command = init_command
    return client


def cache_name(uri: str) -> str:
    """File name of a pulled image in the cache: readable, one per URI."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[1]).strip("_") + ".sif"


def pull_image(binary: str, uri: str, cache_dir: str, *, timeout: float) -> str:
    """The local .sif for a registry image, pulled once per cache (site): concurrent
    workers wait for the one pulling. Raises ImageError with the runtime's reason."""
    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, cache_name(uri))
    if os.path.exists(final):
        return final
    deadline = time.monotonic() + timeout
    with open(final + ".lock", "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImageError(f"timed out after {timeout:g} s waiting for another worker pulling {uri}")
                time.sleep(1.0)
        if os.path.exists(final):
            return final
        partial = f"{final}.part-{os.getpid()}"
        argv = spython_client(binary)._init_command("pull") + ["--force", partial, uri]
        log.info("pulling %s into %s", uri, cache_dir)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _remove(partial)
            raise ImageError(f"pulling {uri} took longer than {timeout:g} s") from None
        if proc.returncode != 0 or not os.path.exists(partial):
            _remove(partial)
            raise ImageError(f"cannot pull {uri}: {last_line(proc.stderr or proc.stdout, prefer='FATAL')}")
        os.replace(partial, final)
    return final


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class ContainerImage:
    """One image on this node as a pilot's lanes share it: resolved (pulled) once, and in
    instance mode one running instance that every lane's tasks run in at once.

    The instance binds the pilot's scratch directory (``root``) at /work, so each lane's
    WORK_DIR is a directory of its own under /work; the app's DATA_DIR, the module's
    code_path and volumes are bound as in exec mode. Modules of the pilot that name the
    same image with the same mounts share the instance."""

    def __init__(self, *, binary: str | None, image: str, root: str, data_dir: str, code_path: str | None,
                 volumes: list[str], cache_dir: str, name: str, gpu_flags: tuple[str, ...] = (),
                 pull_timeout: float = 900.0, bin_dir: str | None = None):
        self.binary = binary
        self.wanted_image = image
        self.root = root
        self.data_dir = data_dir
        self.code_path = code_path
        self.volumes = volumes
        self.cache_dir = cache_dir
        self.name = name                      # instance name, unique on the node
        self.gpu_flags = gpu_flags            # --nv / --rocm when the pilot has GPUs and the site says so
        self.pull_timeout = pull_timeout
        self.bin_dir = bin_dir                # the in-task `scalebox` command, bound at intask.CONTAINER_BIN
        self.image: str | None = None
        self.instance_up = False
        self.lock = threading.Lock()          # lanes prepare at the same time: one pull, one start
        self._client = None
        self.env_prefix = "SINGULARITYENV_" if binary and os.path.basename(binary) == "singularity" \
            else "APPTAINERENV_"

    @property
    def client(self):
        if self._client is None:
            self._client = spython_client(self.binary)
        return self._client

    def resolve(self) -> str:
        """The local image (pulled once); raise ImageError if there is none."""
        with self.lock:
            if self.binary is None:
                raise ImageError(f"image {self.wanted_image}: no container runtime on this node "
                                 f"(apptainer or singularity on PATH, or the site's runtime:)")
            if self.image is None:
                if REMOTE_IMAGE.match(self.wanted_image):
                    self.image = pull_image(self.binary, self.wanted_image, self.cache_dir,
                                            timeout=self.pull_timeout)
                elif os.path.exists(self.wanted_image):
                    self.image = self.wanted_image
                else:
                    raise ImageError(f"image not found on {os.uname().nodename}: {self.wanted_image}")
            return self.image

    def mounts(self) -> list[str]:
        """Binds every task of this image gets, WORK_DIR aside."""
        binds = [f"{self.data_dir}:{self.data_dir}"]
        if self.bin_dir:
            binds.append(f"{self.bin_dir}:{intask.CONTAINER_BIN}:ro")
        if self.code_path:
            binds.append(f"{self.code_path}:{CONTAINER_CODE}:ro")
        return binds + list(self.volumes)

    def inside(self, workdir: str) -> str:
        """A lane's WORK_DIR as tasks in the instance see it."""
        return CONTAINER_WORK + "/" + os.path.relpath(workdir, self.root)

    def start_instance(self) -> None:
        self.resolve()
        with self.lock:
            if self.instance_up:
                return
            os.makedirs(self.root, exist_ok=True)
            argv = self.client._init_command(["instance", "start"]) + \
                ["--cleanenv", "--no-mount", "cwd", *self.gpu_flags,
                 *bind_flags([f"{self.root}:{CONTAINER_WORK}", *self.mounts()]), self.image, self.name]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                      timeout=self.pull_timeout, env=self.runtime_env({}), cwd=self.root)
            except subprocess.TimeoutExpired:
                raise ImageError(f"instance start of {self.image} took longer than {self.pull_timeout:g} s") from None
            if proc.returncode != 0:
                raise ImageError(f"cannot start an instance of {self.image}: "
                                 f"{last_line(proc.stderr, prefer='FATAL')}")
            self.instance_up = True
        log.info("instance %s of %s started%s", self.name, self.image,
                 f" with {' '.join(self.gpu_flags)}" if self.gpu_flags else "")

    def runtime_env(self, task_env: dict[str, str]) -> dict[str, str]:
        """The runtime binary's environment: what it needs of ours, and the task's
        variables under the prefix that hands them into the container."""
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.update({k: v for k, v in os.environ.items() if k.startswith(("APPTAINER_", "SINGULARITY_"))})
        for key, value in task_env.items():
            env[self.env_prefix + key] = value
        if self.bin_dir:
            # The in-task `scalebox` command first on the container's PATH.
            env[self.env_prefix + "PREPEND_PATH"] = intask.CONTAINER_BIN
        return env

    def close(self) -> None:
        with self.lock:
            if not self.instance_up:
                return
            argv = self.client._init_command(["instance", "stop"]) + [self.name]
            try:
                subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                               env=self.runtime_env({}))
            except subprocess.TimeoutExpired:
                log.warning("instance %s did not stop within 60 s", self.name)
            self.instance_up = False
        log.info("instance %s stopped", self.name)


def bind_flags(binds: list[str]) -> list[str]:
    flags = []
    for bind in binds:
        flags += ["-B", bind]
    return flags


class ContainerRuntime(HostRuntime):
    """One lane's programs of one module in its image: `BINARY exec` per task, or in
    instance mode through the lane's own agent in the pilot's shared instance."""

    def __init__(self, shared: ContainerImage, *, mode: str, workdir: str, variables: set[str]):
        super().__init__()
        self.shared = shared
        self.variables = variables            # names of the task variables the container gets
        self.binary = shared.binary
        self.mode = mode
        self.code_path = shared.code_path
        self.workdir = workdir
        self.fixed_workdir = mode == "instance"   # the agent lives in it
        # Where WORK_DIR is in the container: bound at /work per task, or under the
        # instance's /work.
        self.container_work = shared.inside(workdir) if mode == "instance" else CONTAINER_WORK
        self.agent: subprocess.Popen | None = None
        self.agent_broken = False             # the image cannot run the agent: exec per task

    @property
    def name(self) -> str:
        return self.shared.name

    @property
    def client(self):
        return self.shared.client

    def prepare(self) -> None:
        """Resolve (pull) the image and start the instance; raise ImageError if it cannot be."""
        if self.mode == "instance":
            self.shared.start_instance()
        else:
            self.shared.resolve()

    def close(self) -> None:
        """Stop this lane's agent; the pilot stops the shared instance when it leaves."""
        self._stop_agent()

    def _runtime_env(self, task_env: dict[str, str]) -> dict[str, str]:
        return self.shared.runtime_env(task_env)

    def executables(self, paths: list[str]) -> set[str]:
        """Which of these paths are executable files in the image (one exec; the paths
        are arguments of a fixed script, never part of it)."""
        self.prepare()
        target = [f"instance://{self.name}"] if self.mode == "instance" else \
            ["--cleanenv", "--no-mount", "cwd", self.shared.image]
        argv = self.client._init_command("exec") + target + [
            "/bin/sh", "-c", 'for p do [ -f "$p" ] && [ -x "$p" ] && echo "$p"; done; exit 0', "sh", *paths]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
                                  env=self._runtime_env({}), cwd=self.shared.root)
        except subprocess.TimeoutExpired:
            raise ImageError(f"looking for {', '.join(paths)} in {self.shared.image} took over 120 s") from None
        if proc.returncode != 0:
            raise ImageError(f"cannot look into {self.shared.image}: {last_line(proc.stderr, prefer='FATAL')}")
        return set(proc.stdout.split("\n")) & set(paths)

    # -- per task -------------------------------------------------------------------------
    def inside(self, program: str) -> str:
        """The program's path as the container sees it."""
        if self.code_path and (program == self.code_path or program.startswith(self.code_path.rstrip("/") + "/")):
            return CONTAINER_CODE + program[len(self.code_path.rstrip("/")):]
        return program

    def spawn(self, program, body, headers_json, env, cwd):
        # A clean environment; a body too long for argv is a file in WORK_DIR.
        task_env = self._task_env(env)
        if body == env.get("SCALEBOX_BODY_FILE"):
            body = self._seen(body)
        argv = self.client._init_command("exec")
        if self.mode == "instance":
            argv += ["--pwd", self.container_work, f"instance://{self.name}"]
        else:
            # --no-mount cwd: the worker's own directory has no business inside (and
            # a cwd under /work would leave an empty mount point in WORK_DIR).
            argv += ["--cleanenv", "--no-mount", "cwd", *self.shared.gpu_flags, "--pwd", CONTAINER_WORK,
                     *bind_flags([f"{self.workdir}:{CONTAINER_WORK}", *self.shared.mounts()]), self.shared.image]
        return self.binary, argv + [self.inside(program), body, headers_json], self._runtime_env(task_env)

    # -- the agent in an instance ---------------------------------------------------------
    def _seen(self, value: str) -> str:
        """A path in WORK_DIR as the container sees it (under /work)."""
        host_work = self.workdir.rstrip("/") + "/"
        return self.container_work + "/" + value[len(host_work):] if value.startswith(host_work) else value

    def _task_env(self, env: dict[str, str]) -> dict[str, str]:
        """The task's own variables only (a clean environment), paths as the container sees them."""
        task_env = {k: self._seen(v) for k, v in env.items() if k in self.variables}
        task_env["WORK_DIR"] = self.container_work
        return task_env

    def _start_agent(self) -> bool:
        os.makedirs(self.workdir, exist_ok=True)
        argv = self.client._init_command("exec") + ["--pwd", self.container_work, f"instance://{self.name}",
                                                    "/bin/sh", "-c", AGENT_SCRIPT]
        try:
            self.agent = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, env=self._runtime_env({}),
                                          cwd=self.workdir, start_new_session=True)
        except OSError as exc:
            log.warning("instance %s: cannot start the task agent (%s): one exec per task", self.name, exc)
            self.agent_broken = True
            return False
        answer = self._read_line(60.0)
        if answer != "ready":
            log.warning("instance %s: no task agent in this image (%s): one exec per task", self.name,
                        answer or "no answer")
            self._stop_agent()
            self.agent_broken = True
            return False
        return True

    def _read_line(self, timeout: float | None) -> str | None:
        """One line from the agent, or None when it ended or the time ran out."""
        fd = self.agent.stdout.fileno()
        if timeout is not None and not select.select([fd], [], [], max(0.0, timeout))[0]:
            return None
        line = self.agent.stdout.readline()
        return line.decode(errors="replace").strip() if line else None

    def _stop_agent(self) -> None:
        agent, self.agent = self.agent, None
        if agent is None:
            return
        try:
            os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.wait()
        for fh in (agent.stdin, agent.stdout):
            fh.close()

    def run(self, program, body, headers_json, *, env, cwd, timeout, stdout, stderr):
        def exec_per_task():
            return super(ContainerRuntime, self).run(program, body, headers_json, env=env, cwd=cwd,
                                                     timeout=timeout, stdout=stdout, stderr=stderr)

        if self.mode != "instance" or self.agent_broken:
            return exec_per_task()
        inside = self.inside(program)
        seen_body = self._seen(body) if body == env.get("SCALEBOX_BODY_FILE") else body
        words = [f"{k}={v}" for k, v in self._task_env(env).items()] + [inside, seen_body, headers_json]
        call = b"\0".join(w.encode() for w in words) + b"\0"
        if "=" in inside or any("\0" in w for w in words) or len(call) > AGENT_MAX_CALL:
            # env would read the program as a variable / a NUL cannot be passed / xargs would split it.
            return exec_per_task()
        if (self.agent is None or self.agent.poll() is not None) and not self._start_agent():
            return exec_per_task()
        stdout.reset()
        stderr.reset()
        self._killed = False
        with open(os.path.join(self.workdir, AGENT_CALL), "wb") as fh:
            fh.write(call)
        started = utcnow()
        self._pid = self.agent.pid
        try:
            self.agent.stdin.write(b"\n")
            self.agent.stdin.flush()
        except OSError:                        # the agent just ended: this task goes the long way
            self._pid = None
            self._stop_agent()
            os.unlink(os.path.join(self.workdir, AGENT_CALL))
            return exec_per_task()
        answer = self._read_line(timeout)
        ended = utcnow()
        self._pid = None
        timed_out = answer is None and self.agent is not None and self.agent.poll() is None and not self._killed
        if answer is None:
            self._stop_agent()                 # stops the program with it; a new agent serves the next task
        for name, buffer in ((AGENT_OUT, stdout), (AGENT_ERR, stderr)):
            self._collect_output(os.path.join(self.workdir, name), buffer)
        for name in AGENT_FILES:
            try:
                os.unlink(os.path.join(self.workdir, name))
            except OSError:
                pass
        if timed_out:
            code = Code.TIMEOUT
            stderr.write(f"\nscalebox-hpc: killed after task_max_seconds={timeout:g}\n")
        elif answer is None or not answer.isdigit():
            code = 128 + signal.SIGKILL if self._killed else 125
            if not self._killed:
                stderr.write(f"\nscalebox-hpc: the task agent in instance {self.name} ended unexpectedly\n")
        else:
            code = int(answer)
        return ProgramResult(code, started, ended, stdout.text(), stderr.text(), timed_out, self._killed)

    @staticmethod
    def _collect_output(path: str, buffer) -> None:
        """Copy what the program wrote (its tail, as much as the buffer keeps) into the buffer."""
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > buffer.limit:
                    fh.seek(size - buffer.limit - 1)   # one byte more: the buffer marks the cut
                data = fh.read()
        except OSError:
            return
        if data:
            buffer.write_bytes(data)

    def kill(self) -> None:
        """Stop the running program (from another thread): in agent mode, the agent with it."""
        if self.mode == "instance" and self.agent is not None and self._pid is not None:
            self._killed = True
            try:
                os.killpg(self.agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        super().kill()
