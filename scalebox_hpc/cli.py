"""The scalebox-hpc command line. It parses, calls, and prints; the work is elsewhere."""
from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone

import click

from . import __version__, config, db
from .db.apps import Apps
from .db.connection import Database
from .db.pools import Pools
from .db.reporting import Reporting
from .states import RUNTIMES, AppStatus, is_failure, parse_status, status_name
from .errors import NotFound, ScaleboxError, first_line

log = logging.getLogger("scalebox_hpc")


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def json_output(command):
    """A command's --json flag (machine-readable output instead of a table); the command
    gets the click context and ``as_json``."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON instead of a table.")(click.pass_context(command))


class Group(click.Group):
    """Prints user errors as one line (exit 1); internal errors keep their traceback in a log."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ScaleboxError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place internal errors are reported
            logdir = config.state_dir() / "logs"
            try:
                logdir.mkdir(parents=True, exist_ok=True)
                path = logdir / "errors.log"
                with open(path, "a") as fh:
                    fh.write(f"--- {datetime.now().isoformat()} {' '.join(sys.argv)}\n{traceback.format_exc()}")
                where = f"; traceback in {path}"
            except OSError:
                where = ""
            first = first_line(str(exc))
            click.echo(f"internal error: {type(exc).__name__}: {first}{where}", err=True)
            sys.exit(2)


def _setup_logging(verbose: int, logfile: str | None = None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        filename=logfile)
    logging.getLogger("psycopg").setLevel(logging.WARNING)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dsn", envvar="SCALEBOX_DSN", help="PostgreSQL connection string "
              "(default: SCALEBOX_DSN, the config file, PG* variables, else the embedded server).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="scalebox-hpc")
@click.pass_context
def main(ctx, dsn, verbose):
    """Run Scalebox-style streaming pipelines on HPC batch sites."""
    ctx.obj = {"dsn": dsn}
    if ctx.invoked_subcommand not in ("worker", "worker-ahead"):
        _setup_logging(verbose)


def _dsn(ctx) -> str:
    """The database to use, starting the embedded server if it is the choice."""
    if "resolved" not in ctx.obj:
        ctx.obj["resolved"] = config.resolve_database(ctx.obj["dsn"])
    return ctx.obj["resolved"].dsn


def _database(ctx) -> Database:
    """The database, checked to have this version's schema."""
    database = Database(_dsn(ctx))
    db.require_schema(database.conn)
    return database


# ---------------------------------------------------------------- submit / run
def _submit(ctx, path: str, env_files: tuple[str, ...], site: str | None) -> tuple[object, int]:
    from .appdef import load_app
    from .sites import make_sites

    app = load_app(path, env_files=env_files)   # every error is raised before anything is written
    if site:
        app.site = site
    app_json = app.to_json()
    known_sites = make_sites(_controller_settings(ctx))
    modules = []
    for name, mod in app.modules.items():
        mod_json = app_json["modules"][name]
        mod_json["site"] = mod.site or app.site
        if mod_json["site"] not in known_sites:
            raise ScaleboxError(f"{app.path}: modules.{name}: unknown site '{mod_json['site']}' "
                                f"(known: {', '.join(sorted(known_sites))})")
        problem = known_sites[mod_json["site"]].unfit(mod_json)
        if problem:
            raise ScaleboxError(f"{app.path}: modules.{name}: {problem}")
        modules.append(mod_json)
    start = [(name, body) for name, mod in app.modules.items() for body in mod.start_tasks]
    for mod_json in app_json["modules"].values():
        # They become tasks; a copy in the stored definition would only be read back (by
        # every pilot and claim) for nothing: a FILE: list of a million bodies is megabytes.
        mod_json["start_tasks"] = []
    app_id = Apps(_database(ctx)).create_app(app_json, modules, start)
    return app, app_id


def _controller_settings(ctx):
    from .controller import ControllerSettings

    return ControllerSettings(
        dsn=_dsn(ctx),
        state_dir=str(config.state_dir()),
        scratch_root=os.environ.get("SCALEBOX_SCRATCH", ""),
        lease_seconds=config.env_float("SCALEBOX_LEASE_SECONDS", 30.0),
        idle_seconds=config.env_float("SCALEBOX_IDLE_SECONDS", 30.0),
        poll_seconds=config.env_float("SCALEBOX_POLL_SECONDS", 1.0),
        sites_dir=config.sites_dir())


