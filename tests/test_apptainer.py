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
import threading
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES
from test_faults import query, wait_for
from test_slurm import cli, write_site

SHOW = """#!/usr/bin/env python3
import json, os, shutil, subprocess, sys
# upstream's in-task command is on PATH in the container too
subprocess.run(["scalebox", "app", "set-finished", "--job-id=" + os.environ["JOB_ID"], "set inside"], check=True)
print(json.dumps({"argv": sys.argv[1:], "exe": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ),
                  "scalebox": shutil.which("scalebox")}))
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
    assert json.loads(proc.stdout)["result"] == "set inside"
    rows = query(dsn, "SELECT t.body, e.status_code, e.stdout, e.output_files, e.output_bytes FROM task_exec e "
                      "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s", app_id)
    assert sorted(r[0] for r in rows) == sorted(BODIES)
    for body, code, stdout, files, size in rows:
        assert code == 0, stdout
        seen = json.loads(stdout)
        assert seen["argv"][0] == body                      # byte-exact, no shell in between
        assert isinstance(json.loads(seen["argv"][1]), dict)   # "$2": the headers as JSON
        env = seen["env"]
        # exec mode binds WORK_DIR at /work; an instance binds the pilot's scratch there,
        # each lane's WORK_DIR a directory of its own under it.
        if mode == "exec":
            assert env["WORK_DIR"] == "/work"
        else:
            assert re.fullmatch(r"/work/slot-\d+/work-m\d+", env["WORK_DIR"]), env["WORK_DIR"]
        assert seen["exe"] == "/app/bin/show.py" and seen["cwd"] == env["WORK_DIR"]
        assert env["GREETING"] == "hi" and env["APP_ID"] == str(app_id)
        assert env["MODULE_NAME"] == "show" and env["DATA_DIR"].startswith(container_env["SCALEBOX_SCRATCH"])
        assert "SBX_LEAK" not in env and "SCALEBOX_DSN" not in env      # a clean environment
        # upstream's names too
        assert env["JOB_ID"] == env["MODULE_ID"] and env["JOB_NAME"] == "show" and env["IS_SINGULARITY"] == "yes"
        assert seen["scalebox"] == "/scalebox-hpc/bin/scalebox"
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


ARGS = """#!/bin/sh
# Prints each argument between brackets (trailing newlines and empties show), then exits with $EXIT.
for a in "$@"; do printf '[%s]' "$a"; done
printf 'env:%s' "$(env | grep -c SBX_LEAK)"
echo "to stderr" >&2
exit "${EXIT:-0}"
"""


def test_instance_agent_runs_each_task_exactly(container_env, open_dir, monkeypatch):
    """The agent inside an instance: argv byte for byte (empty, trailing newlines, quotes,
    '='), exit codes, stderr, a clean environment, a timeout that keeps partial output,
    a kill from another thread, and the per-task exec fallback for a call too big for it."""
    from scalebox_hpc.runtimes.apptainer import AGENT_FILES, ContainerImage, ContainerRuntime, find_runtime
    from scalebox_hpc.runtimes.base import OutputBuffer

    for key, value in container_env.items():
        monkeypatch.setenv(key, value)
    code = open_dir()
    (code / "args.sh").write_text(ARGS)
    (code / "args.sh").chmod(0o755)
    (code / "slow.sh").write_text("#!/bin/sh\necho started\nsleep 30\n")
    (code / "slow.sh").chmod(0o755)
    scratch = open_dir()
    work, data = scratch / "work", scratch / "data"
    work.mkdir()
    data.mkdir()
    for d in (work, data):
        d.chmod(0o777)
    # The runtime moves into WORK_DIR to start programs (as a worker does): come back after.
    monkeypatch.chdir(work)
    image = ContainerImage(binary=find_runtime(None), image=container_env["SBX_TEST_IMAGE_SIF"], root=str(scratch),
                           code_path=str(code), data_dir=str(data), volumes=[], cache_dir=str(scratch / "cache"),
                           name=f"sbx-agent-test-{os.getpid()}")
    rt = ContainerRuntime(image, mode="instance", workdir=str(work), variables={"EXIT", "WORK_DIR"})
    out, err = OutputBuffer("out", 4096), OutputBuffer("err", 4096)

    def run(body, exit_code=0, program="args.sh", timeout=None):
        env = {"EXIT": str(exit_code), "WORK_DIR": str(work), "SBX_LEAK": "x"}
        return rt.run(str(code / program), body, '{"h": "v"}', env=env, cwd=str(work), timeout=timeout,
                      stdout=out, stderr=err)

    try:
        rt.prepare()
        for body in ["", "two\n\n", "it's \"q\"; $(id) `id` a=b \\ *", "ünï"]:
            result = run(body)
            assert result.code == 0 and result.stdout == f'[{body}][{{"h": "v"}}]env:0', result
            assert result.stderr == "to stderr\n"
        assert rt.agent is not None and rt.agent.poll() is None   # the agent served them all
        agent_pid = rt.agent.pid
        assert run("x", exit_code=3).code == 3
        assert rt.agent.pid == agent_pid
        assert sorted(os.listdir(work)) == []                     # no control file left behind
        slow = run("x", program="slow.sh", timeout=1.5)
        assert slow.code == 124 and slow.timed_out and slow.stdout == "started\n"
        assert "task_max_seconds=1.5" in slow.stderr
        assert run("after").code == 0 and rt.agent.pid != agent_pid   # a new agent took over
        threading.Timer(1.0, rt.kill).start()
        killed = run("x", program="slow.sh")
        assert killed.killed and killed.code != 0
        big = run("y" * (100 * 1024))                              # over the agent's call limit: exec path
        assert big.code == 0 and big.stdout.endswith('yyyy][{"h": "v"}]env:0')
        assert not any(os.path.exists(work / f) for f in AGENT_FILES)
    finally:
        rt.close()
        image.close()


NS = """#!/bin/sh
echo "ns=$(readlink /proc/self/ns/mnt) cuda=$CUDA_VISIBLE_DEVICES slot=$SLOT_ID work=$WORK_DIR pwd=$(pwd)"
sleep 1.5
"""


def test_lanes_run_tasks_side_by_side_in_one_instance(container_env, dsn, open_dir, tmp_path):
    """A pilot of 4 cores and 2 GPUs serving two modules of one image in instance mode:
    one instance for both, its tasks in it at the same time (one mount namespace), each
    in a WORK_DIR of its own, GPU tasks with their own device; the instance is started
    with --nv (the site's container_gpu) and stopped when the pilot leaves."""
    from conftest import local_site

    local_site(container_env, tmp_path, cpus=4, gpus=2, container_gpu="nv")
    app = open_dir()
    (app / "code").mkdir()
    (app / "code" / "ns.sh").write_text(NS)
    (app / "code" / "ns.sh").chmod(0o755)
    image = container_env["SBX_TEST_IMAGE_SIF"]
    modules = "".join(f"  {name}:\n    base_image: {image}\n    code_path: ./code\n    command: ./ns.sh\n"
                      f"    container_mode: instance\n    slots: 2\n    start_task: [{name}1, {name}2, {name}3]\n"
                      + extra for name, extra in (("gpu", "    task_gpus: 1\n"), ("cpu", "")))
    (app / "app.yaml").write_text("name: shared\nmodules:\n" + modules)
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(app)], env=container_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    app_id = json.loads(proc.stdout)["id"]
    rows = query(dsn, "SELECT m.name, e.stdout, e.t_program_start, e.t_program_end, e.worker_id FROM task_exec e "
                      "JOIN tasks t ON t.id = e.task_id JOIN modules m ON m.id = t.module_id "
                      "WHERE t.app_id = %s AND e.status_code = 0", app_id)
    assert len(rows) == 6 and len({r[4] for r in rows}) == 1, "one pilot ran all six"
    seen = [dict(word.split("=", 1) for word in r[1].split()) for r in rows]
    assert len({s["ns"] for s in seen}) == 1, f"all tasks in one instance: {seen}"
    events = sorted([(r[2], 1) for r in rows] + [(r[3], -1) for r in rows], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == 4, "4 tasks at once in the instance"
    assert all(s["work"] == s["pwd"] == f"/work/slot-{s['slot']}/" + s["work"].rsplit("/", 1)[1] for s in seen)
    gpu = [s for (name, *_), s in zip(rows, seen) if name == "gpu"]
    assert {s["cuda"] for s in gpu} == {"0", "1"}
    assert all(s.get("cuda", "") == "" for (name, *_), s in zip(rows, seen) if name == "cpu")
    logs = Path(container_env["SCALEBOX_STATE_DIR"]) / "logs"

    def log_text():
        return "".join(p.read_text() for p in logs.glob("worker-*.log"))
    started = re.findall(r"instance (sbx-\S+) of \S+ started with --nv$", log_text(), re.M)
    assert len(started) == 1, log_text()[-2000:]
    # The run ends with the app; the pilot stops its instance just after.
    wait_for(lambda: f"instance {started[0]} stopped" in log_text(), timeout=30, interval=0.5,
             what="the instance to stop")


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
