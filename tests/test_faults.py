"""Faults a long run meets: a worker killed mid-task, the controller and PostgreSQL
restarted mid-run. Each run must still finish with every message routed exactly once."""
from __future__ import annotations

import json
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from scalebox_hpc import db
from scalebox_hpc.db.embedded import EmbeddedPostgres

ROUTING_APP = Path(__file__).parent / "apps" / "routing"
N_WORK = 40


def wait_for(predicate, timeout=60.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def query(dsn, sql, *args):
    """One query on a fresh connection (survives server restarts between calls)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as c:
            return c.execute(sql, args).fetchall()
    except psycopg.OperationalError:
        return None


def assert_routed_once(dsn, app_id):
    (status,), = query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)
    assert status == "FINISHED"
    rows = query(dsn, "SELECT m.name, t.status, count(*) FROM tasks t JOIN modules m ON m.id = t.module_id "
                      "WHERE t.app_id = %s GROUP BY 1, 2", app_id)
    assert sorted(rows) == [("sink", 0, N_WORK), ("work", 0, N_WORK)]
    # Exactly one successful execution per task, and bodies that match one to one.
    ok = query(dsn, "SELECT t.id, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                    "WHERE t.app_id = %s AND e.status_code = 0 GROUP BY t.id", app_id)
    assert len(ok) == 2 * N_WORK and all(n == 1 for _, n in ok)
    bodies = query(dsn, "SELECT m.name, t.body FROM tasks t JOIN modules m ON m.id = t.module_id "
                        "WHERE t.app_id = %s", app_id)
    assert sorted(b for m, b in bodies if m == "sink") == sorted(b for m, b in bodies if m == "work")


def held_worker(dsn, app_id):
    """(worker id, pid) of a worker running a program of the app's work module."""
    rows = query(dsn, "SELECT w.id, w.pid FROM workers w JOIN tasks t ON t.worker_id = w.id "
                      "JOIN modules m ON m.id = t.module_id "
                      "WHERE t.app_id = %s AND m.name = 'work' AND t.status = -3 AND w.status = 'RUNNING' "
                      "LIMIT 1", app_id)
    return rows[0] if rows else None


def done_count(dsn, app_id):
    rows = query(dsn, "SELECT count(*) FROM tasks WHERE app_id = %s AND status = 0", app_id)
    return rows[0][0] if rows else 0


def test_worker_killed_mid_task(sbx_env, dsn):
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(ROUTING_APP)],
                            env=dict(sbx_env, WORK_SECONDS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    app_id = wait_for(lambda: (query(dsn, "SELECT max(id) FROM apps") or [[None]])[0][0], what="app")
    worker_id, pid = wait_for(lambda: held_worker(dsn, app_id), what="a running task")
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "FINISHED"
    assert_routed_once(dsn, app_id)
    lost = query(dsn, "SELECT count(*) FROM task_exec WHERE worker_id = %s AND status_code = 123", worker_id)
    assert lost[0][0] >= 1, "the killed worker's task was not recorded as a lost attempt"
    (wstatus,), = query(dsn, "SELECT status FROM workers WHERE id = %s", worker_id)
    assert wstatus == "LOST"


@pytest.fixture
def private_pg():
    """A server of this test's own, to restart without disturbing the others."""
    base = tempfile.mkdtemp(prefix="sbx-test-pg-restart-")
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(base)
    dsn = server.ensure_running()
    with db.connect(dsn) as conn:
        db.upgrade(conn)
    yield server, dsn
    server.stop(mode="immediate")


def children(pid):
    """The child processes of a process, whichever of its threads started them (a
    pilot's lanes are threads)."""
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as fh:
                found += [int(c) for c in fh.read().split()]
        except FileNotFoundError:
            pass
    return found


def test_job_stop_signals_worker_and_program(sbx_env, dsn):
    """What scancel or a preemption does: SIGTERM to the worker and to its program. The
    interrupted attempts are recorded as lost (123, with a note) and retried; nothing else fails."""
    proc = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "run", "--json", str(ROUTING_APP)],
                            env=dict(sbx_env, WORK_SECONDS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    app_id = wait_for(lambda: (query(dsn, "SELECT max(id) FROM apps") or [[None]])[0][0], what="app")
    worker_id, pid = wait_for(lambda: held_worker(dsn, app_id), what="a running task")
    program = wait_for(lambda: children(pid), what="the worker's program")
    os.kill(pid, signal.SIGTERM)
    for child in program:
        os.kill(child, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_routed_once(dsn, app_id)
    rows = query(dsn, "SELECT status_code, note FROM task_exec WHERE worker_id = %s AND status_code <> 0", worker_id)
    # Each program the job's signal reached (one per busy lane) is one interrupted attempt.
    assert len(rows) == len(program) and all(code == 123 and note.startswith("interrupted")
                                             for code, note in rows), (rows, program)
    (status, message), = query(dsn, "SELECT status, message FROM workers WHERE id = %s", worker_id)
    assert status == "EXITED" and message == "drained on SIGTERM"


def test_controller_and_postgres_restart_mid_run(sbx_env, private_pg, tmp_path):
    server, dsn = private_pg
    env = dict(sbx_env, SCALEBOX_DSN=dsn, WORK_SECONDS="0.4")

    def controller():
        return subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "-v", "controller"], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "controller.log", "a"))

    sub = subprocess.run([sys.executable, "-m", "scalebox_hpc", "submit", "--json", str(ROUTING_APP)],
                         env=env, capture_output=True, text=True, check=True)
    app_id = json.loads(sub.stdout)["id"]
    ctl = controller()
    try:
        wait_for(lambda: done_count(dsn, app_id) >= 5, what="first tasks done")
        ctl.kill()                       # SIGKILL: no chance to clean up
        ctl.wait()
        time.sleep(1.0)
        ctl = controller()
        wait_for(lambda: done_count(dsn, app_id) >= 20, what="progress after controller restart")
        server.restart()                 # every connection drops
        wait_for(lambda: (query(dsn, "SELECT status FROM apps WHERE id = %s", app_id) or [[None]])[0][0]
                 == "FINISHED", timeout=120, interval=0.5, what="app FINISHED")
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)
    assert_routed_once(dsn, app_id)