def _follow(ctx, database: Database, app_id: int, *, quiet: bool) -> str:
    """Drive the controller (if no other one is active) and show progress until the app ends."""
    from .controller import Controller
    from .progress import ProgressView
    from .sites import local

    settings = _controller_settings(ctx)
    settings.poll_seconds = min(settings.poll_seconds, 0.5)
    controller = Controller(settings)
    view = None if quiet else ProgressView()
    ahead = True
    # A pilot that runs out of work says so: the app may be over, look at once.
    database.retrying(lambda: database.listen(f"sbx_a{app_id}"), what="listen")
    try:
        while True:
            started = time.monotonic()
            controller.step()
            if ahead:
                # Launched by now if the app runs here: else it has no use.
                ahead = local.drop_ahead()
            app = database.retrying(lambda: Apps(database).get_app(app_id), what="read app status")
            if view:
                view.update(database.retrying(lambda: Reporting(database).module_counts(app_id),
                                              what="read progress"))
            if app.status in AppStatus.TERMINAL:
                return app.status
            left = settings.poll_seconds - (time.monotonic() - started)
            if left > 0:
                try:
                    database.wait_notify(left)
                except Exception:  # noqa: BLE001 - a broken connection: the next read retries it
                    database.reset()
                    time.sleep(left)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following app {app_id}; it goes on if a controller runs "
                   f"('scalebox-hpc controller'), or cancel it with 'scalebox-hpc app cancel {app_id}'",
                   err=True)
        raise SystemExit(130)
    finally:
        if view:
            view.close()
        controller.close()


def _print_summary(summary: dict) -> None:
    tasks = {k: sum(m[k] for m in summary["modules"].values()) for k in ("ok", "failed", "total")}
    took = f" in {summary['elapsed_seconds']:.1f} s" if summary["elapsed_seconds"] is not None else ""
    click.echo(f"app {summary['id']} ({summary['name']}) {summary['status']}{took}: "
               f"{tasks['ok']} task(s) ok, {tasks['failed']} failed")
    if summary["message"]:
        click.echo(f"  {summary['message']}")
    if summary["result"] is not None:
        click.echo(f"result: {summary['result']}")


def _start_background_controller() -> None:
    logdir = config.state_dir() / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "controller.log", "ab") as logf:
        subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "-v", "controller"], stdin=subprocess.DEVNULL,
                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


