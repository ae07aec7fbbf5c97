"""The controller: routes nothing itself. Each step it
1. declares workers lost (process gone, or lease expired) and makes their tasks READY
   again as an attempt with code 123 (or final, by the retry rules);
2. sizes each module's pool of workers to its ready tasks and slots, and sends a
   worker to each host that ready tasks of a HOST-BOUND module name in to_host (or,
   the host being gone, applies the module's host_fallback);
3. marks apps FINISHED when no task is left to run, FAILED when workers keep failing.
Every step is a few short transactions, so it can be killed and restarted at any
moment; a database outage only pauses it.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import psycopg

from .db.apps import Apps
from .db.connection import Database
from .db.pools import Pools
from .errors import DatabaseUnavailable, first_line
from .sites import Site, make_sites
from .states import AppStatus, Code, WorkerStatus

log = logging.getLogger(__name__)

MAX_WORKER_FAILURES = 3
FAILURE_BACKOFF_SECONDS = 5.0


@dataclass
class ControllerSettings:
    dsn: str
    state_dir: str
    scratch_root: str = ""
    lease_seconds: float = 30.0
    idle_seconds: float = 30.0
    poll_seconds: float = 1.0
    log_dir: str = field(default="")
    sites_dir: str | None = None

    def __post_init__(self):
        self.scratch_root = self.scratch_root or os.path.join(self.state_dir, "scratch")
        self.log_dir = self.log_dir or os.path.join(self.state_dir, "logs")


class Controller:
    def __init__(self, settings: ControllerSettings, sites: dict[str, Site] | None = None):
        self.settings = settings
        self.database = Database(settings.dsn, name="scalebox-hpc controller")
        self.pools = Pools(self.database)
        self.apps = Apps(self.database)
        self.sites = sites if sites is not None else make_sites(settings)
        self.active = False               # holds the controller lock
        self.recover_after = 0.0          # no lease recovery before this (monotonic)
        self.site_load: dict[str, tuple[int, int]] = {}          # site -> (live, pending) workers
        self.site_status: dict[str, tuple[str, str | None]] = {}  # as last written to the sites table

    def _connect(self) -> None:
        """(Re)connect and try to become the active controller."""
        was_active = self.active
        self.active = self.pools.try_controller_lock()
        if self.active and not was_active:
            # Workers could not renew their leases while we (or the database) were away:
            # give them one lease period to do so before declaring anybody lost.
            self.recover_after = time.monotonic() + self.settings.lease_seconds
            log.info("controller active on %s (pid %s)", socket.gethostname(), os.getpid())
            for name, site in self.sites.items():
                self.pools.upsert_site(name, site.kind, site.forward_target().to_json())

    def step(self) -> dict:
        """One pass; returns what it did (for logs and tests)."""
        report = {"lost": 0, "recovered": 0, "started": 0, "host_gone": 0, "finished": [], "failed": []}
        try:
            if not self.active or not self.database.connected:
                self._connect()
            if not self.active:
                return report
            self._notice_dead(report)
            if time.monotonic() >= self.recover_after:
                lost, recovered = self.pools.recover_lost()
                report["lost"] += len(lost)
                report["recovered"] = recovered
                self.pools.count_worker_failures([w.id for w in lost])
                if recovered:
                    log.info("recovered %d task(s) from %d lost worker(s)", recovered, len(lost))
            self._size_pools(report)
            self._write_site_status()
            self._cancel_unneeded()
            report["finished"] = self.pools.finish_apps()
            for app_id in report["finished"]:
                log.info("app %s FINISHED", app_id)
        except (psycopg.OperationalError, DatabaseUnavailable) as exc:
            log.warning("database unavailable (%s); will reconnect", first_line(exc))
            self.database.reset()
            self.active = False
        return report

    def _notice_dead(self, report: dict) -> None:
        """Ask each site which of its workers are gone; note what each site holds."""
        self.site_load = {}
        for name, site in self.sites.items():
            live = self.pools.live_workers(name)
            gone = set(site.dead(live))
            if gone:
                self.pools.mark_workers_lost(sorted(gone), f"worker {site.kind} job or process is gone")
                # A worker that vanished without saying goodbye counts as a failed one.
                self.pools.count_worker_failures(sorted(gone))
                report["lost"] += len(gone)
                log.info("site %s: worker(s) %s gone", name, sorted(gone))
            still = [w for w in live if w.id not in gone]
            self.site_load[name] = (len(still), sum(w.status == "PENDING" for w in still))

    def _write_site_status(self) -> None:
        """Record each site's OK/DEGRADED state where 'site list' reads it, when it changed."""
        for name, site in self.sites.items():
            if (site.status, site.reason) != self.site_status.get(name):
                self.pools.set_site_status(name, site.status, site.reason)
                self.site_status[name] = (site.status, site.reason)

    def _cancel_unneeded(self) -> None:
        """Queued worker jobs of apps that ended (or paused) are cancelled, not left to start."""
        for site_name, workers in self.pools.stale_pending_workers().items():
            site = self.sites.get(site_name)
            if site is not None:
                site.cancel(workers)
            self.pools.stop_workers([w.id for w in workers], WorkerStatus.EXITED,
                                    "app no longer running: job cancelled before it started")

    def _size_pools(self, report: dict) -> None:
        held_back = self._size_module_pools(report)
        self._size_host_pools(report, held_back)

    def _size_module_pools(self, report: dict) -> set[int]:
        """Pilots for each site, sized in resources: the cores (and GPUs) the ready and held
        tasks of its running apps' modules need, each module within its slots, against
        what the site's live pilots have (one pilot has the site's pilot_cpus, and serves
        every running app there). A new pilot's home is the module with most unmet work:
        its failures are that module's. Returns the modules that get no new worker now
        (failing, or backing off)."""
        held_back: set[int] = set()
        groups: dict[str, list] = {}
        for m in self.pools.module_demand(ready_cap=1000):
            if m.worker_failures >= MAX_WORKER_FAILURES:
                # A module whose workers keep failing fails its app instead of looping forever.
                held_back.add(m.id)
                last = self.pools.last_worker_failure(m.id) or "unknown reason"
                msg = f"module {m.name}: {m.worker_failures} workers failed in a row; last: {last}"
                if self.apps.set_app_status(m.app_id, AppStatus.FAILED, [AppStatus.RUNNING], msg):
                    log.error("app %s FAILED: %s", m.app_id, msg)
                    report["failed"].append(m.app_id)
                continue
            # The last start failed a moment ago: do not hammer the site.
            if m.worker_failures and m.last_failure is not None and \
                    time.time() - m.last_failure.timestamp() < FAILURE_BACKOFF_SECONDS:
                held_back.add(m.id)
            if m.site not in self.sites:
                msg = f"module {m.name}: unknown site '{m.site}' (known: {', '.join(sorted(self.sites))})"
                if self.apps.set_app_status(m.app_id, AppStatus.FAILED, [AppStatus.RUNNING], msg):
                    report["failed"].append(m.app_id)
                continue
            groups.setdefault(m.site, []).append(m)
        for site_name, modules in groups.items():
            site = self.sites[site_name]
            n = self._pilots_wanted(site, modules)
            site_live, site_pending = self.site_load.get(site_name, (0, 0))
            # A module backing off gets no pilot of its own; the others of the site may.
            modules = [m for m in modules if m.id not in held_back]
            if n <= site_live or not modules:
                continue
            n = site.admit(n - site_live, site_live, site_pending)
            if n > 0:
                home = max(modules, key=lambda m: (min(m.slots, m.ready) * m.task_cpus, -m.id))
                module = {"id": home.id, "name": home.name, "app_id": home.app_id}
                for host, k in self._placement(site, home, n, site_live).items():
                    report["started"] += self._start_workers(site_name, module, k, host=host)
        return held_back

    @staticmethod
    def _placement(site: Site, home, n: int, live: int) -> dict[str | None, int]:
        """Where n new pilots go: anywhere, or, for a home module with upstream's per-host
        slots on a site of many hosts, to those hosts in turn (its tasks run nowhere else)."""
        if not home.host_slots or site.kind == "local":
            return {None: n}
        hosts = sorted(home.host_slots)
        placed: dict[str | None, int] = {}
        for i in range(n):
            host = hosts[(live + i) % len(hosts)]
            placed[host] = placed.get(host, 0) + 1
        return placed

    @staticmethod
    def _pilots_wanted(site: Site, modules: list) -> int:
        """How many pilots an app's modules on one site want: enough cores and GPUs for
        their ready and held tasks within each module's slots, at least min_workers."""
        cpus = sum(min(m.slots, m.ready + m.held) * max(1, m.task_cpus) for m in modules)
        gpus = sum(min(m.slots, m.ready + m.held) * m.task_gpus for m in modules)
        n = -(-cpus // max(1, site.pilot_cpus))
        if gpus and site.pilot_gpus:
            n = max(n, -(-gpus // site.pilot_gpus))
        return max(n, max(min(m.min_workers, m.slots) for m in modules))

    def _size_host_pools(self, report: dict, held_back: set[int]) -> None:
        """HOST-BOUND modules: ready tasks with a to_host need a worker on that host. Each
        step, every host whose ready tasks outnumber the module's workers there (running
        or queued) gets one more, within the module's slots and the site's limits: round
        by round, so that one busy host does not take all the slots. A host the site says
        is gone gets the module's host_fallback instead."""
        rows = self.pools.host_demand()
        if not rows:
            return
        hosts_by_site: dict[str, set[str]] = {}
        for d in rows:
            hosts_by_site.setdefault(d.site, set()).add(d.to_host)
        gone = {name: self.sites[name].gone_hosts(hosts)
                for name, hosts in hosts_by_site.items() if name in self.sites}
        module_live: dict[int, int] = {}
        for d in rows:
            if d.id in held_back or d.site not in self.sites:
                continue
            site = self.sites[d.site]
            module = {"id": d.id, "name": d.name, "app_id": d.app_id}
            reason = gone[d.site].get(d.to_host)
            # A worker still running there (a drained node keeps its jobs) serves them on.
            if reason is not None and not d.started:
                self._host_gone(site, module, d.to_host, d.host_fallback, reason, report)
                continue
            live = module_live.setdefault(d.id, d.live)
            if d.there >= d.ready or reason is not None or live >= d.slots:
                continue
            site_live, site_pending = self.site_load.get(d.site, (0, 0))
            if site.admit(1, site_live, site_pending) < 1:
                continue
            n = self._start_workers(d.site, module, 1, host=d.to_host)
            module_live[d.id] += n
            report["started"] += n

    def _host_gone(self, site: Site, module: dict, host: str, fallback: str, reason: str,
                   report: dict) -> None:
        """The module's ready tasks wait for a host that is gone: end them (host_fallback
        fail) or let them run anywhere (anywhere); its queued workers there go too."""
        if fallback == "anywhere":
            n = self.pools.unpin_host_tasks(module["id"], host)
            log.warning("module %s: %s; %d task(s) for %s may now run on any host (host_fallback: anywhere)",
                        module["name"], reason, n, host)
        else:
            note = (f"to_host {host} is gone: {reason}; module {module['name']} has host_fallback: fail "
                    "(set host_fallback: anywhere to run such tasks on another host)")
            n = self.pools.fail_host_tasks(module["id"], host, Code.HOST_GONE, note)
            log.error("module %s: %s; %d task(s) for %s failed (%s)", module["name"], reason, n, host,
                      Code.HOST_GONE)
        report["host_gone"] += n
        pending = self.pools.pending_host_workers(module["id"], host)
        if pending:
            site.cancel(pending)
            self.pools.stop_workers([w.id for w in pending], WorkerStatus.EXITED,
                                    f"cancelled before it started: {reason}")

    def _start_workers(self, site_name: str, module: dict, n: int, host: str | None = None) -> int:
        """Create n worker rows and have the site start them (on ``host``, when given);
        returns how many it did."""
        site = self.sites[site_name]
        ids = [self.pools.create_worker(module["id"], site_name, site.start_timeout, want_host=host)
               for _ in range(n)]
        try:
            jobs = site.launch(ids, module, host=host)
        except OSError as exc:
            msg = f"cannot start worker: {exc}"
            self.pools.mark_workers_lost(ids, msg)
            self.pools.count_worker_failures(ids)
            log.error("module %s: %s", module["name"], msg)
            return 0
        # Those not sent (refused, or over the site's sbatch budget) never had a chance.
        self.pools.record_launch(jobs, [wid for wid in ids if wid not in jobs],
                                 f"not submitted to site {site_name} ({site.refusal})")
        site_live, site_pending = self.site_load.get(site_name, (0, 0))
        self.site_load[site_name] = (site_live + len(jobs), site_pending + len(jobs))
        return len(jobs)

    def run(self, *, once: bool = False, stop=None) -> None:
        """Loop until ``stop()`` returns true (or once)."""
        while True:
            started = time.monotonic()
            self.step()
            if once or (stop is not None and stop()):
                return
            time.sleep(max(0.0, self.settings.poll_seconds - (time.monotonic() - started)))

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.database.close()
