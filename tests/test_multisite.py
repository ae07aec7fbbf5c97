"""Apps across two real sites (two Slurm clusters, each with its own sshd as login node,
from the `two_sites` fixture): the controller reaches both only over SSH (no SLURM_CONF
in its environment), and files produced at one site reach the other site's inbox
through the forwarder, verified."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, REPO
from test_faults import query

ESCAPE_APP = REPO / "tests" / "apps" / "forward-escape"


def cli(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "scalebox_hpc", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def jobs_on(site, prefix):
    """Names of the jobs with this name prefix that cluster `site` has seen."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j"], env=site.slurm_env(),
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.split() if name.startswith(prefix)]


def module_sites(dsn, app_id):
    rows = query(dsn, "SELECT m.name, w.site, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "JOIN modules m ON m.id = t.module_id JOIN workers w ON w.id = e.worker_id "
                      "WHERE t.app_id = %s AND e.status_code = 0 GROUP BY 1, 2", app_id)
    return {(name, site): n for name, site, n in rows}


def test_cross_cluster_primes(sites_env, two_sites, dsn, tmp_path):
    # Both sites pass 'site check' over SSH, probe job on a compute node included.
    for name in ("site-a", "site-b"):
        check = cli(sites_env, "site", "check", "--json", name)
        assert check.returncode == 0 and json.loads(check.stdout)["ok"], check.stdout + check.stderr
    env = dict(sites_env, PRIMES_MAX="20000", RANGE_SIZE="2500", GATHER_DIR=str(tmp_path / "gather"))
    proc = cli(env, "run", "--json", EXAMPLES / "cross-cluster-primes")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "FINISHED" and summary["result"] == "2262"
    app_id = summary["id"]
    assert module_sites(dsn, app_id) == {("scatter", "site-a"): 1, ("calc", "site-b"): 8,
                                         ("gather", "site-a"): 8}
    # Worker jobs went to each site's own cluster, submitted over its login node.
    assert jobs_on(two_sites.b, "sbxb-") and not jobs_on(two_sites.a, "sbxb-")
    assert jobs_on(two_sites.a, "sbxa-") and not jobs_on(two_sites.b, "sbxa-")
    # Every calc attempt forwarded its one file to site A's inbox, with times and bytes on record.
    rows = query(dsn, "SELECT t.body, e.forward_files, e.forward_bytes, e.forwards, "
                      "e.t_forward_end >= e.t_forward_start FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "JOIN modules m ON m.id = t.module_id WHERE t.app_id = %s AND m.name = 'calc'", app_id)
    assert len(rows) == 8
    inbox = tmp_path / "inbox-a"
    for body, files, size, forwards, ordered in rows:
        start, end = body.split(":")
        (fwd,) = forwards
        path = Path(fwd["path"]) / f"primes-{start}-{end}.txt"
        assert files == 1 and ordered and fwd["site"] == "site-a" and fwd["tries"] == 1
        assert path.is_file() and path.stat().st_size == size and inbox in path.parents
    # gather's messages name the forwarded files (in site A's inbox), not calc's WORK_DIR.
    heads = query(dsn, "SELECT t.headers FROM tasks t JOIN modules m ON m.id = t.module_id "
                       "WHERE t.app_id = %s AND m.name = 'gather'", app_id)
    assert all(str(inbox) in h["files"][0] for (h,) in heads)
    assert not list((inbox / ".incoming").iterdir())
    (calc_task,), = query(dsn, "SELECT min(t.id) FROM tasks t JOIN modules m ON m.id = t.module_id "
                               "WHERE t.app_id = %s AND m.name = 'calc'", app_id)
    shown = cli(sites_env, "task", "show", calc_task)
    assert shown.returncode == 0 and "forwarded to site site-a: 1 file(s)" in shown.stdout, shown.stdout
    assert "forward_start" in shown.stdout and "forward_end" in shown.stdout


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_session_of_receiver(inbox: Path, listener_pid: int, done: threading.Event, killed: list):
    """Wait for a receiving process into `inbox` that has started writing, then SIGKILL
    the sshd session serving it (the connection dies mid-transfer)."""
    deadline = time.monotonic() + 300
    while not done.is_set() and time.monotonic() < deadline and not killed:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "scalebox_hpc.transfer" not in cmd or str(inbox) not in cmd or "--commit" in cmd:
                continue
            staged = sum(f.stat().st_size for f in (inbox / ".incoming").rglob("*") if f.is_file()) \
                if (inbox / ".incoming").is_dir() else 0
            if staged < 10 << 20:
                continue
            parent = int(pid)
            while parent > 1:
                parent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
                if cmd.startswith("sshd:") and parent != listener_pid:
                    os.kill(parent, signal.SIGKILL)
                    killed.append((parent, staged))
                    return
        time.sleep(0.02)


def test_app_copy_survives_a_cut_connection(sites_env, two_sites, dsn, tmp_path):
    source = tmp_path / "source"
    (source / "deep" / "er").mkdir(parents=True)
    for i in range(20):
        (source / ("deep" if i % 2 else "") / f"small-{i}.dat").write_bytes(os.urandom(1000 + 37 * i))
    (source / "deep" / "er" / "empty").write_bytes(b"")
    big = source / "deep" / "er" / "big.bin"
    with open(big, "wb") as fh:
        for _ in range(300):
            fh.write(os.urandom(1 << 20))
    dest = tmp_path / "dest"
    inbox_b = tmp_path / "inbox-b"
    listener = int((two_sites.b.ssh_dir / "sshd.pid").read_text())
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_session_of_receiver, args=(inbox_b, listener, done, killed))
    watcher.start()
    try:
        proc = cli(dict(sites_env, SOURCE_DIR=str(source), DEST_DIR=str(dest)), "run", "--json",
                   EXAMPLES / "app-copy")
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "FINISHED" and summary["result"] == "copied 22 files"
    assert killed, "the transfer of the big file was never caught in flight"
    # Every file once, byte for byte, at the same relative path.
    copied = sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert all(_sha(dest / rel) == _sha(source / rel) for rel in copied)
    app_id = summary["id"]
    # The cut transfer was sent again within the same attempt, and each file went once.
    rows = query(dsn, "SELECT t.body, e.status_code, e.forwards FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "JOIN modules m ON m.id = t.module_id WHERE t.app_id = %s AND m.name = 'copy-file'", app_id)
    assert len(rows) == 22 and all(code == 0 for _, code, _ in rows)
    tries = {body: fwd[0]["tries"] for body, _, fwd in rows}
    # (A small file that a lane was sending over the same SSH connection at that moment
    # was cut with it and sent again too; none went more than twice.)
    assert tries["deep/er/big.bin"] == 2 and all(n in (1, 2) for b, n in tries.items() if b != "deep/er/big.bin")
    assert sum(n == 2 for n in tries.values()) <= 2
    assert module_sites(dsn, app_id)[("store-file", "site-b")] == 22
    assert not list((inbox_b / ".incoming").iterdir())


def test_wrong_host_key_submits_nothing(sites_env, two_sites, dsn, tmp_path):
    sites = Path(sites_env["SCALEBOX_SITES_DIR"])
    # Site A's host key filed under site B's address: a man in the middle, as far as we know.
    wrong = tmp_path / "known_hosts_wrong"
    key_a = Path(two_sites.a.known_hosts).read_text().split(None, 1)[1]
    wrong.write_text(f"[127.0.0.1]:{two_sites.b.ssh_port} {key_a}")
    text = (sites / "site-b.yaml").read_text().replace(two_sites.b.known_hosts, str(wrong))
    (sites / "site-b.yaml").write_text(text)

    check = cli(sites_env, "site", "check", "--json", "site-b")
    assert check.returncode == 1
    failed = [c for c in json.loads(check.stdout)["checks"] if not c["ok"]]
    assert len(failed) == 1 and "does not match" in failed[0]["detail"] and str(wrong) in failed[0]["detail"]

    submitted = cli(sites_env, "submit", "--json", "--site", "site-b", EXAMPLES / "hello-scalebox")
    assert submitted.returncode == 0, submitted.stderr
    for _ in range(3):
        step = cli(sites_env, "controller", "--once")
        assert step.returncode == 0, step.stderr
    listed = json.loads(cli(sites_env, "site", "list", "--json").stdout)
    site_b = next(s for s in listed if s["name"] == "site-b")
    assert site_b["status"] == "DEGRADED" and "does not match" in site_b["reason"], site_b
    assert not jobs_on(two_sites.b, "sbxb-hello") and not jobs_on(two_sites.a, "sbxb-hello")


def test_path_escaping_the_work_dir_is_refused(sites_env, two_sites, dsn, tmp_path):
    proc = cli(sites_env, "run", "--json", ESCAPE_APP)
    rows = query(dsn, "SELECT m.name, t.body, t.status, e.note FROM tasks t JOIN modules m ON m.id = t.module_id "
                      "LEFT JOIN task_exec e ON e.task_id = t.id ORDER BY t.id")
    by_body = {(name, body): (status, note) for name, body, status, note in rows}
    status, note = by_body[("emit", "../../../../etc/hostname")]
    assert status == -108 and "contains '..'" in note, (proc.stderr[-2000:], rows)
    assert by_body[("emit", "ok.txt")][0] == 0
    # Only the good message reached site B; nothing of the refused one was sent.
    takes = [(body, status) for (name, body), (status, _) in by_body.items() if name == "take"]
    assert len(takes) == 1 and takes[0][1] == 0 and takes[0][0].endswith("/ok.txt")
    delivered = [p.name for p in (tmp_path / "inbox-b").rglob("*") if p.is_file()]
    assert delivered == ["ok.txt"]


class _AnswerLost:
    """A real connection to a login node whose sbatch answer is lost on the way back
    (the command ran, then the connection 'dropped'), or that drops before sending."""

    def __init__(self, connection, *, ran: bool):
        self.connection, self.ran, self.settings = connection, ran, connection.settings
        self.dropped = 0

    def run(self, argv, input=None, timeout=60.0):
        from scalebox_hpc.ssh import SSHError
        if argv[0] == "sbatch" and not self.dropped:
            self.dropped += 1
            if self.ran:
                self.connection.run(argv, input, timeout)
            raise SSHError("connection reset by peer (injected)", sent=True)
        return self.connection.run(argv, input, timeout)

    def close(self):
        self.connection.close()


@pytest.mark.parametrize("ran", [True, False])
def test_lost_sbatch_answer_neither_loses_nor_doubles_a_job(two_sites, ran):
    from scalebox_hpc.siteconfig import load_site
    from scalebox_hpc.sites.slurm import SchedulerError, SlurmCLI
    from scalebox_hpc.transport import SSHRunner
    from scalebox_hpc.ssh import connect

    site = two_sites.b
    config_file = site.base / "lost-answer.yaml"
    config_file.write_text(site.config_yaml("host=/nonexistent"))
    config = load_site(config_file)
    link = _AnswerLost(connect(config.ssh, site="site-b"), ran=ran)
    cli_b = SlurmCLI(SSHRunner(link))
    name = f"sbx-lost-answer-{'ran' if ran else 'not-ran'}"
    script = f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --output=/dev/null\nsleep 30\n"
    try:
        if ran:
            job = cli_b.submit(script)
            assert jobs_on(site, name) == [name]
            out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%j"], env=site.slurm_env(),
                                 capture_output=True, text=True, check=True).stdout.split()
            assert out == [name]
        else:
            with pytest.raises(SchedulerError, match="nothing was submitted"):
                cli_b.submit(script)
            assert jobs_on(site, name) == []
        assert link.dropped == 1
    finally:
        subprocess.run(["scancel", "-n", name], env=site.slurm_env())
        link.close()


