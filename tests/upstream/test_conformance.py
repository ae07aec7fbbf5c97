"""Upstream Scalebox apps, written as upstream writes them (jobs:, arguments:,
parameters:, the in-task `scalebox` command, JOB_ID), run unchanged but for the image line."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import psycopg
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


# -- apps whose program lives in the image ------------------------------------------------

@pytest.fixture
def agent_image(apptainer, open_dir):
    """Upstream's images are its agent image with the module's scripts in /app/bin (their
    Dockerfiles COPY *.sh there); ours is the test Debian image (a sandbox, hard-linked)
    with the app's *.sh added the same way. Returns make(app) -> (image, env for sbx)."""
    scratch = open_dir("sbx-test-scratch-")
    env = dict(apptainer, SCALEBOX_SCRATCH=str(scratch),
               PATH=f"{apptainer['PATH'].split(':')[0]}:{os.environ['PATH']}")

    def make(app):
        image = open_dir("sbx-test-agent-") / app
        subprocess.run(["cp", "-al", apptainer["SBX_TEST_IMAGE_DIR"], str(image)], check=True)
        bin_dir = image / "app" / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for script in (HERE / app).glob("*.sh"):
            target = bin_dir / script.name
            target.unlink(missing_ok=True)      # never write through a hard link into the base image
            shutil.copy2(script, target)
        return image, env
    return make


def test_task_exec_files_records_bytes_files_text_and_timestamps(sbx, conn, agent_image):
    image, env = agent_image("task-exec-files")
    summary, log = run_app(sbx, "task-exec-files", env=dict(env, TASK_EXEC_FILES_IMAGE=str(image)))
    assert summary["status"] == "FINISHED"
    assert "schedule_mode has no effect here" in log
    rows = conn.execute(
        "SELECT t.body, e.status_code, e.input_bytes, e.output_bytes, e.input_files, e.output_files, e.user_text, "
        "e.user_timestamps, e.stdout, e.stderr FROM tasks t JOIN task_exec e ON e.task_id = t.id "
        "WHERE t.app_id = %s ORDER BY t.id", (summary["id"],)).fetchall()
    # The chain 0 -> 1 -> 2 went through task-exec.json's sinkJob and messageBody.
    assert [(r[0], r[1]) for r in rows] == [("0", 0), ("1", 0), ("2", 0)]
    first, second, third = rows
    assert first[2:4] == (9999, 999)
    assert first[6] == "user-defined text\nHello scalebox in message-0"
    assert first[7] == [["", "2018-03-19T18:35:03-08:00"], ["", "2019-11-05T17:50:20.154+08:00"],
                        ["", "2020-11-05T17:50:20.154918+08:00"], ["", "2021-11-05T17:50:20.154918780+08:00"],
                        ["", "2022-11-17T08:52:21,963572856+08:00"]]
    assert first[8].strip() == "stdout in message-0." and first[9].strip() == "stderr in message-0."
    # Files as the program named them (paths inside its container).
    assert second[4:6] == (["/etc/passwd", "/etc/group"], ["/etc/fstab", "/etc/hosts"])
    # No userText in task-exec.json: the text of user-file.txt, as upstream keeps it.
    text = "This is user-defined data in a file.\nMulti-line is supported.\n"
    assert second[6] == text and third[6] == text
    for row in (second, third):
        stamps = row[7]
        assert [label for label, _ in stamps] == [""] * 6
        assert stamps[4][1] == "2012-11-17T08:52:21,963572856+08:00"
        # the sixth is `date --iso-8601=ns` inside the container, at the task's run
        assert abs((datetime.fromisoformat(stamps[5][1]) - datetime.fromisoformat(
            stamps[4][1]).replace(year=datetime.now().year)).days) < 400
    assert third[2:6] == (None, None, None, None)


def test_check_test_takes_its_task_only_after_the_check_says_0(sbx, conn, agent_image, sbx_env):
    image, env = agent_image("check_test")
    summary, log = run_app(sbx, "check_test", env=dict(env, CHECK_TEST_IMAGE=str(image)))
    assert summary["status"] == "FINISHED"
    assert "variables.always_running has no effect here" in log
    # The check's notes in /work reached the task, which appended its own: every throw
    # but the last was 1 or 2, the last 0.
    lines = summary["result"].split("\n")
    assert lines[-1] == "check_test done!"
    codes = [line.removeprefix("check_code:") for line in lines[:-1]]
    assert codes and codes[-1] == "0" and set(codes[:-1]) <= {"1", "2"}, lines
    # The image's check.sh and setup.sh were found and run: setup once, before the task.
    logs = "".join(p.read_text() for p in (Path(sbx_env["SCALEBOX_STATE_DIR"]) / "logs").glob("worker-*.log"))
    assert "hooks from its image: /app/bin/check.sh, /app/bin/setup.sh" in logs
    assert conn.execute("SELECT count(*) FROM tasks WHERE app_id = %s", (summary["id"],)).fetchone() == (1,)


