"""The local site: workers are processes on this machine (the embedded default)."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from . import LiveWorker, Site
from .launch import WorkerLaunch

log = logging.getLogger(__name__)
_PYTHON = [sys.executable, "-m", "scalebox_hpc"]
# A pilot process started ahead of its worker: (its environment, the process).
_ahead: list[tuple[dict, subprocess.Popen]] = []


def start_ahead(dsn: str, log_dir: Path) -> None:
    """Start a pilot process now, for this process's next local launch (scalebox-hpc run,
    before it writes the app): the pilot's interpreter start and imports, 0.2 s, then
    overlap the writing of the tasks rather than follow it. Unused, it exits when this
    process does (end of its input)."""
    drop_ahead()
    env = dict(os.environ, SCALEBOX_DSN=dsn)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "worker-ahead.log", "ab") as logf:
        proc = subprocess.Popen([*_PYTHON, "worker-ahead"], env=env, stdin=subprocess.PIPE, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _ahead.append((env, proc))


def drop_ahead() -> bool:
    """End the pilot process started ahead, if unused (False: none is left)."""
    while _ahead:
        _, proc = _ahead.pop()
        proc.stdin.close()
    return False


def _take_ahead(env: dict, argv: list[str], log_path: Path) -> subprocess.Popen | None:
    """The pilot process started ahead, given this launch, if it was started alike."""
    if not _ahead:
        return None
    ahead_env, proc = _ahead.pop()
    if ahead_env == env and argv[:len(_PYTHON)] == _PYTHON and proc.poll() is None:
        request = {"args": argv[len(_PYTHON):], "log": str(log_path)}
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.close()
            return proc
        except OSError:
            pass
    proc.stdin.close()
    return None


class LocalSite(Site):
    name = "local"
    kind = "local"
    start_timeout = 60.0

    def __init__(self, settings, config=None):
        self.settings = settings
        self.config = config
        if config is not None:
            self.name = config.name
        # The name workers report as their host (worker._host_ip), which to_host headers use.
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.procs: dict[int, subprocess.Popen] = {}
        self.logdir = Path(settings.log_dir)

    @property
    def pilot_cpus(self) -> int:
        """A pilot here has the site config's cpus, or every core of the machine."""
        return (self.config.cpus if self.config and self.config.cpus else None) or os.cpu_count() or 1

    @property
    def pilot_gpus(self) -> int:
        return (self.config.gpus if self.config else None) or 0

    def admit(self, wanted: int, live: int, pending: int) -> int:
        # The built-in site is one pilot using every core; a configured one may run
        # several (of its 'cpus' each), up to max_workers.
        most = self.config.pool.max_workers if self.config is not None else 1
        return max(0, min(wanted, most - live))

    def gone_hosts(self, hosts: set[str]) -> dict[str, str]:
        # Workers of this site only ever run here.
        return {h: f"host {h} is not a host of site {self.name} (its workers run on {self.host} only)"
                for h in hosts if h != self.host}

    unknown_hosts = gone_hosts

    def launch(self, worker_ids: list[int], module: dict, host: str | None = None) -> dict[int, str | None]:
        # 'host' can only be this machine: the controller asks gone_hosts() first.
        self.logdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SCALEBOX_DSN=self.settings.dsn)
        config = self.config
        scratch = config.scratch_root if config and config.scratch_root else self.settings.scratch_root
        for wid in worker_ids:
            argv = WorkerLaunch((wid,), scratch=scratch, lease_seconds=self.settings.lease_seconds,
                                idle_seconds=self.settings.idle_seconds, runtime=config.runtime if config else None,
                                image_cache=config.image_cache if config else None,
                                container_gpu=config.container_gpu if config else None,
                                cpus=self.pilot_cpus, gpus=config.gpus if config else None).argv()
            log_path = self.logdir / f"worker-{wid}.log"
            self.procs[wid] = _take_ahead(env, argv, log_path) or self._start(argv, env, log_path)
            log.info("started local worker %s for module %s (pid %s)", wid, module["name"],
                     self.procs[wid].pid)
        return dict.fromkeys(worker_ids)

    @staticmethod
    def _start(argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as logf:
            # A session of its own: workers outlive a controller restart or a Ctrl-C.
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def dead(self, workers: list[LiveWorker]) -> list[int]:
        gone = []
        for w in workers:
            proc = self.procs.get(w.id)
            if proc is not None:
                if proc.poll() is None:
                    continue
                del self.procs[w.id]   # reaped
                gone.append(w.id)
            elif w.pid and w.host == self.host and not _alive(w.pid):
                gone.append(w.id)      # started by an earlier controller and gone since
        for wid in [wid for wid, p in self.procs.items() if p.poll() is not None]:
            del self.procs[wid]        # exited cleanly: reap it
        return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
