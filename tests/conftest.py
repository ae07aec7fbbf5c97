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
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml

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


def local_site(sbx_env, tmp_path, **keys):
    """Make the local site of these tests a configured one (e.g. cpus=4: each pilot uses
    4 cores whatever this machine has), through a sites directory."""
    sites = tmp_path / "sites"
    sites.mkdir(exist_ok=True)
    (sites / "local.yaml").write_text("name: local\nscheduler: local\n" +
                                      "".join(f"{k}: {v}\n" for k, v in keys.items()))
    sbx_env["SCALEBOX_SITES_DIR"] = str(sites)
    return sites


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
    """A real Slurm cluster (fake nodes n1, n2 in partition main; n3 of 4 CPUs and 2 fake GPUs
    in partition big) for the session; yields its SLURM_CONF."""
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


@dataclass
class SiteEnv:
    """One test site of `two_sites`: a real Slurm cluster and an sshd as its login node.

    Sessions on the login node (root@127.0.0.1:ssh_port, key ssh_key, host key in
    known_hosts) see SLURM_CONF=slurm_conf, set by the sshd's SetEnv. inbox, logs and
    scratch are empty directories (mode 0755) under base for the site's config."""
    name: str            # 'a' or 'b'
    base: Path
    slurm_dir: Path      # tests/env/slurm-up.sh's DIR (logs under slurm_dir/log)
    slurm_conf: str
    ssh_dir: Path        # tests/env/sshd-up.sh's DIR (sshd.pid, sshd.log)
    ssh_port: int
    ssh_key: str
    known_hosts: str
    inbox: Path
    logs: Path
    scratch: Path

    def slurm_env(self) -> dict:
        """os.environ with this site's SLURM_CONF, for running Slurm commands locally."""
        return dict(os.environ, SLURM_CONF=self.slurm_conf)

    def config_yaml(self, dsn: str, **overrides) -> str:
        """The site config (YAML text) for this site; overrides replace top-level keys."""
        config = {
            "name": f"site-{self.name}",
            "scheduler": "slurm",
            "ssh": {"host": "127.0.0.1", "port": self.ssh_port, "user": "root",
                    "key": self.ssh_key, "known_hosts": self.known_hosts},
            "inbox": str(self.inbox),
            "log_dir": str(self.logs),
            "python": sys.executable,
            "scratch_root": str(self.scratch),
            "runtime": "host",
            "database": {"dsn": dsn},
            "slurm": {"partition": "main", "walltime": "00:10:00"},
            "pool": {"max_workers": 4, "max_queued_jobs": 4, "idle_seconds": 10, "poll_seconds": 1},
        }
        config.update(overrides)
        return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


@dataclass
class TwoSites:
    a: SiteEnv
    b: SiteEnv


# Distinct from the `slurm` fixture (sbxtest, 6917..6929): clusters sbxa/sbxb on 7017../7117..
# (slurmd on +11/+12), login-node sshd's on 7031/7131.
_SITES = (("a", "sbxa", 7017, 7031), ("b", "sbxb", 7117, 7131))


@pytest.fixture(scope="session")
def two_sites():
    """Two real sites: per site a Slurm cluster (tests/env/slurm-up.sh) and a private sshd
    (tests/env/sshd-up.sh) as its login node, whose sessions get that cluster's SLURM_CONF.
    Yields TwoSites(a=SiteEnv, b=SiteEnv). Leaves os.environ["SLURM_CONF"] alone."""
    env_dir = REPO / "tests" / "env"
    bases = {name: Path(tempfile.mkdtemp(prefix=f"sbx-test-site-{name}-")) for name, *_ in _SITES}
    for base in bases.values():
        os.chmod(base, 0o755)   # as for `pg`: unprivileged accounts (Apptainer) must reach inbox etc.
    started_slurm, started_sshd = [], []
    try:
        # Both clusters come up at once (the scripts serialize apt/munged with a global lock).
        procs = {}
        for name, cluster, slurm_port, _ in _SITES:
            procs[name] = subprocess.Popen(
                ["bash", str(env_dir / "slurm-up.sh"), str(bases[name] / "slurm"), cluster,
                 str(slurm_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=dict(os.environ, SLURM_UP_CLEAN="1"))
            started_slurm.append(bases[name] / "slurm")
        errors = {}
        for name, cluster, *_ in _SITES:   # wait for both before judging either
            try:
                _, err = procs[name].communicate(timeout=900)
            except subprocess.TimeoutExpired:
                procs[name].kill()       # our own child, by its PID
                _, err = procs[name].communicate()
                err += "\n(slurm-up.sh killed after 900 s)"
            if procs[name].returncode != 0:
                errors[name] = f"Slurm cluster {cluster} (site {name}) did not start:\n{err[-3000:]}"
        assert not errors, "\n".join(errors.values())
        sites = {}
        for name, cluster, _, ssh_port in _SITES:
            base = bases[name]
            slurm_conf = str(base / "slurm" / "slurm.conf")
            ssh_dir = base / "sshd"
            started_sshd.append(ssh_dir)
            up = subprocess.run(["bash", str(env_dir / "sshd-up.sh"), str(ssh_dir), str(ssh_port),
                                 f"SLURM_CONF={slurm_conf}"],
                                capture_output=True, text=True, timeout=900)
            assert up.returncode == 0, \
                f"the login node sshd of site {name} did not start:\n{up.stderr[-3000:]}"
            exported = {}
            for line in up.stdout.splitlines():
                key, sep, value = line.removeprefix("export ").partition("=")
                if sep:
                    exported[key] = value
            dirs = {}
            for sub in ("inbox", "logs", "scratch"):
                dirs[sub] = base / sub
                dirs[sub].mkdir(exist_ok=True)
                os.chmod(dirs[sub], 0o755)
            sites[name] = SiteEnv(
                name=name, base=base, slurm_dir=base / "slurm", slurm_conf=slurm_conf,
                ssh_dir=ssh_dir, ssh_port=int(exported["SSHD_PORT"]), ssh_key=exported["SSHD_KEY"],
                known_hosts=exported["SSHD_KNOWN_HOSTS"], **dirs)
        yield TwoSites(a=sites["a"], b=sites["b"])
    finally:
        for ssh_dir in started_sshd:
            subprocess.run(["bash", str(env_dir / "sshd-down.sh"), str(ssh_dir)], capture_output=True)
        for slurm_dir in started_slurm:
            subprocess.run(["bash", str(env_dir / "slurm-down.sh"), str(slurm_dir)],
                           capture_output=True)


@pytest.fixture
def sites_env(sbx_env, two_sites, dsn, tmp_path):
    """The CLI's environment with site-a and site-b configured; no Slurm of its own."""
    sites = tmp_path / "sites"
    sites.mkdir()
    for site in (two_sites.a, two_sites.b):
        scratch = tmp_path / f"scratch-{site.name}"
        scratch.mkdir()
        inbox = tmp_path / f"inbox-{site.name}"
        (sites / f"site-{site.name}.yaml").write_text(site.config_yaml(
            dsn, scratch_root=str(scratch), inbox=str(inbox),
            slurm={"partition": "main", "walltime": "00:10:00", "job_name_prefix": f"sbx{site.name}"},
            pool={"max_workers": 2, "max_queued_jobs": 4, "idle_seconds": 4, "poll_seconds": 1}))
    env = {k: v for k, v in sbx_env.items() if k != "SLURM_CONF"}
    env.update(SCALEBOX_SITES_DIR=str(sites), SITE_A="site-a", SITE_B="site-b")
    return env