@main.command()
@click.argument("app_path", metavar="APP_DIR_OR_YAML", type=click.Path(exists=True))
@click.option("-e", "--env-file", "env_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="KEY=VALUE file for ${VAR} placeholders (repeatable; later files win).")
@click.option("--site", help="Run the modules that name no site on this site.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the app to its end (--no-wait starts a background controller if none runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def run(ctx, app_path, env_files, site, wait, as_json, quiet):
    """Submit an app and run it to the end on the configured (default: embedded) database.

    Exit code 0 only if the app FINISHED.
    """
    if wait:
        # This process drives the controller: a local pilot starts while the app is
        # checked and written, and the controller is loaded before the app counts as
        # started (its clock starts when the tasks are written).
        from .sites import local
        importlib.import_module("scalebox_hpc.controller")
        local.start_ahead(_dsn(ctx), config.state_dir() / "logs")
    app, app_id = _submit(ctx, app_path, env_files, site)
    database = _database(ctx)
    if not wait:
        if not Pools(database).controller_running():
            _start_background_controller()
        click.echo(json.dumps({"id": app_id}) if as_json else f"submitted app {app_id} ({app.name})")
        return
    if not as_json:
        click.echo(f"app {app_id} ({app.name}) submitted; running on {ctx.obj['resolved'].source}")
    status = _follow(ctx, database, app_id, quiet=quiet or as_json)
    summary = Reporting(database).app_summary(app_id)
    emit_json(summary) if as_json else _print_summary(summary)
    sys.exit(0 if status == "FINISHED" else 1)


@main.command()
@click.argument("app_path", metavar="APP.yaml", type=click.Path(exists=True))
@click.option("-e", "--env-file", "env_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="KEY=VALUE file for ${VAR} placeholders (repeatable).")
@click.option("--site", help="Run the modules that name no site on this site.")
@click.option("--wait", is_flag=True, help="Wait for the app to end (a controller must be running).")
@json_output
def submit(ctx, app_path, env_files, site, wait, as_json):
    """Put an app into the database; a running controller does the rest."""
    app, app_id = _submit(ctx, app_path, env_files, site)
    database = _database(ctx)
    if not wait:
        click.echo(json.dumps({"id": app_id}) if as_json else f"submitted app {app_id} ({app.name})")
        if not as_json and not Pools(database).controller_running():
            click.echo("note: no controller is running on this database; start one with "
                       "'scalebox-hpc controller'", err=True)
        return
    while (status := Apps(database).get_app(app_id).status) not in AppStatus.TERMINAL:
        time.sleep(1.0)
    summary = Reporting(database).app_summary(app_id)
    emit_json(summary) if as_json else _print_summary(summary)
    sys.exit(0 if status == "FINISHED" else 1)


@main.command()
@click.option("--once", is_flag=True, help="Do one pass and exit.")
@click.pass_context
def controller(ctx, once):
    """The head-node daemon: sizes worker pools, recovers lost tasks, finishes apps.

    Safe to stop and restart at any time; a second controller on the same database
    stands by until the first one goes away.
    """
    from .controller import Controller

    # A daemon waits for its database (a PostgreSQL restarting as the controller starts is
    # a pause, up to two minutes); a database that refuses the address, or an old schema,
    # stops it at once.
    db.with_retry(lambda: _database(ctx).close(), what="controller start", give_up_after=120)
    ctl = Controller(_controller_settings(ctx))
    if not once:
        click.echo(f"controller running on {ctx.obj['resolved'].source} (Ctrl-C to stop)", err=True)
    try:
        ctl.run(once=once)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.close()


@main.command()
@click.option("--worker-ids", required=True,
              help="Worker rows created by the controller, comma-separated: a batch job's workers "
                   "each take theirs by array index and node.")
@click.option("--scratch", type=click.Path(file_okay=False), help="Node-local scratch root.")
@click.option("--lease-seconds", type=float, default=30.0, show_default=True)
@click.option("--idle-seconds", type=float, default=30.0, show_default=True,
              help="Exit after this long with nothing to do.")
@click.option("--walltime-seconds", type=float, help="The batch job's time limit (to stop claiming in time).")
@click.option("--runtime", type=click.Choice(RUNTIMES),
              help="Container runtime for modules with an image (default: whichever is on PATH).")
@click.option("--image-cache", help="Directory for pulled images (default: under the scratch root).")
@click.option("--container-gpu", type=click.Choice(["nv", "rocm"]),
              help="Give containers the pilot's GPUs with --nv or --rocm (the site's container_gpu).")
@click.option("--cpus", type=click.IntRange(1), help="Outside Slurm: the cores this pilot uses (default: all).")
@click.option("--gpus", type=click.IntRange(0), help="Outside Slurm: the GPUs this pilot uses, ids 0..N-1.")
@click.option("--probe", metavar="CHANNEL", hidden=True,
              help="Run the probe of 'site check' (report to CHANNEL) instead of working.")
@click.option("--log-file", type=click.Path(dir_okay=False))
@click.option("-v", "--verbose", count=True)
@click.pass_context
def worker(ctx, log_file, verbose, **options):
    """Run a pilot: tasks of its app's modules, as many at once as its cores and GPUs
    hold (started by the controller, not by hand).

    Its options are what sites write through sites.launch.WorkerLaunch."""
    from .sites.launch import WorkerLaunch
    from .worker import Worker, WorkerSettings, job_end_time

    _setup_logging(max(verbose, 1), log_file)
    try:
        launch = WorkerLaunch.from_options(**options)
        worker_id = None if launch.probe else launch.worker_id(os.environ)
    except ValueError as exc:
        raise ScaleboxError(str(exc)) from None
    dsn = ctx.obj["dsn"]
    if dsn is None:
        dsn = config.resolve_database(None).dsn
    scratch = launch.scratch or os.environ.get("TMPDIR") or "/tmp"
    if launch.probe:
        # The job 'site check' submits: the worker's job script and flags, reporting back.
        from . import sitecheck
        sys.exit(sitecheck.probe(dsn, launch.probe, scratch))
    settings = WorkerSettings(scratch_root=os.path.expandvars(scratch), lease_seconds=launch.lease_seconds,
                              idle_seconds=launch.idle_seconds,
                              runtime=launch.runtime or os.environ.get("SCALEBOX_RUNTIME"),
                              image_cache=launch.image_cache or os.environ.get("SCALEBOX_IMAGE_CACHE"),
                              pull_timeout=config.env_float("SCALEBOX_PULL_TIMEOUT", 900.0),
                              container_gpu=launch.container_gpu,
                              cpus=launch.cpus,
                              lane_processes=os.environ.get("SCALEBOX_LANE_PROCESSES", "1") != "0",
                              gpus=None if launch.gpus is None else tuple(map(str, range(launch.gpus))))
    settings.job_end = job_end_time(os.environ, launch.walltime_seconds)
    sys.exit(Worker(dsn, worker_id, settings).run())


@main.command("worker-ahead", hidden=True)
def worker_ahead():
    """A pilot process started before its worker exists (see sites/local.start_ahead):
    with its imports done, it reads its worker command line and log from stdin, then
    runs it; on end of input it exits."""
    importlib.import_module("scalebox_hpc.worker")      # the work done ahead

    line = sys.stdin.buffer.readline()
    if not line:
        return
    request = json.loads(line)
    log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null_fd, 0), (log_fd, 1), (log_fd, 2)):
        os.dup2(fd, target)
    os.close(log_fd)
    os.close(null_fd)
    main(args=request["args"], prog_name="scalebox-hpc")


# ---------------------------------------------------------------- app
@main.group()
def app():
    """Inspect and steer apps."""


@app.command("list")
@click.option("--limit", default=50, show_default=True)
@json_output
def app_list(ctx, limit, as_json):
    """Recent apps, newest first."""
    rows = [asdict(a) for a in Apps(_database(ctx)).list_apps(limit)]
    if as_json:
        return emit_json(rows)
    from .progress import table
    table(["id", "name", "status", "site", "created", "result"],
          [[r["id"], r["name"], r["status"], r["site"], f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
            (r["result"] or "")[:40]] for r in rows])


@app.command("show")
@click.argument("app_id", type=int)
@json_output
def app_show(ctx, app_id, as_json):
    """Per-module task counts by state, failures by code, rates, ETA and result of one app."""
    summary = Reporting(_database(ctx)).app_summary(app_id)
    if as_json:
        return emit_json(summary)
    from .progress import print_app
    print_app(summary)


@app.command("watch")
@click.argument("app_id", type=int)
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (also what happens when stdout is "
              "not a terminal).")
@click.pass_context
def app_watch(ctx, app_id, interval, once):
    """Live view of an app: a table with progress bars per module, refreshed until the
    app ends (Ctrl-C stops watching; the app goes on)."""
    database = _database(ctx)
    Apps(database).get_app(app_id)
    from .progress import watch_app
    watch_app(lambda: database.retrying(lambda: Reporting(database).app_summary(app_id), what="read app status"),
              interval=max(interval, 0.2), once=once, ended=lambda s: s["status"] in AppStatus.TERMINAL)


# What each state change does to the app's worker pools.
_POOL_EFFECT = {
    "PAUSED": "{started} running worker(s) finish their current task and exit; {pending} queued worker "
              "job(s) are cancelled by the controller; ready tasks wait",
    "RUNNING": "the controller starts workers for the ready tasks again",
    "CANCELLED": "{started} running worker(s) stop their programs and exit; {pending} queued worker "
                 "job(s) are cancelled by the controller",
}


def _set_status(ctx, app_id: int, status: str, from_states: list[str]) -> None:
    database = _database(ctx)
    apps = Apps(database)
    current = apps.get_app(app_id).status
    if not apps.set_app_status(app_id, status, from_states):
        raise ScaleboxError(f"app {app_id} is {current}; only an app that is "
                            f"{' or '.join(from_states)} can become {status}")
    workers = Reporting(database).worker_counts(app_id)
    click.echo(f"app {app_id}: {current} -> {status}: "
               + _POOL_EFFECT[status].format(pending=workers.pending, started=workers.started))
    if (status == "RUNNING" or workers.pending) and not Pools(database).controller_running():
        click.echo("note: no controller is running on this database; start one with "
                   "'scalebox-hpc controller'", err=True)


@app.command("pause")
@click.argument("app_id", type=int)
@click.pass_context
def app_pause(ctx, app_id):
    """Stop claiming new tasks; running ones finish, workers exit."""
    _set_status(ctx, app_id, "PAUSED", ["RUNNING"])


@app.command("resume")
@click.argument("app_id", type=int)
@click.pass_context
def app_resume(ctx, app_id):
    """Resume a paused app."""
    _set_status(ctx, app_id, "RUNNING", ["PAUSED"])


@app.command("cancel")
@click.argument("app_id", type=int)
@click.pass_context
def app_cancel(ctx, app_id):
    """Cancel an app: running programs are stopped, nothing more is claimed."""
    _set_status(ctx, app_id, "CANCELLED", ["INITIAL", "RUNNING", "PAUSED"])


# ---------------------------------------------------------------- task
@main.group()
def task():
    """Add, list, show and retry tasks."""


@task.command("add")
@click.argument("app_id", type=int)
@click.argument("module")
@click.argument("bodies", nargs=-1)
@click.option("-f", "--file", "from_file", type=click.File("r"), help="One message body per line ('-' = stdin).")
@click.option("-H", "--header", "headers", multiple=True, help="KEY=VALUE header for every message (repeatable).")
@click.pass_context
def task_add(ctx, app_id, module, bodies, from_file, headers):
    """Send messages to a module of an app (dedup applies unless -H repeatable=yes)."""
    apps = Apps(_database(ctx))
    apps.get_app(app_id)
    hdrs = {}
    for item in headers:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ScaleboxError(f"--header {item!r}: expected KEY=VALUE")
        hdrs[key] = value
    items = list(bodies)
    if from_file:
        items += [line.rstrip("\r\n") for line in from_file if line.strip()]
    if not items:
        raise ScaleboxError("no message bodies given: pass them as arguments or with --file")
    added = apps.add_tasks(app_id, apps.module_id(app_id, module), items, hdrs)
    click.echo(f"added {added} task(s) to {module}" + (f" ({len(items) - added} duplicate(s) skipped)"
                                                        if added < len(items) else ""))


@task.command("list")
@click.argument("app_id", type=int)
@click.option("--module", help="Only this module.")
@click.option("--status", help="Only this status: a code (-1, 0, 124, ...) or READY, QUEUED, RUNNING, OK, "
              "FAILED (any failure).")
@click.option("--host", help="Only tasks whose last attempt ran on this host.")
@click.option("--limit", default=100, show_default=True)
@json_output
def task_list(ctx, app_id, module, status, host, limit, as_json):
    """Tasks of an app, oldest first."""
    database = _database(ctx)
    apps = Apps(database)
    apps.get_app(app_id)
    if module is not None:
        apps.module_id(app_id, module)
    try:
        code, failed = parse_status(status) if status is not None else (None, False)
    except ValueError as exc:
        raise ScaleboxError(f"--status: {exc}") from None
    rows = Reporting(database).find_tasks(app_id, module=module, status=code, failed=failed, host=host,
                                          limit=limit)
    if as_json:
        return emit_json([asdict(r) for r in rows])
    from .progress import table
    table(["id", "module", "status", "attempts", "host", "body"],
          [[r.id, r.module, status_name(r.status), r.attempts, r.host or "", r.body[:60]] for r in rows])


@task.command("show")
@click.argument("task_id", type=int)
@click.option("--full", is_flag=True, help="Whole stdout/stderr (default: their last 2,000 characters).")
@json_output
def task_show(ctx, task_id, as_json, full):
    """A task and every attempt of it: the timestamps of each stage and the time between
    them, exit code, host, worker, Slurm job, outputs and user text."""
    from .report import STAGES, duration_text

    task, executions = Reporting(_database(ctx)).task(task_id)
    data = asdict(task)
    data["executions"] = [asdict(e) for e in executions]
    for e in data["executions"]:
        e["durations"] = {stage: (e[end] - e[start]).total_seconds()
                          for stage, (_label, start, end, _what) in STAGES.items() if e[start] and e[end]}
    if as_json:
        return emit_json(data)
    click.echo(f"task {data['id']} of app {data['app_id']}, module {data['module']}: "
               f"{status_name(data['status'])}, {len(data['executions'])} execution(s)")
    click.echo(f"  body: {data['body'][:200]}")
    click.echo(f"  headers: {json.dumps(data['headers'])}")
    for e in data["executions"]:
        where = ", ".join(f"{label} {e[key]}" for label, key in (
            ("host", "host"), ("site", "site"), ("worker", "worker_id"), ("Slurm job", "slurm_job_id"))
            if e[key] is not None)
        click.echo(f"  attempt {e['attempt']}: code {e['status_code']} ({status_name(e['status_code'])})"
                   + (f" on {where}" if where else ""))
        if e["note"]:
            click.echo(f"    note: {e['note']}")
        stamps = [(c[2:], v) for c, v in e.items() if c.startswith("t_") and v is not None]
        stamps += [(f"user:{label}" if label else "user", _parse_time(value))
                   for label, value in e["user_timestamps"] or []]
        prev = None
        for name, ts in stamps:
            delta = f"  +{duration_text((ts - prev).total_seconds())}" if prev and ts else ""
            click.echo(f"    {name:<18} {ts.isoformat() if ts else '?'}{delta}")
            prev = ts or prev
        if e["durations"]:
            click.echo("    stages: " + ", ".join(f"{STAGES[k][0]} {duration_text(v)}"
                                                  for k, v in e["durations"].items()))
        sizes = [f"{k.replace('_', ' ')} {e[k]}" for k in ("input_bytes", "output_bytes", "messages_out") if e[k]]
        sizes += [f"{k.replace('_', ' ')} {', '.join(map(str, e[k]))}" for k in ("input_files", "output_files") if e[k]]
        if sizes:
            click.echo(f"    {'; '.join(sizes)}")
        for fwd in e["forwards"] or []:
            click.echo(f"    forwarded to site {fwd['site']}: {fwd['files']} file(s), {fwd['bytes']} bytes in "
                       f"{fwd['seconds']} s ({fwd['mode']}, {fwd['tries']} tr{'y' if fwd['tries'] == 1 else 'ies'})"
                       f" -> {fwd['path']}")
        if e.get("extras"):
            click.echo(f"    extras: {json.dumps(e['extras'], ensure_ascii=False, sort_keys=True)}")
        for key in ("stdout", "stderr", "user_text", "auxout"):
            text = (e[key] or "").rstrip()
            if text:
                if not full and len(text) > 2000:
                    text = f"(... {len(text) - 2000} characters before; --full shows all)\n{text[-2000:]}"
                click.echo(f"    {key}:\n" + "\n".join(f"      {line}" for line in text.splitlines()))


def _parse_time(value) -> datetime | None:
    """A user timestamp as written (ISO 8601; without a zone, UTC), None if it is not one."""
    try:
        ts = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


@task.command("retry")
@click.argument("app_id", type=int)
@click.option("--task", "task_ids", type=int, multiple=True, help="Only this task (repeatable).")
@click.option("--module", help="Only tasks of this module.")
@click.option("--code", "codes", type=int, multiple=True,
              help="Only tasks that ended with this status code (repeatable; e.g. 1, 124, -104).")
@click.pass_context
def task_retry(ctx, app_id, task_ids, module, codes):
    """Make failed tasks READY again (all of the app's, or those the options select),
    one more attempt each."""
    apps = Apps(_database(ctx))
    status = apps.get_app(app_id).status
    module_id = apps.module_id(app_id, module) if module else None
    bad = [c for c in codes if not is_failure(c)]
    if bad:
        raise ScaleboxError(f"--code {bad[0]}: not a failure code (failed tasks end with an exit code above 0 "
                            "or a system code of -100 and below)")
    retried = apps.retry_tasks(app_id, task_ids, module_id, codes)
    click.echo(f"{retried} task(s) made READY again")
    if retried and status in (AppStatus.FAILED, AppStatus.CANCELLED):
        click.echo(f"note: app {app_id} is {status}: nothing runs its tasks until it is resubmitted", err=True)


# ---------------------------------------------------------------- report
@main.command()
@click.argument("app_id", type=int)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The HTML file (default: report-APP_ID.html).")
@click.option("--json", "as_json", is_flag=True, help="Print the report's figures as JSON.")
@click.pass_context
def report(ctx, app_id, output, as_json):
    """Write an HTML report of an app: a timeline per worker, throughput and concurrency
    per module, stage durations, retries and failures by exit code, the slowest tasks.
    One self-contained file (inline SVG, no JavaScript): open it anywhere, no network."""
    from . import report as report_page

    database = _database(ctx)
    path = output or f"report-{app_id}.html"
    started = time.monotonic()
    data = report_page.write(database, app_id, path)
    if as_json:
        return click.echo(report_page.figures_json(data, indent=2))
    t = data["totals"]
    click.echo(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB) in {time.monotonic() - started:.1f} s: "
               f"{t['total']:,} task(s), {t['attempts']:,} attempt(s), {t['retries']:,} retried, "
               f"{t['failed']:,} failed")


