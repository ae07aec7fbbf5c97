"""Worker behaviour with real processes: argv safety, task files, wake-up, idle exit,
and a database that is down when the worker starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import local_site

from scalebox_hpc import db
from scalebox_hpc.db.embedded import EmbeddedPostgres
from scalebox_hpc.db.apps import Apps
from scalebox_hpc.db.connection import Database
from scalebox_hpc.db.pools import Pools
from test_faults import query, wait_for

ECHO_APP = Path(__file__).parent / "apps" / "echo"

NASTY = [
    "it's \"quoted\" 'twice'",
    "a; touch pwned-semicolon",
    "$(touch pwned-subshell) `touch pwned-backtick` ${HOME}",
    "line one\nline two\n",
    "tab\there | pipe > redirect & background",
    "ünïcödé ✓ 日本",
    "-n",
]


@pytest.fixture
def echo_app(sbx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = sbx("submit", "--json", ECHO_APP, env={"OUT_DIR": str(out)}, check=0)
    return json.loads(proc.stdout)["id"], out


def run_controller_until_done(sbx_env, dsn, app_id, env=None, timeout=120):
    ctl = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "controller"], env={**sbx_env, **(env or {})},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] == "FINISHED",
                 timeout=timeout, interval=0.2, what="app FINISHED")
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)


def test_bodies_reach_the_program_byte_exact(sbx, sbx_env, dsn, echo_app, tmp_path):
    app_id, out = echo_app
    sbx("task", "add", app_id, "echo", "--", *NASTY, check=0)   # "--": bodies may start with "-"
    big = tmp_path / "big.txt"
    big.write_text("x" * (100 * 1024) + "\n" + "y" * (1024 * 1024) + "\n")  # 100 KiB (argv) and 1 MiB (file)
    sbx("task", "add", app_id, "echo", "--file", big, check=0)
    run_controller_until_done(sbx_env, dsn, app_id, env={"OUT_DIR": str(out)})
    rows = query(dsn, "SELECT id, body, status FROM tasks WHERE app_id = %s", app_id)
    assert len(rows) == len(NASTY) + 2
    assert sorted(r[1] for r in rows) == sorted(NASTY + ["x" * 102400, "y" * 1048576])
    for task_id, body, status in rows:
        assert status == 0
        assert (out / str(task_id)).read_bytes() == body.encode(), f"task {task_id} body differs"
    for d in (out, tmp_path, Path.cwd()):
        assert not list(d.glob("pwned-*")), "a body was interpreted by a shell"


def test_malformed_sink_line_fails_the_task_and_applies_nothing(sbx, sbx_env, dsn, echo_app):
    app_id, out = echo_app
    sbx("task", "add", app_id, "echo", "emit:1", check=0)
    run_controller_until_done(sbx_env, dsn, app_id, env={"OUT_DIR": str(out)})
    (status,), = query(dsn, "SELECT status FROM tasks WHERE app_id = %s AND body = 'emit:1'", app_id)
    assert status == -101
    assert query(dsn, "SELECT count(*) FROM tasks WHERE app_id = %s", app_id)[0][0] == 1  # good-line not routed
    (stderr, note), = query(dsn, "SELECT stderr, note FROM task_exec")
    assert "sink-tasks.txt line 2" in stderr and "sink-tasks.txt line 2" in note


def test_idle_worker_wakes_on_new_task_and_exits_when_idle(sbx, sbx_env, dsn, echo_app):
    app_id, out = echo_app
    env = {**sbx_env, "OUT_DIR": str(out), "SCALEBOX_IDLE_SECONDS": "4"}
    ctl = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "controller"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sbx("task", "add", app_id, "sink", "sleep:12", check=0)   # keeps the app RUNNING meanwhile
        sbx("task", "add", app_id, "echo", "first", check=0)
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = 0")[0][0] == 1, what="first")
        time.sleep(1.5)        # the worker is idle now, waiting for a notification
        sbx("task", "add", app_id, "echo", "second", check=0)
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = 0")[0][0] == 2, what="second")
        (wait,), = query(dsn, "SELECT extract(epoch from e.t_claimed - t.inserted_at) FROM task_exec e "
                              "JOIN tasks t ON t.id = e.task_id WHERE t.body = 'second'")
        # One pilot serves both modules (the sleeping sink and echo): it took the second
        # task while its other lane slept.
        workers = query(dsn, "SELECT count(DISTINCT e.worker_id) FROM task_exec e")[0][0]
        assert workers == 1, "the idle lane should have taken the second task"
        assert query(dsn, "SELECT count(*) FROM workers")[0][0] == 1
        assert float(wait) < 0.5, f"idle worker took {wait} s to notice a new task"
        (status, message), = wait_for(
            lambda: query(dsn, "SELECT w.status, w.message FROM workers w WHERE w.status = 'EXITED'"),
            timeout=40, what="exit")
        # Its lanes idle, the pilot leaves once the app has nothing left (the controller
        # finishes it within its idle time).
        assert message in ("app is FINISHED", "idle for 4 s")
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)


def test_worker_waits_for_a_database_that_is_down(tmp_path):
    base = tempfile.mkdtemp(prefix="sbx-test-pg-down-")
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(base)
    dsn = server.ensure_running()
    try:
        with db.connect(dsn) as conn:
            db.upgrade(conn)
        database = Database(dsn)
        mod = {"name": "m", "site": "local", "command": "@noop", "base_image": "host", "retry_rules": []}
        apps, pools = Apps(database), Pools(database)
        app_id = apps.create_app({"name": "t", "site": "local"}, [mod], [("m", "a"), ("m", "b")])
        module_id = apps.module_id(app_id, "m")
        worker_id = pools.create_worker(module_id, "local", 600)
        other_id = pools.create_worker(module_id, "local", 600)
        database.close()
        server.stop()
        env = dict(os.environ, SCALEBOX_DSN=dsn)
        # A worker asked to stop while it waits for the database stops, and promptly.
        other = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "worker", "--worker-ids", str(other_id),
                                  "--scratch", str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(2)
        other.terminate()
        assert other.wait(timeout=10) == 3
        proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "worker", "--worker-ids", str(worker_id),
                                 "--scratch", str(tmp_path), "--idle-seconds", "1"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        assert proc.poll() is None, "the worker gave up instead of waiting for the database"
        server.ensure_running()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "database unavailable" in out and "retrying in" in out
        assert query(dsn, "SELECT count(*) FROM tasks WHERE status = 0")[0][0] == 2
    finally:
        server.stop(mode="immediate")


def test_task_cpus_sets_omp_num_threads_unless_set(sbx, sbx_env, dsn, tmp_path):
    local_site(sbx_env, tmp_path, cpus=4)
    app = tmp_path / "omp"
    (app / "code").mkdir(parents=True)
    prog = app / "code" / "threads.sh"
    prog.write_text("#!/bin/sh\necho threads=$OMP_NUM_THREADS\n")
    prog.chmod(0o755)
    (app / "app.yaml").write_text(
        "name: omp\n"
        "modules:\n"
        "  four:\n    base_image: host\n    code_path: ./code\n    command: ./threads.sh\n    task_cpus: 4\n"
        "  told:\n    base_image: host\n    code_path: ./code\n    command: ./threads.sh\n    task_cpus: 4\n"
        "    environments: [OMP_NUM_THREADS=1]\n")
    app_id = json.loads(sbx("submit", "--json", app, check=0).stdout)["id"]
    for module in ("four", "told"):
        sbx("task", "add", app_id, module, "t", check=0)
    run_controller_until_done(sbx_env, dsn, app_id)
    rows = dict(query(dsn, "SELECT m.name, e.stdout FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                           "JOIN modules m ON m.id = t.module_id WHERE t.app_id = %s", app_id))
    assert rows == {"four": "threads=4\n", "told": "threads=1\n"}


def test_programs_get_sigpipe_at_its_default(sbx, sbx_env, dsn, tmp_path):
    # Python ignores SIGPIPE, and an ignored signal is inherited across exec: a task's
    # `producer | head -1` must end the producer with SIGPIPE, as in a shell, instead of
    # leaving it writing into a closed pipe (errors on stderr, or a loop that never ends).
    app = tmp_path / "pipe"
    app.mkdir()
    prog = app / "pipe.sh"
    prog.write_text("#!/bin/sh\ngrep -E '^Sig(Ign|Blk)' /proc/self/status\nyes | head -1\n")
    prog.chmod(0o755)
    (app / "app.yaml").write_text(f"name: pipe\nmodules:\n  m:\n    base_image: host\n    command: {prog}\n"
                                  "    start_task: x\n")
    app_id = json.loads(sbx("submit", "--json", app, check=0).stdout)["id"]
    run_controller_until_done(sbx_env, dsn, app_id)
    ((code, stdout, stderr),) = query(dsn, "SELECT e.status_code, e.stdout, e.stderr FROM task_exec e "
                                           "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s", app_id)
    masks = dict(line.split(":\t") for line in stdout.splitlines()[:2])
    sigpipe = 1 << (13 - 1)
    assert not int(masks["SigIgn"], 16) & sigpipe and not int(masks["SigBlk"], 16) & sigpipe
    assert (code, stdout.splitlines()[2:], stderr) == (0, ["y"], None)
