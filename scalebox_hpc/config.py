"""Where things live and which database to use.

Database, highest precedence first: ``--dsn``, ``SCALEBOX_DSN``, the config file's
``database.dsn``, libpq's own PG* variables (PGHOST, PGSERVICE, PGDATABASE), and
finally the embedded default: a private PostgreSQL under the state directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError

PG_ENV = ("PGHOST", "PGSERVICE", "PGDATABASE", "PGSERVICEFILE")


def state_dir() -> Path:
    if os.environ.get("SCALEBOX_STATE_DIR"):
        return Path(os.environ["SCALEBOX_STATE_DIR"])
    if os.geteuid() == 0:
        # The embedded server runs as an unprivileged account that cannot enter /root.
        return Path("/var/lib/scalebox-hpc")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "scalebox-hpc"


def config_path() -> Path:
    if os.environ.get("SCALEBOX_CONFIG"):
        return Path(os.environ["SCALEBOX_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "scalebox-hpc" / "config.yaml"


def sites_dir() -> Path | None:
    """Where site configs live: $SCALEBOX_SITES_DIR or the config file's sites_dir (must
    exist), else ~/.config/scalebox-hpc/sites if it exists; None: the local site only."""
    if os.environ.get("SCALEBOX_SITES_DIR"):
        return Path(os.environ["SCALEBOX_SITES_DIR"])
    if load_config().get("sites_dir"):
        return Path(os.path.expanduser(load_config()["sites_dir"]))
    default = config_path().parent / "sites"
    return default if default.is_dir() else None


def load_config() -> dict:
    path = config_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", file=str(path),
                          line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with a 'database' section", file=str(path))
    unknown = set(data) - {"database", "sites_dir"}
    if unknown:
        raise ConfigError(f"unknown key '{sorted(unknown)[0]}' (known: database, sites_dir)", file=str(path))
    db = data.get("database") or {}
    if not isinstance(db, dict) or set(db) - {"dsn"}:
        raise ConfigError("expected 'database: {dsn: ...}'", file=str(path), key="database")
    return data


@dataclass
class DatabaseChoice:
    dsn: str
    source: str          # where it came from, for messages
    embedded: bool


def choose_database(explicit: str | None = None) -> DatabaseChoice:
    """Which database to use, without starting anything."""
    if explicit:
        return DatabaseChoice(explicit, "--dsn", False)
    if os.environ.get("SCALEBOX_DSN"):
        return DatabaseChoice(os.environ["SCALEBOX_DSN"], "SCALEBOX_DSN", False)
    dsn = (load_config().get("database") or {}).get("dsn")
    if dsn:
        return DatabaseChoice(dsn, str(config_path()), False)
    if any(os.environ.get(v) for v in PG_ENV):
        return DatabaseChoice("", "PG* environment variables", False)
    return DatabaseChoice("", f"embedded ({state_dir() / 'postgres'})", True)


def resolve_database(explicit: str | None = None) -> DatabaseChoice:
    """Like choose_database, starting (and upgrading) the embedded server when it is the choice."""
    choice = choose_database(explicit)
    if choice.embedded:
        from . import db
        from .db.embedded import EmbeddedPostgres

        choice.dsn = EmbeddedPostgres(state_dir() / "postgres").ensure_running()
        with db.connect(choice.dsn) as conn:
            db.upgrade(conn)
    return choice


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"expected a number, got {value!r}", key=name) from None
