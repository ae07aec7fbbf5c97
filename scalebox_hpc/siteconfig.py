"""Load and validate site configs: the sites directory's YAML files, one per site.

A site config is the only place that knows a site's quirks. Everything that ends up in a
batch script is checked here, at load time, with file:line and key path in every error
(values for '#SBATCH' lines are whitelisted characters; no password anywhere); the job
script itself is rendered by sites/slurm/jobscript.py, every value shell-quoted.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .yamlcheck import Checker, Entry, LineMap, describe, parse_yaml
from .errors import ConfigError
from .ssh import SSHSettings, parse_jump
from .states import CONTAINER_GPU_FLAGS, RUNTIMES

SCHEDULERS = ("local", "slurm")
SSH_KEYS = ("host", "port", "user", "key", "jump", "known_hosts", "control_path", "control_persist",
            "login_shell", "connect_timeout")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values written into '#SBATCH' lines: nothing a shell or sbatch's own parser treats specially.
_SCRIPT_VALUE = re.compile(r"[A-Za-z0-9_.:,=+\-/@%]+")
_SCRIPT_CHARS = "letters, digits and _.:,=+-/@%"
_WALLTIME = re.compile(r"(?:(\d+)-)?(\d+(?::\d+){0,2})")



@dataclass
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    walltime: str = "01:00:00"
    nodes: int = 1                    # nodes per worker job; one worker per node
    cpus_per_task: int | None = None
    mem: str | None = None
    gres: str | None = None
    gpus: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    worker_init: list[str] = field(default_factory=list)   # trusted site-admin shell, verbatim
    drain_seconds: int = 120          # --signal=B:USR1@<drain_seconds>
    max_array_size: int | None = None  # None: read from 'scontrol show config' at run time
    job_name_prefix: str = "sbx"


@dataclass
class PoolSettings:
    min_workers: int = 0
    max_workers: int = 16
    max_queued_jobs: int = 8
    max_submissions_per_minute: int = 30
    idle_seconds: float = 60.0
    poll_seconds: float = 5.0


@dataclass
class DatabaseSettings:
    """How compute nodes reach PostgreSQL; never a password (that lives in a pgpass file)."""
    dsn: str | None = None
    passfile: str | None = None
    service: str | None = None


@dataclass
class SiteConfig:
    name: str
    path: str                          # file it came from ('' for the built-in local site)
    scheduler: str = "local"
    runtime: str | None = None         # None: apptainer or singularity, whichever the node has
    container_gpu: str = "none"        # nv / rocm: containers of a pilot with GPUs get --nv / --rocm
    image_cache: str | None = None
    scratch_root: str | None = None    # may hold $VARS, expanded on the node at run time
    inbox: str | None = None           # where data forwarded from other sites arrives (on the site)
    log_dir: str | None = None         # worker job output (on the site); None: the controller's
    python: str | None = None          # None: the controller's sys.executable
    template: str | None = None        # absolute path of an override template
    cpus: int | None = None            # cores of one pilot (worker job node); None: local all, Slurm's say
    gpus: int | None = None            # GPUs of one pilot outside Slurm (ids 0..n-1); None: none
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    env: dict[str, str] = field(default_factory=dict)
    ssh: SSHSettings | None = None     # None: Slurm commands run on this machine
    line: int = 0


def local_site() -> SiteConfig:
    """The built-in site: workers are processes on this machine."""
    return SiteConfig(name="local", path="")


def walltime_seconds(text: str) -> int:
    """Slurm time string (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> seconds.

    Raises ValueError for anything else.
    """
    match = _WALLTIME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid time {text!r}: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, clock = match.groups()
    parts = [int(part) for part in clock.split(":")]
    if days is None:
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    else:
        units = (3600, 60, 1)[:len(parts)]
        if parts[0] >= 24:
            raise ValueError(f"invalid time {text!r}: hours after 'D-' must be below 24")
    if any(part >= 60 for part in parts[1:]):
        raise ValueError(f"invalid time {text!r}: minutes and seconds must be below 60")
    return int(days or 0) * 86400 + sum(part * unit for part, unit in zip(parts, units))


# ---------------------------------------------------------------- loading

def _known(cls) -> dict[str, str]:
    return {f.name: f.name for f in fields(cls)}


_TOP_KEYS = {key: key for key in _known(SiteConfig) if key not in ("path", "line")}


class _SiteParser(Checker):
    """Site config checks."""

    def site(self, doc: Any, default_name: str, path: str) -> SiteConfig:
        if doc is None:
            raise self.error("the site config is empty: set at least 'scheduler'", line=1)
        if not isinstance(doc, LineMap):
            raise self.error(f"expected a mapping of site settings, got {describe(doc)}")
        entries = self.collect(doc, "", _TOP_KEYS, {})

        name_entry = entries.get("name")
        name = (self.text(name_entry) or "").strip() if name_entry else default_name
        if not _SITE_NAME.fullmatch(name):
            raise self.error(f"invalid site name '{name}': use letters, digits, '_', '.', '-' (not first)",
                             "name", name_entry.line if name_entry else None)
        site = SiteConfig(name=name, path=path, line=doc.line)

        for key, choices in (("scheduler", SCHEDULERS), ("runtime", RUNTIMES),
                             ("container_gpu", tuple(CONTAINER_GPU_FLAGS))):
            if key in entries:
                setattr(site, key, self.choice(entries[key], choices))
        for key in ("image_cache", "scratch_root", "inbox", "python", "log_dir"):
            if key in entries:
                setattr(site, key, self.line_text(entries[key]))
        for key in ("inbox", "log_dir"):
            value = getattr(site, key)
            if value and not os.path.isabs(value):
                raise self.error(f"'{value}' is not an absolute path: give the directory as seen on the "
                                 "site's nodes", key, entries[key].line)
        if "template" in entries:
            site.template = self.template(entries["template"])
        for key, least in (("cpus", 1), ("gpus", 0)):
            if key in entries:
                setattr(site, key, self.integer(entries[key], least))
        if "env" in entries:
            site.env = self.env(entries["env"])
        if "ssh" in entries:
            site.ssh = self.ssh(entries["ssh"])

        if "slurm" in entries:
            if site.scheduler != "slurm":
                entry = entries["slurm"]
                raise self.error(f"a 'slurm' section needs 'scheduler: slurm' (this site's scheduler "
                                 f"is '{site.scheduler}')", entry.key, entry.line)
            site.slurm = self.slurm(entries["slurm"])
        if "pool" in entries:
            site.pool = self.pool(entries["pool"])
        if "database" in entries:
            site.database = self.database(entries["database"])
        return site

    def section(self, entry: Entry, cls,
                converters: Mapping[str, Callable[[Entry], Any]]) -> tuple[Any, dict]:
        """Build `cls` from a section, converting each key given; also return the entries."""
        entries = self.collect(self.mapping(entry), entry.key, _known(cls), {})
        settings = cls()
        for key, sub in entries.items():
            value = converters[key](sub)
            if value is not None:
                setattr(settings, key, value)
        return settings, entries

    def slurm(self, entry: Entry) -> SlurmSettings:
        script_value = self.script_value
        settings, entries = self.section(entry, SlurmSettings, {
            "partition": script_value, "account": script_value, "qos": script_value,
            "mem": script_value, "gres": script_value, "gpus": script_value,
            "job_name_prefix": script_value,
            "walltime": self.walltime,
            "nodes": lambda e: self.integer(e, 1),
            "cpus_per_task": lambda e: self.integer(e, 1),
            "drain_seconds": lambda e: self.integer(e, 1),
            "max_array_size": lambda e: self.integer(e, 1),
            "extra_sbatch": self.extra_sbatch,
            "worker_init": self.lines,
        })
        if settings.drain_seconds >= walltime_seconds(settings.walltime):
            where = entries.get("drain_seconds") or entries["walltime"]
            raise self.error(f"drain_seconds ({settings.drain_seconds}) must be less than the walltime "
                             f"({settings.walltime}): workers get the drain signal that long before the end",
                             where.key, where.line)
        return settings

    def pool(self, entry: Entry) -> PoolSettings:
        settings, entries = self.section(entry, PoolSettings, {
            "min_workers": lambda e: self.integer(e, 0),
            "max_workers": lambda e: self.integer(e, 1),
            "max_queued_jobs": lambda e: self.integer(e, 1),
            "max_submissions_per_minute": lambda e: self.integer(e, 1),
            "idle_seconds": lambda e: self.number(e, 0),
            "poll_seconds": lambda e: self.number(e, 0.1),
        })
        if settings.min_workers > settings.max_workers:
            where = entries["min_workers"]
            raise self.error(f"min_workers ({settings.min_workers}) is more than max_workers "
                             f"({settings.max_workers})", where.key, where.line)
        return settings

    def database(self, entry: Entry) -> DatabaseSettings:
        settings, _ = self.section(entry, DatabaseSettings, {
            "dsn": self.dsn, "passfile": self.passfile, "service": self.line_text,
        })
        return settings

    # -- values

    def line_text(self, entry: Entry) -> str | None:
        value = (self.text(entry) or "").strip()
        if "\n" in value or "\r" in value:
            raise self.error("must be a single line", entry.key, entry.line)
        return value or None

    def script_value(self, entry: Entry) -> str | None:
        value = self.text(entry)
        if value is None:
            return None
        if not _SCRIPT_VALUE.fullmatch(value):
            raise self.error(f"invalid value {value!r}: only {_SCRIPT_CHARS} are allowed "
                             "(no spaces, quotes, '$', backticks or ';'; it goes into the batch script)",
                             entry.key, entry.line)
        return value

    def walltime(self, entry: Entry) -> str | None:
        if entry.value is None:
            return None
        if isinstance(entry.value, int) and not isinstance(entry.value, bool):
            # YAML 1.1 reads an unquoted 1:00:00 as the number 3600, which Slurm would take as minutes.
            raise self.error(f"write the walltime in quotes, e.g. '01:00:00' or '{entry.value}' "
                             "(unquoted, YAML reads 1:00:00 as a number)", entry.key, entry.line)
        value = self.script_value(entry)
        try:
            seconds = walltime_seconds(value or "")
        except ValueError as exc:
            raise self.error(str(exc), entry.key, entry.line) from None
        if seconds == 0:
            raise self.error("the walltime must be more than zero", entry.key, entry.line)
        return value

    def lines(self, entry: Entry) -> list[str]:
        items = self.string_list(entry, split_commas=False)
        for item in items:
            if "\n" in item or "\r" in item:
                raise self.error("give a list with one line per item (a line break was found inside one)",
                                 entry.key, entry.line)
        return items

    def extra_sbatch(self, entry: Entry) -> list[str]:
        items = self.lines(entry)
        for item in items:
            if not item.startswith("-"):
                raise self.error(f"invalid option {item!r}: write it as on the sbatch command line, "
                                 "e.g. '--constraint=haswell'", entry.key, entry.line)
        return items

    def env(self, entry: Entry) -> dict[str, str]:
        values: dict[str, str] = {}
        mapping = self.mapping(entry)
        for key, value in mapping.items():
            sub = Entry(value, f"{entry.key}.{key}", mapping.line_of(key), str(key))
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                raise self.error(f"invalid variable name '{key}'", sub.key, sub.line)
            if key == "PGPASSWORD":
                raise self.error("no passwords in site configs: use database.passfile (a 0600 pgpass file)",
                                 sub.key, sub.line)
            values[key] = "" if value is None else self.scalar(value, sub)
        return values

    def ssh(self, entry: Entry) -> SSHSettings | None:
        if entry.value is None:
            return None
        return self.ssh_fields(entry, SSH_KEYS, "'host' is missing: the login node to run sbatch on")

    def ssh_fields(self, entry: Entry, keys: Sequence[str], missing_host: str) -> SSHSettings:
        """SSHSettings from a mapping that may hold these keys (the login node's, or a jump host's)."""
        entries = self.collect(self.mapping(entry), entry.key, {key: key for key in keys}, {})
        if "host" not in entries:
            raise self.error(missing_host, entry.key, entry.line)
        settings = SSHSettings(host=self.host_name(entries["host"]))
        for key, sub in entries.items():
            if key == "port":
                settings.port = self.integer(sub, 1) or 22
                if settings.port > 65535:
                    raise self.error(f"port {settings.port} is not a TCP port", sub.key, sub.line)
            elif key == "user":
                settings.user = self.script_value(sub)
            elif key in ("key", "known_hosts", "control_path"):
                value = self.line_text(sub)
                if value and not os.path.isabs(os.path.expanduser(value)):
                    raise self.error(f"'{value}' is not an absolute path (or ~/...)", sub.key, sub.line)
                setattr(settings, key, value)
            elif key == "control_persist":
                settings.control_persist = self.integer(sub, 0) or 0
            elif key == "connect_timeout":
                settings.connect_timeout = self.number(sub, 1) or settings.connect_timeout
            elif key == "login_shell":
                if not isinstance(sub.value, bool):
                    raise self.error(f"expected true or false, got {describe(sub.value)}", sub.key, sub.line)
                settings.login_shell = sub.value
            elif key == "jump":
                settings.jump = self.jump(sub)
        return settings

    def host_name(self, entry: Entry) -> str:
        value = (self.text(entry) or "").strip()
        if not _HOST.fullmatch(value):
            raise self.error(f"invalid host name {value!r}", entry.key, entry.line)
        return value

    def jump(self, entry: Entry) -> SSHSettings | None:
        if entry.value is None:
            return None
        if not isinstance(entry.value, str):
            return self.ssh_fields(entry, ("host", "port", "user", "key"), "'host' is missing")
        try:
            jump = parse_jump(entry.value.strip())
        except ValueError as exc:
            raise self.error(str(exc), entry.key, entry.line) from None
        if not _HOST.fullmatch(jump.host):
            raise self.error(f"invalid host name {jump.host!r}", entry.key, entry.line)
        return jump

    def template(self, entry: Entry) -> str | None:
        """An override job script template, resolved against the site config's folder."""
        value = self.line_text(entry)
        path = self.resolve(value) if value is not None else None
        if path is not None and not os.path.isfile(path):
            raise self.error(f"template not found: {path}", entry.key, entry.line)
        return path

    def dsn(self, entry: Entry) -> str | None:
        value = self.line_text(entry)
        if value is None:
            return None
        try:
            parts = conninfo_to_dict(value)
        except psycopg.Error:   # libpq's message may quote part of the string, which may hold a secret
            raise self.error("cannot parse as a libpq connection string (key=value pairs or a "
                             "postgresql:// URI)", entry.key, entry.line) from None
        if "password" in parts:
            raise self.error("no passwords in site configs: remove it from the dsn and put it in a pgpass "
                             "file (mode 0600) named by database.passfile", entry.key, entry.line)
        return value

    def passfile(self, entry: Entry) -> str | None:
        value = self.line_text(entry)
        if value is not None and not os.path.isabs(value):
            raise self.error(f"'{value}' is not an absolute path: give the pgpass file's path as seen "
                             "on the compute nodes", entry.key, entry.line)
        return value


def load_site(path: str | os.PathLike) -> SiteConfig:
    """Read and validate one site config; raise ConfigError on any problem."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("site config not found", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read site config: {exc}", file=file) from None
    absolute = os.path.abspath(file)
    parser = _SiteParser(file, os.path.dirname(absolute))
    return parser.site(parse_yaml(text, file), Path(file).stem, absolute)


def load_sites(directory: str | os.PathLike) -> dict[str, SiteConfig]:
    """Every *.yaml / *.yml site config in `directory`, by site name."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError("sites directory not found", file=os.fspath(directory))
    sites: dict[str, SiteConfig] = {}
    for file in sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        site = load_site(file)
        if site.name in sites:
            raise ConfigError(f"site '{site.name}' is also defined in {sites[site.name].path}: "
                              "site names must be unique", file=str(file), key="name", line=site.line)
        sites[site.name] = site
    return sites
