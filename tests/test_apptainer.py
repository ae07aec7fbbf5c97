"""Modules in real Apptainer containers (tests/env/apptainer-up.sh): the program contract
inside the container in both modes, image failures as task errors, and app-primes with
its calc module in a .sif image through Slurm worker jobs on two nodes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES
from test_faults import query, wait_for
from test_slurm import cli, write_site

SHOW = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "exe": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ)}))
with open("result.txt", "w") as fh:
    fh.write("x" * 10)
"""
BODIES = ["plain", "it's \"quoted\"; $(id) `id` $HOME \\ * ?", "ünïcödé"]


@pytest.fixture
def container_env(sbx_env, apptainer, open_dir):
    env = dict(sbx_env, **apptainer, SCALEBOX_SCRATCH=str(open_dir("sbx-test-scratch-")),
               SBX_LEAK="must-not-reach-the-container")
    env["PATH"] = f"{apptainer['PATH'].split(':')[0]}:{os.environ['PATH']}"
    return env


@pytest.mark.parametrize("mode", ["exec", "instance"])
def test_program_contract_inside_the_container(container_env, dsn, open_dir, mode):
    app = open_dir()
    (app / "code").mkdir()
    (app / "code" / "show.py").write_text(SHOW)
    (app / "code" / "show.py").chmod(0o755)
    (app / "bodies.txt").write_text("".join(b + "\n" for b in BODIES))
    (app / "app.yaml").write_text(
        f"name: contract\nmodules:\n  show:\n    base_image: {container_env['SBX_TEST_IMAGE_SIF']}\n"
        f"    code_path: ./code\n    command: ./show.py\n    container_mode: {mode}\n"
        "    start_task: FILE:bodies.txt\n    environments: [GREETING=hi]\n")
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(app)], env=container_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    rows = query(dsn, "SELECT t.body, e.status_code, e.stdout, e.output_files, e.output_bytes FROM task_exec e "
                      "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s", app_id)
    assert sorted(r[0] for r in rows) == sorted(BODIES)
    for body, code, stdout, files, size in rows:
        assert code == 0, stdout
        seen = json.loads(stdout)
        assert seen["argv"][0] == body                      # byte-exact, no shell in between
        assert isinstance(json.loads(seen["argv"][1]), dict)   # "$2": the headers as JSON
        assert seen["exe"] == "/app/bin/show.py" and seen["cwd"] == "/work"
        env = seen["env"]
        assert env["WORK_DIR"] == "/work" and env["GREETING"] == "hi" and env["APP_ID"] == str(app_id)
        assert env["MODULE_NAME"] == "show" and env["DATA_DIR"].startswith(container_env["SCALEBOX_SCRATCH"])
        assert "SBX_LEAK" not in env and "SCALEBOX_DSN" not in env      # a clean environment
        assert files == ["result.txt"] and size == 10
    logs = "".join(p.read_text() for p in (Path(container_env["SCALEBOX_STATE_DIR"]) / "logs").glob("worker-*.log"))
    if mode == "instance":
        assert "instance sbx-" in logs and "started" in logs
        names = set(re.findall(r"instance (sbx-\S+) of", logs))
        assert names

        def stopped():   # the run ends when the app does; workers stop their instance just after
            listing = subprocess.run(["apptainer", "instance", "list"], env=container_env,
                                     capture_output=True, text=True).stdout
            return not any(name in listing for name in names)
        wait_for(stopped, timeout=30, interval=1, what="the workers' instances to stop")
    else:
        assert "instance sbx-" not in logs


def test_missing_image_and_failed_pull_are_task_errors(container_env, dsn, open_dir):
    """An image gone from the node and a pull that fails end their tasks with -104 and
    the reason; the module with a good image runs on, and the app finishes."""
    app = open_dir()
    gone = app / "gone.sif"
    shutil.copy(container_env["SBX_TEST_IMAGE_SIF"], gone)
    (app / "app.yaml").write_text(
        "name: images\nmodules:\n"
        f"  good:\n    base_image: {container_env['SBX_TEST_IMAGE_SIF']}\n    command: /bin/true\n"
        "    start_task: [g1, g2]\n"
        "  gone:\n    base_image: ./gone.sif\n    command: /bin/true\n    start_task: [x1, x2]\n"
        "  pull:\n    base_image: docker://127.0.0.1:9/nothing:latest\n    command: /bin/true\n"
        "    start_task: [p1, p2]\n")
    sub = subprocess.run([sys.executable, "-m", "scalebox_hpc", "submit", "--json", str(app)], env=container_env,
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    app_id = json.loads(sub.stdout)["id"]
    gone.unlink()                       # e.g. a path the compute nodes do not see
    started = time.monotonic()
    ctl = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "controller"], env=container_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] == "FINISHED",
                 timeout=240, interval=0.5, what="app FINISHED")
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)
    assert time.monotonic() - started < 200, "a failed pull must not hang the worker"
    rows = query(dsn, "SELECT m.name, t.status, e.note FROM tasks t JOIN modules m ON m.id = t.module_id "
                      "JOIN task_exec e ON e.task_id = t.id WHERE t.app_id = %s ORDER BY 1", app_id)
    by_module = {}
    for name, status, note in rows:
        by_module.setdefault(name, []).append((status, note))
    assert [s for s, _ in by_module["good"]] == [0, 0]
    assert all(s == -104 and "image not found on" in n and "gone.sif" in n for s, n in by_module["gone"])
    assert all(s == -104 and "cannot pull docker://127.0.0.1:9/nothing:latest" in n for s, n in by_module["pull"])


def test_app_primes_calc_in_sif_through_slurm(slurm, apptainer, sbx_env, dsn, tmp_path, open_dir):
    write_site(tmp_path / "sites")
    env = dict(sbx_env, **apptainer, SCALEBOX_SITES_DIR=str(tmp_path / "sites"), SLURM_CONF=slurm,
               PRIMES_MAX="20000", RANGE_SIZE="500", GATHER_DIR=str(open_dir()),
               CALC_IMAGE=apptainer["SBX_TEST_IMAGE_SIF"])
    env["PATH"] = f"{apptainer['PATH'].split(':')[0]}:{os.environ['PATH']}"
    proc = cli(env, "run", "--json", "--site", "testcluster", EXAMPLES / "app-primes")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "FINISHED" and summary["result"] == "2262", summary
    rows = query(dsn, "SELECT DISTINCT w.host, w.slurm_job_id IS NOT NULL, m.definition->>'base_image' "
                      "FROM task_exec e JOIN workers w ON w.id = e.worker_id JOIN tasks t ON t.id = e.task_id "
                      "JOIN modules m ON m.id = t.module_id WHERE m.name = 'calc' AND e.status_code = 0")
    assert {host for host, _, _ in rows} == {"n1", "n2"}, rows
    assert all(job and image.endswith(".sif") for _, job, image in rows)
