"""Fixtures that start real services once per test session.

PostgreSQL: a private server (the same embedded code users get) under a temporary
directory; every test gets its own database cloned from a migrated template.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from scalebox_hpc import db
from scalebox_hpc.db.embedded import EmbeddedPostgres

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg():
    # Not under pytest's tmp dir: that is private to root, and as root the server
    # runs as an unprivileged account that must reach its data directory.
    base = tempfile.mkdtemp(prefix="sbx-test-pg-")
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(base)
    dsn = server.ensure_running()   # fails loudly, never skips: the suite needs a real server
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE sbx_template")
    with db.connect(psycopg.conninfo.make_conninfo(dsn, dbname="sbx_template")) as conn:
        db.upgrade(conn)
    server.admin_dsn = admin
    yield server
    server.stop(mode="immediate")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dsn(pg):
    """A fresh, migrated database for one test."""
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE sbx_template")
    return psycopg.conninfo.make_conninfo(pg.dsn, dbname=name)


@pytest.fixture
def sbx_env(dsn, tmp_path):
    """Environment for running the CLI against the test database, with short timings."""
    env = dict(os.environ)
    env.update(SCALEBOX_DSN=dsn, SCALEBOX_STATE_DIR=str(tmp_path / "state"),
               SCALEBOX_LEASE_SECONDS="6", SCALEBOX_IDLE_SECONDS="3", SCALEBOX_POLL_SECONDS="0.3",
               SCALEBOX_CONFIG=str(tmp_path / "no-config.yaml"))
    return env


@pytest.fixture
def sbx(sbx_env):
    """Run 'scalebox-hpc ARGS' as a user would; returns the CompletedProcess."""
    def run(*args, timeout=300, env=None, check=None):
        proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *map(str, args)],
                              env={**sbx_env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc
    return run


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(scope="session")
def slurm():
    """A real Slurm cluster (two fake nodes) for the session; yields its SLURM_CONF."""
    base = tempfile.mkdtemp(prefix="sbx-test-slurm-")
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "slurm-up.sh"), base, "sbxtest", "6917"],
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, SLURM_UP_CLEAN="1"))
    assert up.returncode == 0, f"the Slurm test cluster did not start:\n{up.stderr[-3000:]}"
    conf = os.path.join(base, "slurm.conf")
    os.environ["SLURM_CONF"] = conf          # for the sbatch/squeue calls tests make themselves
    yield conf
    subprocess.run(["bash", str(REPO / "tests" / "env" / "slurm-down.sh"), base], capture_output=True)
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def apptainer():
    """Real Apptainer (tests/env/apptainer-up.sh: sid's apptainer entered through
    bubblewrap as an unprivileged user, and a small Debian image with python3 as a .sif
    and as a sandbox). Kept between runs in $SBX_APPTAINER_DIR (default under /tmp).
    Returns the variables to add to the environment (PATH with the launcher, images)."""
    base = os.environ.get("SBX_APPTAINER_DIR", "/tmp/sbx-apptainer-env")
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "apptainer-up.sh"), base],
                        capture_output=True, text=True, timeout=1800)
    assert up.returncode == 0, f"Apptainer for the tests could not be set up:\n{up.stderr[-3000:]}"
    env = {}
    for line in up.stdout.splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            env[key] = os.path.expandvars(value.strip("'\""))
    # The launcher binds these host paths into its root (the examples' code lives in the repo).
    env["SBX_APPTAINER_BINDS"] = str(REPO)
    return env


@pytest.fixture
def open_dir():
    """A directory the unprivileged Apptainer user can enter (pytest's tmp dir is root's only)."""
    made = []

    def make(prefix="sbx-test-open-"):
        path = tempfile.mkdtemp(prefix=prefix)
        os.chmod(path, 0o755)
        made.append(path)
        return Path(path)
    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