def test_connection_to_login_node_comes_back(two_sites):
    """The controller's one connection per site, cut (its sshd session killed), is
    opened again by the next command."""
    from scalebox_hpc.siteconfig import load_site
    from scalebox_hpc.ssh import SSHConnection, SSHError

    site = two_sites.a
    config_file = site.base / "reconnect.yaml"
    config_file.write_text(site.config_yaml("host=/nonexistent"))
    conn = SSHConnection(load_site(config_file).ssh, site="site-a")
    try:
        status, out, _ = conn.run(["sh", "-c", "echo $PPID"])
        assert status == 0 and conn.connects == 1
        session = int(out.strip())
        # The shell's parent is the sshd process serving this connection.
        assert Path(f"/proc/{session}/cmdline").read_bytes().startswith(b"sshd:")
        os.kill(session, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:                       # a command caught by the cut fails; the next reconnects
            try:
                assert conn.run(["sinfo", "-h", "-o", "%P"])[0] == 0
                break
            except SSHError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert conn.connects == 2
    finally:
        conn.close()


def _site_config(site, tmp_path, **ssh):
    from scalebox_hpc.siteconfig import load_site
    config = yaml.safe_load(site.config_yaml("host=/nonexistent"))
    config["ssh"].update(ssh)
    path = tmp_path / f"site-{site.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_site(path)


def test_mfa_site_through_the_users_control_master(two_sites, tmp_path):
    """With control_path, commands go through the master connection the user opened
    (once, with MFA at a real site): they work while it lives and need no login of
    their own; once it is gone they fail, rather than try to log in."""
    from scalebox_hpc.sites.slurm import SlurmCLI
    from scalebox_hpc.transport import CommandError, SSHRunner
    from scalebox_hpc.ssh import connect

    site = two_sites.a
    sock = tmp_path / "cm"
    master = ["ssh", "-S", str(sock), "-p", str(site.ssh_port), "-i", site.ssh_key, "-o", "IdentitiesOnly=yes",
              "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={site.known_hosts}", "root@127.0.0.1"]
    subprocess.run([*master[:1], "-M", "-f", "-N", *master[1:]], check=True, timeout=30)
    # The key is not needed any more: the socket is the login (as after an MFA prompt).
    config = _site_config(site, tmp_path, control_path=str(sock), key=None)
    slurm = SlurmCLI(SSHRunner(connect(config.ssh, site="site-a")))
    try:
        assert "main" in slurm.partition("main")
        job = slurm.submit("#!/bin/bash\n#SBATCH --job-name=sbx-cm-test\n#SBATCH --output=/dev/null\ntrue\n")
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%j"], env=site.slurm_env(),
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == ["sbx-cm-test"]
    finally:
        subprocess.run([*master[:1], "-O", "exit", *master[1:]], capture_output=True, timeout=30)
    with pytest.raises(CommandError, match="ssh failed"):
        slurm.jobs("sbx-")


def test_site_behind_a_jump_host(two_sites, tmp_path):
    """Site B reached through site A's login node as a bastion (paramiko direct-tcpip),
    both host keys checked."""
    from scalebox_hpc.sites.slurm import SlurmCLI
    from scalebox_hpc.transport import SSHRunner
    from scalebox_hpc.ssh import HostKeyError, connect

    a, b = two_sites.a, two_sites.b
    both = tmp_path / "known_hosts"
    both.write_text(Path(a.known_hosts).read_text() + Path(b.known_hosts).read_text())
    jump = {"host": "127.0.0.1", "port": a.ssh_port, "user": "root", "key": a.ssh_key}
    config = _site_config(b, tmp_path, known_hosts=str(both), jump=jump)
    assert (config.ssh.jump.host, config.ssh.jump.port) == ("127.0.0.1", a.ssh_port)
    slurm = SlurmCLI(SSHRunner(connect(config.ssh, site="site-b")))
    try:
        # sbxb's partition answers: the command ran on B's login node, via A.
        assert "main" in slurm.partition("main")
        assert slurm.run(["printenv", "SLURM_CONF"]).strip() == b.slurm_conf
    finally:
        slurm.run.close()
    # The bastion's own key is checked too: without it in known_hosts, no connection.
    only_b = tmp_path / "known_hosts_b"
    only_b.write_text(Path(b.known_hosts).read_text())
    config = _site_config(b, tmp_path, known_hosts=str(only_b), jump=jump)
    conn = connect(config.ssh, site="site-b")
    with pytest.raises(HostKeyError, match="is not in"):
        conn.run(["true"])
    conn.close()
