"""Site configs: loading, errors that point at file:line, and the rendered Slurm worker script."""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from scalebox_hpc.controller import ControllerSettings
from scalebox_hpc.errors import ConfigError
from scalebox_hpc.siteconfig import (
    DatabaseSettings,
    PoolSettings,
    SiteConfig,
    SlurmSettings,
    load_site,
    load_sites,
    local_site,
    walltime_seconds,
)
from scalebox_hpc.sites.slurm import BatchSite, render_worker_script, sbatch_options

REPO = Path(__file__).resolve().parent.parent
SITE_CONFIGS = REPO / "site-configs"
GOLDEN = Path(__file__).resolve().parent / "golden"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error(tmp_path, text, name="site.yaml") -> str:
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_site(path)
    return str(info.value)


# ---------------------------------------------------------------- loading

def test_example_configs_load():
    sites = load_sites(SITE_CONFIGS)
    assert set(sites) == {"local", "testcluster", "university-cluster", "remote-cluster"}
    remote = sites["remote-cluster"]
    assert (remote.ssh.host, remote.ssh.user, remote.ssh.port) == ("login.hpc.example.org", "astro01", 22)
    assert remote.ssh.key == "~/.ssh/id_ed25519_scalebox" and remote.log_dir and remote.inbox

    test = sites["testcluster"]
    assert test.scheduler == "slurm" and test.scratch_root == "/tmp"
    assert test.slurm.partition == "main" and test.slurm.walltime == "00:10:00" and test.slurm.nodes == 1
    assert test.pool.max_workers == 4 and test.pool.max_queued_jobs == 4
    assert test.path == str(SITE_CONFIGS / "testcluster.yaml")

    uni = sites["university-cluster"]
    assert uni.runtime == "apptainer" and uni.scratch_root == "$TMPDIR" and uni.container_gpu == "nv"
    assert uni.slurm.account and uni.slurm.gres == "gpu:1" and uni.slurm.mem == "32G"
    assert "conda activate scalebox" in uni.slurm.worker_init
    assert uni.database == DatabaseSettings(dsn=None, passfile="/home/alice/.pgpass", service="scalebox")
    assert uni.env["OMP_NUM_THREADS"] == "8"

    local = sites["local"]
    assert local.scheduler == "local" and local.pool.max_workers == 4 and local.scratch_root == "/tmp"


def test_defaults_name_from_file_and_ints_as_strings(tmp_path):
    site = load_site(write(tmp_path / "hpc-1.yml", """
        scheduler: slurm
        slurm:
          nodes: "2"
          walltime: "90"
          drain_seconds: "60"
        pool:
          max_workers: "8"
          poll_seconds: "2.5"
        ssh: {host: login.example.org, port: 22}
    """))
    assert site.name == "hpc-1" and site.line == 1
    assert site.slurm.nodes == 2 and site.slurm.drain_seconds == 60 and site.slurm.walltime == "90"
    assert site.pool == PoolSettings(max_workers=8, poll_seconds=2.5)
    assert (site.ssh.host, site.ssh.port, site.ssh.user) == ("login.example.org", 22, None)


def test_template_relative_to_config(tmp_path):
    write(tmp_path / "tpl" / "mine.j2", "#!/bin/bash\n")
    site = load_site(write(tmp_path / "s.yaml", "scheduler: slurm\ntemplate: tpl/mine.j2\n"))
    assert site.template == str(tmp_path / "tpl" / "mine.j2")
    assert "template not found" in error(tmp_path, "template: nope.j2\n")


def test_local_site():
    site = local_site()
    assert site.name == "local" and site.scheduler == "local" and site.path == ""


# ---------------------------------------------------------------- errors

def test_unknown_key_with_line_and_suggestion(tmp_path):
    message = error(tmp_path, """
        scheduler: slurm
        slurm:
          partiton: main
    """)
    assert message.startswith(f"{tmp_path / 'site.yaml'}:3: slurm.partiton: unknown key 'partiton'")
    assert "did you mean 'partition'?" in message

    message = error(tmp_path, "schedular: slurm\n")
    assert ":1: schedular: unknown key" in message and "did you mean 'scheduler'?" in message
    assert ":2: ssh.hostname: unknown key" in error(tmp_path, "ssh:\n  hostname: x\n")