# ---------------------------------------------------------------- semaphores, sites, db
@main.group()
def semaphore():
    """Read an app's semaphores."""


@semaphore.command("list")
@click.argument("app_id", type=int)
@json_output
def semaphore_list(ctx, app_id, as_json):
    """The semaphores of one app, their values and when they last changed."""
    rows = [asdict(sem) for sem in Apps(_database(ctx)).semaphores(app_id)]
    if as_json:
        return emit_json(rows)
    from .progress import table
    table(["name", "value", "updated"], [[r["name"], r["value"], f"{r['updated_at']:%Y-%m-%d %H:%M:%S}"]
                                         for r in rows])


@semaphore.command("get")
@click.argument("app_id", type=int)
@click.argument("name")
@click.pass_context
def semaphore_get(ctx, app_id, name):
    """The value of one semaphore (for scripts: the number alone)."""
    click.echo(Apps(_database(ctx)).semaphore(app_id, name))


@main.group()
def site():
    """Sites known to the controller."""


@site.command("list")
@json_output
def site_list(ctx, as_json):
    """Configured sites, with the status the controller last reported for each."""
    from .sites import make_sites

    reported = {s.name: asdict(s) for s in Pools(_database(ctx)).list_sites()}
    rows = []
    for name, site in make_sites(_controller_settings(ctx)).items():
        row = reported.pop(name, None) or {"name": name, "kind": site.kind, "status": "UNKNOWN",
                                           "reason": "no controller has reported on it yet", "updated_at": None}
        row["config"] = getattr(getattr(site, "config", None), "path", "") or None
        rows.append(row)
    for row in reported.values():          # reported once, no longer configured here
        rows.append(dict(row, config=None))
    rows.sort(key=lambda r: r["name"])
    if as_json:
        return emit_json(rows)
    from .progress import table
    table(["site", "kind", "status", "reason", "config"],
          [[r["name"], r["kind"], r["status"], r["reason"] or "", r["config"] or ""] for r in rows])


