"""A database connection that outlives outages, and the base of the classes that run
the named queries on it (Queue, Apps, Pools, Reporting)."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from . import QUERIES, connect, with_retry

T = TypeVar("T")


def listen_on(conn: psycopg.Connection, channel: str) -> None:
    """LISTEN on a channel of this connection (its notifications wait for ``notifies``)."""
    conn.execute(sql.SQL(QUERIES["listen"]).format(channel=sql.Identifier(channel)))


class Database:
    """One connection, opened when first used and again after it broke.

    ``retrying`` runs an operation again after reconnecting while the database is
    down, so callers may treat a PostgreSQL restart as a pause.

    Workers use ``async_commit``: their commits do not wait for the WAL flush. A
    PostgreSQL crash (not a restart) can then forget the last fraction of a second of
    claims and completions, each whole: those tasks simply run again, and since a
    completion and its messages share one transaction, routing stays exactly once.
    """

    def __init__(self, dsn: str, *, async_commit: bool = False, name: str = "scalebox-hpc"):
        self.dsn = dsn
        self.async_commit = async_commit
        self.name = name                          # application_name in pg_stat_activity
        self.channels: tuple[str, ...] = ()      # LISTENed on, again after each reconnect
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if not self.connected:
            self._conn = connect(self.dsn, async_commit=self.async_commit, name=self.name)
            for channel in self.channels:
                listen_on(self._conn, channel)
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    def listen(self, channel: str) -> None:
        """Receive the notifications of ``channel`` from now on, across reconnects."""
        if channel not in self.channels:
            self.channels += (channel,)
        listen_on(self.conn, channel)

    def wait_notify(self, timeout: float) -> list[tuple[str, str]]:
        """(channel, payload) of notifications on the LISTENed channels, waiting up to timeout."""
        return [(n.channel, n.payload) for n in self.conn.notifies(timeout=timeout, stop_after=1)]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def reset(self) -> None:
        """Drop a connection that may be broken; the next use opens a new one."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
            self._conn = None

    def retrying(self, fn: Callable[[], T], *, what: str, give_up_after: float | None = None,
                 stop: Callable[[], bool] | None = None) -> T:
        return with_retry(fn, what=what, give_up_after=give_up_after, on_retry=self.reset, stop=stop)


class Queries:
    """Base of the classes that run named queries on a Database. Each public method of
    a subclass is one transaction unless it says otherwise."""

    def __init__(self, database: Database):
        self.database = database

    def _run(self, name: str, params: dict | None = None) -> psycopg.Cursor:
        """Run a query; a cursor of tuples."""
        return self.database.conn.execute(QUERIES[name], params or {})

    def _rows(self, row: type[T], name: str, params: dict | None = None, **identifiers: str) -> list[T]:
        """Every row of a query as a ``row`` (its {identifiers} spliced in, quoted)."""
        query = QUERIES[name]
        if identifiers:
            query = sql.SQL(query).format(**{k: sql.Identifier(v) for k, v in identifiers.items()})
        cur = self.database.conn.cursor(row_factory=class_row(row))
        return cur.execute(query, params or {}).fetchall()

    def _row(self, row: type[T], name: str, params: dict | None = None) -> T | None:
        cur = self.database.conn.cursor(row_factory=class_row(row))
        return cur.execute(QUERIES[name], params or {}).fetchone()

    def _value(self, name: str, params: dict | None = None) -> Any:
        """The first column of the first row, or None without a row."""
        row = self._run(name, params).fetchone()
        return row[0] if row else None

    def _values(self, name: str, params: dict | None = None) -> list:
        """The first column of every row."""
        return [r[0] for r in self._run(name, params)]

    def _copy(self, name: str) -> AbstractContextManager[psycopg.Copy]:
        """A COPY ... FROM STDIN to write rows to (write_row)."""
        return self.database.conn.cursor().copy(QUERIES[name])

    def _transaction(self) -> AbstractContextManager:
        return self.database.conn.transaction()