@pytest.mark.parametrize("ssh, expected", [
    ("{port: 22}", "ssh: 'host' is missing"),
    ("{host: 'a b'}", "ssh.host: invalid host name 'a b'"),
    ("{host: login, port: 70000}", "ssh.port: port 70000 is not a TCP port"),
    ("{host: login, key: id_rsa}", "ssh.key: 'id_rsa' is not an absolute path"),
    ("{host: login, jump: 'u@gw:x'}", "ssh.jump: invalid jump host 'u@gw:x'"),
    ("{host: login, login_shell: 'yes'}", "ssh.login_shell: expected true or false"),
    ("{host: login, password: x}", "ssh.password: unknown key 'password'"),
])
def test_bad_ssh_settings(tmp_path, ssh, expected):
    assert expected in error(tmp_path, f"scheduler: slurm\nssh: {ssh}\n")


def test_ssh_site_needs_absolute_inbox_and_jump_forms(tmp_path):
    assert "inbox: 'data/in' is not an absolute path" in error(tmp_path, "inbox: data/in\n")
    site = load_site(write(tmp_path / "s.yaml", """
        scheduler: slurm
        ssh: {host: login.x.org, user: me, jump: {host: gw.x.org, port: 2222}}
        log_dir: /scratch/me/logs
    """))
    assert (site.ssh.jump.host, site.ssh.jump.port, site.ssh.jump.user) == ("gw.x.org", 2222, None)
    site = load_site(write(tmp_path / "t.yaml", "scheduler: slurm\nssh: {host: h, jump: 'u@gw:2200'}\n"))
    assert (site.ssh.jump.user, site.ssh.jump.host, site.ssh.jump.port) == ("u", "gw", 2200)


@pytest.mark.parametrize("walltime", ["'1:2:3:4'", "abc", "'10:60'", "'1-24'", "'00:00'", "''"])
def test_bad_walltime(tmp_path, walltime):
    message = error(tmp_path, f"scheduler: slurm\nslurm:\n  walltime: {walltime}\n")
    assert ":3: slurm.walltime: " in message


def test_unquoted_sexagesimal_walltime(tmp_path):
    # YAML 1.1 reads 1:00:00 as 3600; Slurm would take that as 3600 minutes.
    message = error(tmp_path, "scheduler: slurm\nslurm:\n  walltime: 1:00:00\n")
    assert ":3: slurm.walltime: write the walltime in quotes" in message


@pytest.mark.parametrize("key, value", [
    ("account", "'$(rm -rf ~)'"), ("partition", "'main; reboot'"), ("qos", "'a b'"),
    ("mem", "'4G`id`'"), ("gres", "\"gpu:'1'\""), ("job_name_prefix", "'x\\ny'"),
])
def test_script_values_are_conservative(tmp_path, key, value):
    message = error(tmp_path, f"scheduler: slurm\nslurm:\n  {key}: {value}\n")
    assert f":3: slurm.{key}: invalid value" in message and "goes into the batch script" in message


@pytest.mark.parametrize("text, needle", [
    ("slurm:\n  extra_sbatch: ['constraint=haswell']\n", "slurm.extra_sbatch: invalid option"),
    ("slurm:\n  worker_init: |\n    module load a\n    module load b\n", "slurm.worker_init: give a list"),
    ("slurm:\n  drain_seconds: 600\n  walltime: '00:05:00'\n", "slurm.drain_seconds: drain_seconds (600)"),
    ("slurm:\n  nodes: 0\n", "slurm.nodes: expected an integer >= 1"),
    ("pool:\n  min_workers: 5\n  max_workers: 2\n", "pool.min_workers: min_workers (5) is more"),
    ("env:\n  1BAD: x\n", "env.1BAD: invalid variable name"),
    ("env:\n  PGPASSWORD: secret\n", "env.PGPASSWORD: no passwords"),
    ("database:\n  passfile: .pgpass\n", "database.passfile: '.pgpass' is not an absolute path"),
    ("runtime: docker\n", "runtime: unknown value 'docker'"),
    ("container_gpu: cuda\n", "container_gpu: unknown value 'cuda'"),
    ("name: -bad\n", "name: invalid site name '-bad'"),
])
def test_invalid_values(tmp_path, text, needle):
    assert needle in error(tmp_path, "scheduler: slurm\n" + text)


@pytest.mark.parametrize("dsn", ["host=db user=sbx password=hunter2",
                                 "postgresql://sbx:hunter2@db/scalebox"])
def test_password_in_dsn(tmp_path, dsn):
    message = error(tmp_path, f"database:\n  dsn: '{dsn}'\n")
    assert ":2: database.dsn: no passwords" in message and "passfile" in message
    assert "hunter2" not in message


def test_slurm_section_on_local_site(tmp_path):
    message = error(tmp_path, "scheduler: local\nslurm:\n  partition: main\n")
    assert ":2: slurm: a 'slurm' section needs 'scheduler: slurm'" in message
    assert "a 'slurm' section needs" in error(tmp_path, "slurm: {}\n")   # local is the default