def test_cross_cluster_primes_counts_1229_with_calc_on_the_other_cluster(sites_env, two_sites, dsn):
    # Upstream's scalebox.env names its own calc host (h0): here a node of site b's cluster.
    env = dict(sites_env, CLUSTER="site-a", CALC_CLUSTER="site-b", CALC_HOST="n2")
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "run", "--json", HERE / "cross-cluster-primes"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["status"] == "FINISHED" and summary["modules"]["my-module"]["ok"] == 10
    with psycopg.connect(dsn) as conn:
        value = conn.execute("SELECT value FROM semaphores WHERE app_id = %s AND name = 'app-primes:sum_value'",
                             (summary["id"],)).fetchone()
        where = conn.execute(
            "SELECT m.name, w.site, w.host, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
            "JOIN modules m ON m.id = t.module_id JOIN workers w ON w.id = e.worker_id "
            "WHERE t.app_id = %s GROUP BY 1, 2, 3", (summary["id"],)).fetchall()
    assert value == (1229,)
    # calc ran on site b, on the host its per-host slots name; the router on site a.
    assert {(m, s, h) for m, s, h, _ in where if m == "my-module"} == {("my-module", "site-b", "n2")}
    assert {(m, s) for m, s, _, _ in where if m == "mr-module"} == {("mr-module", "site-a")}


def test_agent_interface_files_as_upstream_describes_them(sbx, conn, sbx_env):
    summary, log = run_app(sbx, "agent-files")
    assert summary["status"] == "FINISHED", summary
    assert "variables.repeatable has no effect here" in log
    (row,) = conn.execute(
        "SELECT e.status_code, e.user_text, e.user_timestamps, e.extras, e.input_bytes, e.output_bytes, "
        "e.output_files, e.auxout, e.note FROM task_exec e JOIN tasks t ON t.id = e.task_id JOIN modules m "
        "ON m.id = t.module_id WHERE t.app_id = %s AND m.name = 'writer'", (summary["id"],)).fetchall()
    code, text, stamps, extras, in_bytes, out_bytes, out_files, aux, note = row
    assert code == 0 and note is None
    assert text == "written as YAML\n"
    # task-exec.yaml's timestamps first, then timestamps.txt's, each as written; '#' lines skipped.
    assert stamps == [["", "2024-05-01T12:00:00Z"], ["parsed", "2024-05-01 12:00:01.5"],
                      ["", "2024-05-01T12:00:02"], ["written", "2024-05-01T12:00:03.123456789+08:00"]]
    assert extras == {"frames": 12, "detector": {"name": "ccd 3", "gain": 1.5}}
    # Bytes were counted before removed-files.txt took consumed.dat away; kept.dat stays.
    assert (in_bytes, out_bytes, out_files, aux) == (15, 6, ["result.dat"], "aux line\n")
    listed = conn.execute("SELECT e.stdout FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                          "WHERE t.app_id = %s AND t.body = 'body1'", (summary["id"],)).fetchone()[0]
    assert listed.split() == ["body1", "kept.dat"]     # consumed.dat went once the writer was on record
    bodies = conn.execute(
        "SELECT t.body, t.headers::text FROM tasks t JOIN modules m ON m.id = t.module_id "
        "WHERE t.app_id = %s AND m.name = 'sink' ORDER BY t.id", (summary["id"],)).fetchall()
    got = [(body, {k: v for k, v in json.loads(headers).items() if k in ("h0", "h1")}) for body, headers in bodies]
    h = {"h0": "a", "h1": "b"}
    assert got == [("body1", {}), ('{"bh0":"a","body":"body2"}', {}), ("body3", h),
                   ('{"bh0":"a","body":"body4"}', h), ("body5", {}), ("body6", h),
                   ('{"bh0":"a","body":"body7"}', h)]
    shown = sbx("task", "show", conn.execute(
        "SELECT t.id FROM tasks t JOIN modules m ON m.id = t.module_id WHERE t.app_id = %s AND m.name = 'writer'",
        (summary["id"],)).fetchone()[0])
    assert 'extras: {"detector": {"gain": 1.5, "name": "ccd 3"}, "frames": 12}' in shown.stdout, shown.stdout
