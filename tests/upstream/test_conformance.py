"""Upstream Scalebox apps, written as upstream writes them (jobs:, arguments:,
parameters:, the in-task `scalebox` command, JOB_ID), run unchanged but for the image line."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_app(sbx, name, env=None):
    proc = sbx("run", "--json", HERE / name, timeout=600, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout), proc.stderr


def test_hello_scalebox_sets_its_result_with_scalebox_app_set_finished(sbx):
    summary, log = run_app(sbx, "hello-scalebox")
    assert summary["status"] == "FINISHED"
    assert summary["result"] == "Hello scalebox, it is OK!"
    # Upstream keys with no meaning on a batch site are named, with the reason, not ignored silently.
    assert "slot_on_head has no effect here" in log
    assert "slot_options has no effect here" in log


def test_scalebox_task_add_emits_bodies_byte_for_byte_with_the_task(sbx, conn):
    summary, _ = run_app(sbx, "task-add")
    assert summary["status"] == "FINISHED"
    rows = conn.execute(
        "SELECT t.body, t.headers::text, e.stdout FROM tasks t JOIN modules m ON m.id = t.module_id "
        "JOIN task_exec e ON e.task_id = t.id WHERE t.app_id = %s AND m.name = 'sink' ORDER BY t.id",
        (summary["id"],)).fetchall()
    got = [(body, {k: v for k, v in json.loads(headers).items() if k == "kind"}) for body, headers, _ in rows]
    assert got == [('a, b,{"not":"headers"}', {"kind": "plain"}),
                   ("two words", {"kind": "many"}), (" lead and trail ", {"kind": "many"}),
                   ("line 1", {"kind": "file"}), ("line 2", {"kind": "file"}),
                   ("stdin 1", {"kind": "stdin"}), ("stdin 2", {"kind": "stdin"}),
                   ("json headers", {"kind": "json"})]
    # The program got each body as its $1, exactly.
    assert [out.split("] ", 1)[0] + "]" for _, _, out in rows] == [f"[{body}]" for body, _ in got]
    # The failed first attempt of 'emit' had called task add too: nothing of it was sent.
    attempts = conn.execute(
        "SELECT e.status_code FROM task_exec e JOIN tasks t ON t.id = e.task_id JOIN modules m "
        "ON m.id = t.module_id WHERE t.app_id = %s AND m.name = 'emit' ORDER BY e.attempt",
        (summary["id"],)).fetchall()
    assert [a for (a,) in attempts] == [1, 0]
    # semaphore increment-n / decrement and app set-status, applied with the task too
    assert summary["result"] == "emitted"
    assert conn.execute("SELECT value FROM semaphores WHERE app_id = %s AND name = 'emit:count'",
                        (summary["id"],)).fetchone() == (4,)


def test_retry_test_gives_4_3_2_executions(sbx, conn):
    summary, _ = run_app(sbx, "retry_test")
    assert summary["status"] == "FINISHED"
    rows = conn.execute("SELECT t.body, count(*) FROM tasks t JOIN task_exec e ON e.task_id = t.id "
                        "WHERE t.app_id = %s GROUP BY t.body", (summary["id"],)).fetchall()
    assert dict(rows) == {"1": 4, "2": 3, "3": 2}


def test_timeout_gen_ends_with_124_and_keeps_partial_stdout(sbx, conn):
    summary, _ = run_app(sbx, "timeout-gen")
    code, stdout = conn.execute("SELECT e.status_code, e.stdout FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                                "WHERE t.app_id = %s", (summary["id"],)).fetchone()
    assert code == 124
    assert "started, sleeping 8 s" in stdout and "finished" not in stdout


@pytest.mark.parametrize("limit, groups, primes", [(1000, 10, 168), (100000, 100, 9592)])
def test_app_primes_router_form_sums_in_a_semaphore(sbx, conn, limit, groups, primes):
    # The calc host is this machine (upstream's scalebox.env names its own h0).
    summary, _ = run_app(sbx, "app-primes", env={"PRIMES_MAX": str(limit), "NUM_GROUPS": str(groups),
                                                  "CALC_HOST": socket.gethostname()})
    assert summary["status"] == "FINISHED"
    assert summary["modules"]["my-module"]["ok"] == groups
    value = conn.execute("SELECT value FROM semaphores WHERE app_id = %s AND name = 'app-primes:sum_value'",
                         (summary["id"],)).fetchone()
    assert value == (primes,)
