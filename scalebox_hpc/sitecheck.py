"""'scalebox-hpc site check SITE': is a site ready to run workers?

For a Slurm site it asks Slurm (squeue, the partition), renders the worker job script,
and submits a tiny probe job built exactly like a worker job (same #SBATCH lines,
worker_init, environment, database settings and worker command line, made by the same
code, with ``--probe``). The probe runs on a compute node, connects to the database
the workers would use, writes to the scratch directory, and reports back through
PostgreSQL (NOTIFY), so the check needs no shared file system, and a report that
arrives proves the database reachable from the node.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace

import psycopg

from . import __version__
from .db.connection import listen_on
from .db.pools import report_probe
from .errors import first_line
from .transport import CommandError

PROBE_PREFIX = "sbx_probe_"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def probe(dsn: str, channel: str, scratch: str) -> int:
    """On the compute node: check scratch, then report to the channel. Exit 0 if reported."""
    report = {"host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
              "python": sys.executable, "version": __version__, "job": os.environ.get("SLURM_JOB_ID")}
    scratch = os.path.expandvars(scratch)
    try:
        os.makedirs(scratch, exist_ok=True)
        path = os.path.join(scratch, f".sbx-probe-{os.getpid()}")
        with open(path, "w") as fh:
            fh.write("probe\n")
        os.unlink(path)
        report["scratch"] = f"{scratch} writable"
        report["scratch_ok"] = True
    except OSError as exc:
        report["scratch"] = f"{scratch}: {exc.strerror or exc}"
        report["scratch_ok"] = False
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=20) as conn:
            report_probe(conn, channel, json.dumps(report))
    except psycopg.Error as exc:
        print(f"scalebox-hpc worker --probe: cannot reach the database from {report['host']}: "
              f"{first_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


def check_local(site, dsn: str) -> list[Check]:
    checks = [_database_check(dsn)]
    configured = site.config.scratch_root if site.config is not None else None
    scratch = os.path.expandvars(configured or site.settings.scratch_root)
    try:
        os.makedirs(scratch, exist_ok=True)
        ok = os.access(scratch, os.W_OK)
        checks.append(Check("scratch", ok, f"{scratch} {'writable' if ok else 'not writable'}"))
    except OSError as exc:
        checks.append(Check("scratch", False, f"{scratch}: {exc.strerror or exc}"))
    return checks


def _database_check(dsn: str) -> Check:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            version = conn.info.server_version
        return Check("database", True, f"reachable from this host (PostgreSQL {version // 10000})")
    except psycopg.Error as exc:
        return Check("database", False, f"unreachable from this host: {first_line(exc)}")


def check_batch(site, dsn: str, *, timeout: float, progress=lambda text: None) -> list[Check]:
    """Slurm commands, partition, job script, then the probe job (unless an earlier
    check already shows it could not work)."""
    from .sites.slurm import render_worker_script

    checks = [_database_check(dsn)]
    cli = site.scheduler
    try:
        jobs = cli.jobs(site.prefix)
        how = f" on {site.config.ssh.where} over SSH" if site.config.ssh else ""
        checks.append(Check("slurm", True, f"squeue answers{how} ({len(jobs)} job(s) of this site in the queue)"))
    except CommandError as exc:
        checks.append(Check("slurm", False, str(exc)))
        return checks
    partition = site.config.slurm.partition
    try:
        found = cli.partition(partition)
        if partition:
            checks.append(Check("partition", True, found))
        else:
            checks.append(Check("partition", True, f"none set: the cluster's default ({found})"))
    except CommandError as exc:
        checks.append(Check("partition", False, str(exc)))
        return checks
    channel = PROBE_PREFIX + secrets.token_hex(8)
    argv = replace(site.worker_launch([]), probe=channel).argv(site.config.python)
    try:
        env = site.worker_env()
        site.ensure_log_dir()
        script = render_worker_script(site.config, job_name=f"{site.prefix}probe", worker_argv=argv, env=env,
                                      log_dir=site.log_dir)
        checks.append(Check("job script", True, "rendered"))
    except Exception as exc:  # noqa: BLE001 - reported as the failed check, whatever it is
        checks.append(Check("job script", False, str(exc)))
        return checks
    checks.extend(_probe_job(site, dsn, channel, script, timeout, progress))
    return checks


def _probe_job(site, dsn, channel, script, timeout, progress) -> list[Check]:
    nodes = site.config.slurm.nodes
    try:
        listener = psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        return [Check("probe job", False, f"cannot listen for the probe: {exc}")]
    with listener:
        listen_on(listener, channel)
        try:
            job = site.scheduler.submit(script)
        except CommandError as exc:
            return [Check("probe job", False, f"submission failed: {exc}")]
        progress(f"probe job {job} submitted; waiting for it (up to {timeout:g} s)")
        reports, started = [], time.monotonic()
        gone_since = None
        while len(reports) < nodes and time.monotonic() - started < timeout:
            for note in listener.notifies(timeout=1.0, stop_after=1):
                reports.append(json.loads(note.payload))
            try:
                queued = job in site.scheduler.jobs(site.prefix)
            except CommandError:
                queued = True
            if not queued:
                # Gone from the queue: give a report sent at its very end a moment to arrive.
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 3:
                    break
        waited = time.monotonic() - started
        if len(reports) < nodes and job in _safe_jobs(site):
            site.scheduler.cancel([job])
            return [Check("probe job", False, f"job {job} did not run within {timeout:g} s (still in the "
                                              f"queue; cancelled): try again with a longer --timeout")]
    if not reports:
        return [Check("probe job", False, f"job {job} ended without reaching the database "
                                          f"{site.worker_env()['SCALEBOX_DSN']!r} from a compute node"
                                          f"{_job_error(site, job)}")]
    hosts = ", ".join(sorted(r["host"] for r in reports))
    checks = [Check("probe job", len(reports) == nodes,
                    f"job {job} ran on {hosts} in {waited:.1f} s (scalebox-hpc {reports[0]['version']}, "
                    f"{reports[0]['python']})"),
              Check("database from nodes", True, f"reached from {hosts}")]
    bad = [r for r in reports if not r["scratch_ok"]]
    checks.append(Check("scratch", not bad, "; ".join(r["scratch"] for r in (bad or reports[:1]))))
    return checks


def _safe_jobs(site) -> dict:
    try:
        return site.scheduler.jobs(site.prefix)
    except CommandError:
        return {}


def _job_error(site, job: str) -> str:
    """The last line of the probe job's stderr, when the log directory is visible here."""
    path = os.path.join(site.log_dir, f"{site.prefix}probe-{job}.err")
    try:
        with open(path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return f" (its output, {path}, is not visible from here)"
    return f": {lines[-1]}" if lines else f" (nothing in {path})"


def as_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