def test_duplicate_site_names(tmp_path):
    write(tmp_path / "a.yaml", "name: hpc\nscheduler: slurm\n")
    write(tmp_path / "b.yml", "scheduler: slurm\nname: hpc\n")
    with pytest.raises(ConfigError) as info:
        load_sites(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "a.yaml") in message and str(tmp_path / "b.yml") in message
    assert "site 'hpc' is also defined in" in message


def test_malformed_yaml_and_missing_files(tmp_path):
    assert "site.yaml:3: invalid YAML" in error(tmp_path, "slurm:\n  partition: [main\n")
    assert "site config not found" in str(pytest.raises(ConfigError, load_site, tmp_path / "no.yaml").value)
    assert "sites directory not found" in str(pytest.raises(ConfigError, load_sites, tmp_path / "no").value)


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("10:30", 630), ("01:00:00", 3600), ("2-12", 216000),
    ("1-02:30", 95400), ("1-00:00:15", 86415), ("120", 7200),
])
def test_walltime_seconds(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3:4", "1-2:3:4:5", "x", "1h", "00:61", "1-25:00"])
def test_walltime_seconds_rejects(text):
    with pytest.raises(ValueError):
        walltime_seconds(text)


# ---------------------------------------------------------------- the worker script

def one_node_site() -> SiteConfig:
    return SiteConfig(
        name="testcluster", path="", scheduler="slurm",
        slurm=SlurmSettings(partition="main", walltime="00:10:00", drain_seconds=60),
        database=DatabaseSettings(passfile="/home/tester/.pgpass"),
        env={"OMP_NUM_THREADS": "1"})


def two_node_site() -> SiteConfig:
    return SiteConfig(
        name="uni", path="", scheduler="slurm", runtime="apptainer", scratch_root="/local/$SLURM_JOB_ID",
        image_cache="/project/images",
        slurm=SlurmSettings(
            partition="gpu", account="astro-lab", qos="normal", walltime="1-00:00:00", nodes=2,
            cpus_per_task=8, mem="32G", gres="gpu:1", gpus="a100:1",
            extra_sbatch=["--constraint=a100", "--exclusive"],
            worker_init=["module purge", "module load apptainer/1.2",
                         "source /opt/conda/etc/profile.d/conda.sh", "conda activate scalebox"],
            drain_seconds=300),
        database=DatabaseSettings(service="scalebox", passfile="/home/alice/my pg/.pgpass"),
        env={"APPTAINER_CACHEDIR": "/project/cache dir"})


WORKER_ARGV = ["/opt/py/bin/python", "-m", "scalebox_hpc", "worker", "--worker-ids", "7",
               "--scratch", "$TMPDIR"]


def render(site, **kwargs) -> str:
    kwargs.setdefault("job_name", "sbx-primes-calc")
    kwargs.setdefault("worker_argv", WORKER_ARGV)
    kwargs.setdefault("env", {"SCALEBOX_DSN": "host=db.example.org dbname=scalebox user=sbx"})
    kwargs.setdefault("log_dir", "/home/tester/sbx logs")
    return render_worker_script(site, **kwargs)


class CapturingScheduler:
    """Slurm's place in a BatchSite: keeps the scripts it is given."""

    def __init__(self):
        self.scripts: list[str] = []

    def submit(self, script: str) -> str:
        self.scripts.append(script)
        return str(500 + len(self.scripts))

    def max_array_size(self) -> int:
        return 1001


def submitted_script(site: SiteConfig, tmp_path: Path, workers: int, host: str | None = None) -> str:
    """The job script the real site code submits for this many worker rows (ids 7, 8, ...)."""
    site = replace(site, python="/opt/py/bin/python", log_dir="/tmp/sbx golden logs")
    settings = ControllerSettings(dsn="host=db.example.org dbname=scalebox user=sbx", state_dir=str(tmp_path),
                                  lease_seconds=20)
    scheduler = CapturingScheduler()
    jobs = BatchSite(site, settings, scheduler).launch(list(range(7, 7 + workers)),
                                                       {"id": 3, "app_id": 12, "name": "calc"}, host=host)
    assert len(jobs) == workers and len(scheduler.scripts) == 1, (jobs, scheduler.scripts)
    return scheduler.scripts[0]


def check_syntax(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("golden, site, workers, host", [
    ("worker-1node.sbatch", one_node_site, 1, None),
    ("worker-2node-array.sbatch", two_node_site, 20, None),        # an array of 10 two-node jobs
    ("worker-host.sbatch", two_node_site, 1, "gpu03"),            # HOST-BOUND: one node, that one
])
def test_submitted_script_matches_golden(tmp_path, golden, site, workers, host):
    """The script BatchSite.launch hands to sbatch, byte for byte (SBX_UPDATE_GOLDEN=1
    rewrites the files after a deliberate change: review the diff)."""
    script = submitted_script(site(), tmp_path, workers, host)
    if os.environ.get("SBX_UPDATE_GOLDEN"):
        (GOLDEN / golden).write_text(script)
    assert script == (GOLDEN / golden).read_text()
    check_syntax(script, tmp_path)


def test_submitted_worker_command_is_what_the_worker_command_reads(tmp_path):
    """The worker line of a submitted job parses back, through 'scalebox-hpc worker's own
    options, into the launch the site meant."""
    import shlex

    from scalebox_hpc.cli import worker
    from scalebox_hpc.sites.launch import WorkerLaunch

    script = submitted_script(two_node_site(), tmp_path, 20)
    line = next(line for line in script.splitlines() if "scalebox_hpc worker" in line)
    words = shlex.split(line)
    assert words[-1] == "&"                  # the job shell waits for it, to pass signals on
    argv = words[words.index("worker") + 1:-1]
    options = worker.make_context("worker", argv).params
    options.pop("log_file"), options.pop("verbose")
    launch = WorkerLaunch.from_options(**options)
    assert launch == WorkerLaunch(tuple(range(7, 27)), scratch=two_node_site().scratch_root, lease_seconds=20,
                                  idle_seconds=two_node_site().pool.idle_seconds,
                                  walltime_seconds=86400, runtime="apptainer", image_cache="/project/images")
    assert launch.worker_id({"SLURM_ARRAY_TASK_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "1"}) == 26
    with pytest.raises(ValueError, match="no worker id for index 20"):
        launch.worker_id({"SLURM_ARRAY_TASK_ID": "10", "SLURM_JOB_NUM_NODES": "2"})


def test_sbatch_options_quote_values_and_reject_line_breaks():
    site = one_node_site()
    options = sbatch_options(site, job_name="sbx-x", log_dir="/a b")
    assert "--output='/a b/%x-%j.out'" in options and "--signal=B:USR1@60" in options
    with pytest.raises(ValueError):
        sbatch_options(site, job_name="x\necho pwned", log_dir="/tmp")
    with pytest.raises(ValueError):   # sbatch would read it as an escape
        sbatch_options(site, job_name="x", log_dir="/tmp/a\\b")


def test_no_password_in_script(tmp_path):
    site = two_node_site()
    script = render(site)
    assert "password" not in script.lower().replace("pgpassfile", "")
    assert "export PGPASSFILE='/home/alice/my pg/.pgpass'" in script
    assert "export PGSERVICE=scalebox" in script


def run_script(script: str, tmp_path: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run a rendered job script with plain bash: the #SBATCH lines are just comments."""
    path = tmp_path / "job.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30,
                          check=False, **kwargs)


def plain_site() -> SiteConfig:
    return SiteConfig(name="plain", path="", scheduler="slurm")


def test_argv_and_env_values_stay_one_word(tmp_path):
    tricky = "it's a $(touch pwned) `id`; \"x\""
    script = render(plain_site(), worker_argv=["printf", "%s|", "a b", "it's", "$HOME"],
                    env={"TRICKY": tricky})
    proc = run_script(script, tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "a b|it's|$HOME|"

    script = render(plain_site(), worker_argv=["printenv", "TRICKY"], env={"TRICKY": tricky})
    proc = run_script(script, tmp_path, cwd=tmp_path)
    assert proc.stdout == tricky + "\n"
    assert not (tmp_path / "pwned").exists()


def test_exit_status_of_worker_is_the_job_status(tmp_path):
    proc = run_script(render(plain_site(), worker_argv=["sh", "-c", "exit 5"]), tmp_path)
    assert proc.returncode == 5


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_to_the_worker(tmp_path, sig):
    name = sig.name[3:]
    worker = (f'trap "echo drained {name}; exit 3" {name}; echo ready; '
              "while :; do sleep 0.05; done")
    path = tmp_path / "job.sh"
    path.write_text(render(plain_site(), worker_argv=["sh", "-c", worker]))
    with subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)   # as Slurm does with --signal=B:USR1@N: to the batch shell only
        out, _ = proc.communicate(timeout=30)
    assert out == f"drained {name}\n"
    assert proc.returncode == 3   # the worker's own status, not wait's 128+N
