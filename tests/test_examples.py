"""The examples of SPEC section 9, run end to end with the real CLI on a real PostgreSQL."""
from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES


def run_app(sbx, name, env=None, expect=0):
    proc = sbx("run", "--json", EXAMPLES / name, env=env, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def executions(conn, app_id):
    """{body: [status codes of each attempt, in order]}"""
    rows = conn.execute(
        "SELECT t.body, e.status_code FROM tasks t JOIN task_exec e ON e.task_id = t.id "
        "WHERE t.app_id = %s ORDER BY t.id, e.attempt", (app_id,)).fetchall()
    out: dict[str, list[int]] = {}
    for body, code in rows:
        out.setdefault(body, []).append(code)
    return out


def test_hello_scalebox(sbx):
    summary = run_app(sbx, "hello-scalebox")
    assert summary["status"] == "FINISHED"
    assert summary["result"] == "Hello Scalebox, it is OK!"


@pytest.mark.parametrize("limit, primes", [(1000, 168), (100000, 9592)])
def test_app_primes(sbx, tmp_path, conn, limit, primes):
    summary = run_app(sbx, "app-primes", env={"PRIMES_MAX": str(limit), "GATHER_DIR": str(tmp_path)})
    assert summary["status"] == "FINISHED"
    assert summary["result"] == str(primes)
    calc = summary["modules"]["calc"]
    assert calc["ok"] == calc["total"] == -(-limit // 1000)
    assert summary["modules"]["gather"]["ok"] == calc["total"]


def test_retry_rules_give_4_3_2_executions(sbx, conn):
    summary = run_app(sbx, "retry-test")
    assert summary["status"] == "FINISHED"
    assert executions(conn, summary["id"]) == {"1": [1, 1, 1, 1], "2": [2, 2, 2], "3": [3, 3]}
    final = dict(conn.execute("SELECT body, status FROM tasks WHERE app_id = %s", (summary["id"],)).fetchall())
    assert final == {"1": 1, "2": 2, "3": 3}


def test_timeout_gives_124_and_keeps_partial_output(sbx, conn):
    summary = run_app(sbx, "timeout", env={"TIMEOUT_SECONDS": "2", "SLEEP_SECONDS": "8"})
    assert summary["modules"]["sleeper"]["failed"] == 1
    status, stdout, start, end = conn.execute(
        "SELECT e.status_code, e.stdout, e.t_program_start, e.t_program_end FROM task_exec e "
        "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s", (summary["id"],)).fetchone()
    assert status == 124
    assert "started" in stdout and "finished" not in stdout
    assert 2 <= (end - start).total_seconds() < 6


def test_task_exec_files_are_recorded(sbx, conn):
    summary = run_app(sbx, "task-exec-files")
    task_id = conn.execute("SELECT id FROM tasks WHERE app_id = %s", (summary["id"],)).fetchone()[0]
    shown = json.loads(sbx("task", "show", task_id, "--json", check=0).stdout)
    (e,) = shown["executions"]
    assert e["status_code"] == 0
    assert (e["input_bytes"], e["output_bytes"]) == (1000, 2500)
    assert (e["input_files"], e["output_files"]) == (["in.dat"], ["out.dat"])
    assert e["user_text"] == "checked 42 records"
    assert e["auxout"].strip() == "aux note"
    assert e["user_timestamps"] == [["parsed", "2026-01-02T03:04:05+00:00"],
                                    ["user-step", "2026-01-02T03:04:06+00:00"]]
    for stage in ("message_created", "inserted", "ready", "claimed", "received", "program_start",
                  "program_end", "stageout_start", "stageout_end", "sink_committed", "completed"):
        assert e[f"t_{stage}"], stage


# For each consume attempt that succeeded: the file, where the produce task that sent its
# message ran, where it ran itself, and the bytes it read.
PIPELINE_HOSTS = """
SELECT c.body, pw.host, cw.host, ce.input_bytes
FROM tasks c JOIN modules m ON m.id = c.module_id AND m.name = 'consume'
JOIN task_exec ce ON ce.task_id = c.id AND ce.status_code = 0 JOIN workers cw ON cw.id = ce.worker_id
JOIN tasks p ON p.id = c.from_task_id
JOIN task_exec pe ON pe.task_id = p.id AND pe.status_code = 0 JOIN workers pw ON pw.id = pe.worker_id
WHERE c.app_id = %s ORDER BY c.body
"""


def test_local_pipeline_reads_each_file_where_it_was_written(sbx, conn, tmp_path):
    summary = run_app(sbx, "local-pipeline")
    assert summary["status"] == "FINISHED"
    assert summary["modules"]["produce"]["ok"] == summary["modules"]["consume"]["ok"] == 8
    rows = conn.execute(PIPELINE_HOSTS, (summary["id"],)).fetchall()
    size = 50 << 20
    assert [body for body, *_ in rows] == [f"part-{i}.bin" for i in range(1, 9)]
    assert all(made == used and read == size for _, made, used, read in rows), rows
    sems = dict(conn.execute("SELECT name, value FROM semaphores WHERE app_id = %s", (summary["id"],)).fetchall())
    assert sems == {"bytes_consumed": 8 * size, "files_consumed": 8}
    # every consume task named a host (to_host) and ran in a pilot on that host.
    assert conn.execute("SELECT DISTINCT t.to_host IS NOT NULL AND t.to_host = w.host FROM tasks t "
                        "JOIN modules m ON m.id = t.module_id AND m.name = 'consume' "
                        "JOIN task_exec e ON e.task_id = t.id JOIN workers w ON w.id = e.worker_id "
                        "WHERE t.app_id = %s", (summary["id"],)).fetchall() == [(True,)]
    assert not list((tmp_path / "state" / "scratch").glob("scalebox-data/*/*.bin"))   # consumed, removed
