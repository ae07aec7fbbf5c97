"""The two-site test environment itself (conftest.two_sites): each site's login node is a real
sshd whose sessions submit to that site's own real Slurm cluster, and each login node is only
accepted with its own host key."""
from __future__ import annotations

import subprocess

import paramiko
import pytest

JOB_SCRIPT = "#!/bin/bash\nsleep 1\n"


def connect(site, known_hosts=None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts or site.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=site.ssh_port, username="root", key_filename=site.ssh_key,
                   look_for_keys=False, allow_agent=False, timeout=30, banner_timeout=30,
                   auth_timeout=30)
    return client


def run(client: paramiko.SSHClient, command: str, stdin_text: str = "") -> tuple[int, str, str]:
    stdin, stdout, stderr = client.exec_command(command, timeout=120)
    if stdin_text:
        stdin.write(stdin_text)
    stdin.channel.shutdown_write()
    out, err = stdout.read().decode(), stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def squeue(site, *args: str) -> list[list[str]]:
    """Rows (job id, name) of this site's cluster, asked locally with its SLURM_CONF."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %j", *args],
                          env=site.slurm_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


def test_login_nodes_submit_to_their_own_cluster(two_sites):
    sites = (two_sites.a, two_sites.b)
    assert len({s.ssh_port for s in sites}) == 2 and len({s.slurm_conf for s in sites}) == 2
    job_ids = {}
    for site in sites:
        client = connect(site)
        try:
            code, out, err = run(client, "printenv SLURM_CONF")
            assert (code, out.strip()) == (0, site.slurm_conf), err
            code, out, err = run(client, f"sbatch --parsable -J sbx-env-site-{site.name} "
                                         "-o /dev/null", JOB_SCRIPT)
            assert code == 0, f"sbatch on login node {site.name} failed: {err}"
            job_ids[site.name] = out.strip().split(";")[0]
            assert job_ids[site.name].isdigit(), out
        finally:
            client.close()
    # Both clusters count job ids from 1, so the ids may coincide: the job names tell them apart.
    for site, other in ((two_sites.a, two_sites.b), (two_sites.b, two_sites.a)):
        job_id, name = job_ids[site.name], f"sbx-env-site-{site.name}"
        assert squeue(site, "-j", job_id) == [[job_id, name]]
        assert squeue(other, "-n", name) == [], f"site {site.name}'s job is in cluster {other.name}"


def test_login_node_rejects_other_sites_host_key(two_sites):
    with pytest.raises(paramiko.SSHException):
        connect(two_sites.a, known_hosts=two_sites.b.known_hosts).close()
    # and with its own known_hosts the same connection works
    connect(two_sites.a).close()
