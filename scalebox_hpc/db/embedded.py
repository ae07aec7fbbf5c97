"""A private PostgreSQL server under the user's state directory (the embedded default).

Started on first use and left running for the next command, like a per-user daemon;
``scalebox-hpc db stop`` stops it. It listens on a Unix socket only, in a directory
only its owner can enter. PostgreSQL refuses to run as root, so when root uses the
tool the server runs as an existing unprivileged account ('postgres' if present,
else 'nobody'); no account is created.
"""
from __future__ import annotations

import fcntl
import glob
import importlib.util
import logging
import os
import pwd
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from psycopg.conninfo import make_conninfo

from ..errors import ScaleboxError, last_line

log = logging.getLogger(__name__)

DBNAME = "scalebox"
PORT = 5432  # only names the socket file; no TCP port is opened


class EmbeddedError(ScaleboxError):
    pass


def _candidate_bindirs() -> list[str]:
    found = []
    if os.environ.get("SCALEBOX_PG_BINDIR"):
        found.append(os.environ["SCALEBOX_PG_BINDIR"])
    # The pgserver wheel bundles a full PostgreSQL build; find it without importing
    # pgserver (its import has side effects we do not want).
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.submodule_search_locations:
        found += [os.path.join(p, "pginstall", "bin") for p in spec.submodule_search_locations]
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("pg_ctl"):
        found.append(os.path.dirname(os.path.realpath(shutil.which("pg_ctl"))))
    return [d for d in found if os.path.exists(os.path.join(d, "pg_ctl"))]


def _service_user() -> pwd.struct_passwd | None:
    """None when we are not root (the server runs as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise EmbeddedError("running as root and no 'postgres' or 'nobody' account exists to run the "
                        "embedded PostgreSQL: run scalebox-hpc as an ordinary user or set SCALEBOX_DSN")


class EmbeddedPostgres:
    def __init__(self, base_dir: str | os.PathLike):
        self.base = Path(base_dir)
        self.data = self.base / "pgdata"
        self.sockdir = self.base / "run"
        self.logfile = self.base / "postgres.log"
        self.user = _service_user()

    # -- paths and commands -------------------------------------------------
    @property
    def dsn(self) -> str:
        return make_conninfo(dbname=DBNAME, host=str(self.sockdir), port=PORT, user="postgres")

    def _run(self, bindir: str, prog: str, *args: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [os.path.join(bindir, prog), *args]
        kw = {}
        if self.user is not None:
            kw = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True, cwd=str(self.base), **kw)
        if check and proc.returncode != 0:
            raise EmbeddedError(f"{prog} failed (exit {proc.returncode}): "
                                f"{last_line(proc.stderr or proc.stdout)} "
                                f"(log: {self.logfile})")
        return proc

    def _usable(self, bindir: str) -> bool:
        try:
            return self._run(bindir, "postgres", "--version", check=False, timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def bindir(self) -> str:
        for candidate in _candidate_bindirs():
            if self._usable(candidate):
                return candidate
        # As root, the service account may not reach a PostgreSQL installed under
        # /root (pip's site-packages): use a copy under our own state directory.
        if self.user is not None:
            for candidate in _candidate_bindirs():
                copied = self.base / "pginstall"
                if not copied.exists():
                    shutil.copytree(Path(candidate).parent, copied, symlinks=True)
                if self._usable(str(copied / "bin")):
                    return str(copied / "bin")
        raise EmbeddedError("no usable PostgreSQL found for the embedded database: "
                            "pip install pgserver, or install PostgreSQL, or set SCALEBOX_DSN")

    # -- lifecycle ------------------------------------------------------------
    @contextmanager
    def _lock(self):
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        return self._run(self.bindir(), "pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def ensure_running(self) -> str:
        """Initialise on first use, start if stopped; return the DSN."""
        with self._lock():
            os.chmod(self.base, 0o755 if self.user is not None else 0o700)
            bindir = self.bindir()
            if not (self.data / "PG_VERSION").exists():
                self._init(bindir)
            if self._run(bindir, "pg_ctl", "-D", str(self.data), "status", check=False).returncode != 0:
                self._start(bindir)
            self._ensure_database()
        return self.dsn

    def _init(self, bindir: str) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.data)
        if self.data.exists():
            shutil.rmtree(self.data)  # a half-made cluster from an interrupted init
        for d in (self.data, self.sockdir):
            d.mkdir(mode=0o700, exist_ok=True)
            self._chown(d)
        self.logfile.touch()
        self._chown(self.logfile)
        self._run(bindir, "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-instructions", timeout=180)
        # Settings live in the cluster's own config, so no command line carries paths.
        conf = (f"\n# scalebox-hpc embedded server\nlisten_addresses = ''\nport = {PORT}\n"
                f"unix_socket_directories = '{self.sockdir}'\nmax_connections = 300\n"
                "shared_buffers = 128MB\n")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(conf)

    def _start(self, bindir: str) -> None:
        log.info("starting embedded PostgreSQL (%s)", self.data)
        self.sockdir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.sockdir)
        self._run(bindir, "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                  "start", timeout=90)

    def _ensure_database(self) -> None:
        import psycopg

        admin = make_conninfo(dbname="postgres", host=str(self.sockdir), port=PORT, user="postgres")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(admin, autocommit=True) as conn:
                    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DBNAME,)).fetchone():
                        conn.execute(f"CREATE DATABASE {DBNAME}")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise EmbeddedError(f"embedded PostgreSQL did not accept connections (log: {self.logfile})")
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> bool:
        with self._lock():
            if not (self.data / "PG_VERSION").exists():
                return False
            return self._run(self.bindir(), "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop",
                             check=False).returncode == 0

    def restart(self) -> None:
        self.stop()
        self.ensure_running()