@site.command("check")
@click.argument("name")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the probe job (queue wait included).")
@json_output
def site_check(ctx, name, timeout, as_json):
    """Check that SITE can run workers: Slurm answers, the partition exists, and a probe
    job built like a worker job reaches the database and writes to scratch on a node."""
    from . import sitecheck
    from .sites import make_sites

    settings = _controller_settings(ctx)
    sites = make_sites(settings)
    if name not in sites:
        raise NotFound(f"unknown site '{name}' (known: {', '.join(sorted(sites))}; site configs are read "
                       f"from {settings.sites_dir or 'no directory: set SCALEBOX_SITES_DIR'})")
    site_obj = sites[name]
    say = (lambda text: None) if as_json else (lambda text: click.echo(text, err=True))
    if site_obj.kind == "slurm":
        checks = sitecheck.check_batch(site_obj, settings.dsn, timeout=timeout, progress=say)
    else:
        checks = sitecheck.check_local(site_obj, settings.dsn)
    ok = all(c.ok for c in checks)
    if as_json:
        emit_json({"site": name, "ok": ok, "checks": sitecheck.as_json(checks)})
    else:
        from .progress import table
        table(["check", "result", "detail"], [[c.name, "ok" if c.ok else "FAILED", c.detail] for c in checks])
        click.echo(f"site {name}: {'ready' if ok else 'NOT ready'}")
    sys.exit(0 if ok else 1)


@main.group(name="db")
def db_group():
    """Create, upgrade and locate the database."""


@db_group.command("init")
@click.pass_context
def db_init(ctx):
    """Create the schema (same as upgrade on an empty database)."""
    _upgrade(ctx)


@db_group.command("upgrade")
@click.pass_context
def db_upgrade(ctx):
    """Apply pending schema migrations."""
    _upgrade(ctx)


def _upgrade(ctx) -> None:
    with db.connect(_dsn(ctx)) as conn:
        applied = db.upgrade(conn)
        version = db.schema_version(conn)
    click.echo(f"applied {', '.join(applied)}; schema at version {version}" if applied
               else f"schema already at version {version}")


@db_group.command("url")
@click.pass_context
def db_url(ctx):
    """Print the connection string in use (starting the embedded server if it is the one)."""
    click.echo(_dsn(ctx))


@db_group.command("stop")
def db_stop():
    """Stop the embedded PostgreSQL server."""
    from .db.embedded import EmbeddedPostgres

    stopped = EmbeddedPostgres(config.state_dir() / "postgres").stop()
    click.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")


if __name__ == "__main__":
    main()
