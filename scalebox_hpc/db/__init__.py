"""The one place that talks to PostgreSQL: connections, migrations, and the named
queries of this package's .sql files (each next to the module that runs it).

Everything else calls the classes of the submodules: ``connection.Database`` (a
connection that survives outages), ``queue.Queue`` (what a worker does), ``apps.Apps``
(apps and their tasks), ``pools.Pools`` (what the controller reads and writes) and
``reporting.Reporting`` (what 'app show', 'task show' and the report read); the task
writes they share are in ``tasks``. They hand back the typed rows of ``rows``.
"""
from __future__ import annotations

import logging
import re
import time
from importlib import resources
from typing import Callable, TypeVar

import psycopg

from ..backoff import Backoff
from ..errors import DatabaseUnavailable, ScaleboxError, first_line
from ..states import sql_constants

log = logging.getLogger(__name__)
T = TypeVar("T")

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.M)
_CONSTANT = re.compile(r"@([A-Z_]+)\b")


def _constants(text: str, source: str) -> str:
    """Put the statuses and codes of states.py in for their @NAMEs (as literals, so that
    a partial index on 'status = -1' still matches)."""
    values = sql_constants()

    def value(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"{source}: unknown constant @{match.group(1)} (see scalebox_hpc/states.py)")
        return str(values[match.group(1)])
    return _CONSTANT.sub(value, text)


def _load_queries() -> dict[str, str]:
    """Every ``-- name:`` query of the .sql files of this package, by name; a name is
    unique across the files, so a query is found without knowing its file."""
    queries: dict[str, str] = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = _NAME.split(_constants(entry.read_text(), entry.name))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2]):
            if name in queries:
                raise KeyError(f"{entry.name}: query {name} is defined twice")
            queries[name] = body.strip()
    return queries


QUERIES = _load_queries()


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = re.match(r"^(\d+)_(\w+)\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found)


LATEST_VERSION = migrations()[-1][0]


def describe(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    info.pop("password", None)
    host = info.get("host", "localhost")
    return f"{info.get('user', '')}@{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


# What a server says while it starts, stops or is full: it will take connections again.
_PASSING = ("the database system is", "too many clients", "connection slots are reserved")


def _refused_for_good(exc: psycopg.OperationalError) -> bool:
    """The server answered and refused this DSN (its FATAL reply is not one of a
    server starting, stopping or full): retrying the same DSN cannot succeed."""
    text = str(exc)
    return "FATAL:" in text and not any(passing in text for passing in _PASSING)


def connect(dsn: str, *, autocommit: bool = True, connect_timeout: int = 10,
            async_commit: bool = False, name: str = "scalebox-hpc") -> psycopg.Connection:
    """name is the application_name pg_stat_activity shows (a pilot's names its worker id)."""
    extra = {"options": "-c synchronous_commit=off"} if async_commit else {}
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=connect_timeout,
                               application_name=name, **extra)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database {describe(dsn)}: {first_line(exc)} "
            "(check SCALEBOX_DSN, the config file or the PG* variables; is PostgreSQL running?)",
            lasting=_refused_for_good(exc)) from exc


def with_retry(fn: Callable[[], T], *, what: str, give_up_after: float | None = None,
               on_retry: Callable[[], None] | None = None, stop: Callable[[], bool] | None = None) -> T:
    """Run fn, retrying with capped exponential backoff while the database is unreachable.

    Workers and the controller use this so that a PostgreSQL restart costs a pause,
    never a lost or duplicated task: every unit of work they retry is one transaction.
    Gives up (DatabaseUnavailable) after give_up_after seconds, when stop() says so, or
    at once when the server refuses the DSN itself (see DatabaseUnavailable.lasting).
    """
    backoff, started = Backoff(0.2, 5.0), time.monotonic()
    while True:
        try:
            return fn()
        except (psycopg.OperationalError, DatabaseUnavailable) as exc:
            if getattr(exc, "lasting", False):
                raise
            if give_up_after is not None and time.monotonic() - started > give_up_after:
                raise DatabaseUnavailable(f"{what}: database unreachable for "
                                          f"{give_up_after:.0f} s: {first_line(exc)}") from exc
            if stop is not None and stop():
                raise DatabaseUnavailable(f"{what}: database unreachable; stopping as asked") from exc
            delay = backoff.failed()
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what, first_line(exc), delay)
            time.sleep(delay)
            if on_retry:
                on_retry()


def schema_version(conn: psycopg.Connection) -> int:
    exists = conn.execute(QUERIES["schema_table_exists"]).fetchone()[0]
    return conn.execute(QUERIES["schema_version"]).fetchone()[0] if exists else 0


def upgrade(conn: psycopg.Connection) -> list[str]:
    """Apply every migration newer than the database, each in its own transaction."""
    applied = []
    with conn.transaction():
        conn.execute(QUERIES["schema_lock"])
        conn.execute(QUERIES["schema_table"])
        current = schema_version(conn)
        for version, name, sql in migrations():
            if version <= current:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute(QUERIES["schema_applied"], {"version": version, "name": name})
            applied.append(f"{version:04d}_{name}")
    for item in applied:
        log.info("applied migration %s", item)
    return applied


def require_schema(conn: psycopg.Connection) -> None:
    version = schema_version(conn)
    if version < LATEST_VERSION:
        what = "has no scalebox-hpc schema" if version == 0 else f"has schema version {version}"
        raise ScaleboxError(f"the database {what} (this scalebox-hpc needs {LATEST_VERSION}): "
                            "run 'scalebox-hpc db upgrade'")