@pytest.fixture
def small_scratch():
    """A 4 MiB file system for node-local scratch (tmpfs; the suite runs as root)."""
    path = tempfile.mkdtemp(prefix="sbx-test-scratch-")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", path], capture_output=True, text=True)
    assert mount.returncode == 0, f"cannot mount a small tmpfs for the full-scratch test: {mount.stderr}"
    yield path
    subprocess.run(["umount", "-l", path])
    os.rmdir(path)


def test_full_scratch_is_a_task_error(sbx, sbx_env, dsn, tmp_path, small_scratch):
    """A task that fills node-local scratch fails with -105 and a note saying so; its
    WORK_DIR is not kept (it would keep the scratch full), and the others run on."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "big.sh").write_text("#!/bin/bash\nhead -c 8388608 /dev/zero > big.bin\n")
    # A small task running while a big one fills the scratch may find it full for a moment
    # (a real failure, but a race): it retries its write for up to 10 s, and only a
    # scratch that stays full (a big task's WORK_DIR kept) fails it.
    (code / "small.sh").write_text("#!/bin/bash\nfor i in $(seq 100); do\n"
                                   "  echo \"$1\" > small.txt 2>/dev/null && exit 0; sleep 0.1\ndone\nexit 1\n")
    for p in code.iterdir():
        p.chmod(0o755)
    (tmp_path / "app.yaml").write_text(
        "name: full\nmodules:\n"
        "  big:\n    base_image: host\n    code_path: ./code\n    command: ./big.sh\n    start_task: [a, b]\n"
        "  small:\n    base_image: host\n    code_path: ./code\n    command: ./small.sh\n"
        "    start_task: [c, d, e, f]\n")
    proc = sbx("run", "--json", tmp_path, env={"SCALEBOX_SCRATCH": small_scratch})
    assert proc.returncode == 0, proc.stderr          # FINISHED: every task ended, some failed
    app_id = json.loads(proc.stdout)["id"]
    rows = query(dsn, "SELECT m.name, t.status, count(*) FROM tasks t JOIN modules m ON m.id = t.module_id "
                      "WHERE t.app_id = %s GROUP BY 1, 2", app_id)
    assert sorted(rows) == [("big", -105, 2), ("small", 0, 4)], rows
    notes = query(dsn, "SELECT e.note, e.output_bytes FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                       "JOIN modules m ON m.id = t.module_id WHERE m.name = 'big'")
    assert all("scratch full" in note and "program exit code 1" in note for note, _ in notes), notes
    small = query(dsn, "SELECT e.output_files, e.output_bytes FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                       "JOIN modules m ON m.id = t.module_id WHERE m.name = 'small'")
    assert all(files == ["small.txt"] and size == 2 for files, size in small), small
    assert not any(name.startswith("failed-task") for _, _, names in os.walk(small_scratch) for name in names)
