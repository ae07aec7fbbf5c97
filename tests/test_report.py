"""The task perspective: 'report' checked against SQL on the database for known runs of
the examples and rendered by a real headless Chromium; 'task show', 'app show/watch' and
the operator commands (task list filters, task retry by module and code, pause/resume)."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psycopg
import pytest

from conftest import EXAMPLES, REPO


@pytest.fixture(scope="module")
def known_run(pg, tmp_path_factory):
    """One database holding a finished retry-test (codes 1, 2, 3: 4, 3 and 2 attempts)
    and a finished app-primes up to 10,000 (1 scatter, 10 calc, 10 gather tasks)."""
    name = f"report{os.getpid()}"
    with psycopg.connect(pg.admin_dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
        c.execute(f"CREATE DATABASE {name} TEMPLATE sbx_template")
    dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname=name)
    tmp = tmp_path_factory.mktemp("report")
    env = dict(os.environ, SCALEBOX_DSN=dsn, SCALEBOX_STATE_DIR=str(tmp / "state"), SCALEBOX_LEASE_SECONDS="6",
               SCALEBOX_IDLE_SECONDS="3", SCALEBOX_POLL_SECONDS="0.3", SCALEBOX_CONFIG=str(tmp / "none.yaml"),
               PRIMES_MAX="10000", GATHER_DIR=str(tmp / "gather"))

    def cli(*args, check=0):
        proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert check is None or proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    ids = {example: json.loads(cli("run", "--json", EXAMPLES / example).stdout)["id"]
           for example in ("retry-test", "app-primes")}
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield {"cli": cli, "conn": conn, "ids": ids, "tmp": tmp}


def db_figures(conn, app_id):
    """What the report must say, straight from the database."""
    tasks = {}
    for module, status, n in conn.execute(
            "SELECT m.name, t.status, count(*) FROM tasks t JOIN modules m ON m.id = t.module_id "
            "WHERE t.app_id = %s GROUP BY 1, 2", (app_id,)):
        tasks.setdefault(module, {})[status] = n
    attempts = {r[0]: r[1:] for r in conn.execute(
        "SELECT m.name, count(*), count(*) FILTER (WHERE e.attempt > 1), "
        "sum(extract(epoch FROM e.t_program_end - e.t_program_start))::float8, "
        "percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP "
        "  (ORDER BY extract(epoch FROM e.t_program_end - e.t_program_start)::float8) "
        "FROM task_exec e JOIN tasks t ON t.id = e.task_id JOIN modules m ON m.id = t.module_id "
        "WHERE t.app_id = %s GROUP BY 1", (app_id,))}
    codes = {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT m.name, e.status_code, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
        "JOIN modules m ON m.id = t.module_id WHERE t.app_id = %s GROUP BY 1, 2", (app_id,))}
    return tasks, attempts, codes


def make_report(known_run, example):
    app_id = known_run["ids"][example]
    path = known_run["tmp"] / f"{example}.html"
    figures = json.loads(known_run["cli"]("report", app_id, "-o", path, "--json").stdout)
    return app_id, path, figures


@pytest.mark.parametrize("example", ["retry-test", "app-primes"])
def test_report_figures_match_the_database(known_run, example):
    app_id, path, figures = make_report(known_run, example)
    tasks, attempts, codes = db_figures(known_run["conn"], app_id)
    modules = {m["name"]: m for m in figures["modules"]}
    assert set(modules) == set(tasks)
    for name, m in modules.items():
        assert m["total"] == sum(tasks[name].values())
        assert m["ok"] == tasks[name].get(0, 0)
        assert m["failed"] == sum(n for status, n in tasks[name].items() if status > 0 or status < -9)
        n, retries, run_seconds, percentiles = attempts[name]
        assert (m["attempts"], m["retries"]) == (n, retries)
        assert m["run_seconds"] == pytest.approx(run_seconds, abs=1e-6)
        run = next(s for s in figures["stages"] if s["module"] == name and s["stage"] == "run")
        assert run["n"] == n and run["total"] == pytest.approx(run_seconds, abs=1e-6)
        # Percentiles come from buckets a 1/200 decade wide, placed between each bucket's min and max.
        assert [run["p50"], run["p90"], run["p99"]] == pytest.approx(percentiles, rel=0.012)
        assert run["min"] <= run["p50"] <= run["p99"] <= run["max"]
    assert {(c["module"], c["code"]): c["attempts"] for c in figures["codes"]} == codes
    totals = figures["totals"]
    assert totals["attempts"] == sum(a[0] for a in attempts.values())
    assert totals["run_seconds"] == pytest.approx(sum(a[2] for a in attempts.values()), abs=1e-6)
    assert totals["total"] == sum(sum(by_status.values()) for by_status in tasks.values())
    # The known runs, by SPEC section 9.
    if example == "retry-test":
        final = {c["code"]: (c["attempts"], c["final"]) for c in figures["codes"]}
        assert final == {1: (4, 1), 2: (3, 1), 3: (2, 1)}
        assert (modules["retry"]["attempts"], modules["retry"]["retries"], modules["retry"]["failed"]) == (9, 6, 3)
    else:
        assert {n: (m["total"], m["ok"], m["retries"]) for n, m in modules.items()} == \
            {"scatter": (1, 1, 0), "calc": (10, 10, 0), "gather": (10, 10, 0)}
        assert figures["app"]["result"] == "1229"
    # The page carries the same figures, and nothing it would fetch.
    page = path.read_text()
    embedded = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>',
                                    page, re.S).group(1).replace("<\\/", "</"))
    assert {k: v for k, v in embedded.items() if k != "generated_at"} == \
        {k: v for k, v in figures.items() if k != "generated_at"}
    assert not re.search(r"""\b(src|href)\s*=|url\(|@import|<script(?![^>]*application/json)|<link""", page, re.I)
    assert figures["gantt"]["bars"] == sum(m["attempts"] for m in figures["modules"])   # small run: every attempt
    for name in modules:
        assert f"{name}</td>" in page


def png_top_colours(path: Path, rows: int) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct pixel colours of the first `rows` rows of an
    8-bit RGB(A) PNG (decoded here: the tests need no imaging library)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, []
    while pos < len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + size]
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + size
    assert depth == 8 and colour_type in (2, 6), (depth, colour_type)
    bpp = 3 if colour_type == 2 else 4
    stride = width * bpp
    raw = zlib.decompressobj().decompress(b"".join(chunks), (stride + 1) * rows)
    prev, colours = bytearray(stride), set()
    for r in range(min(rows, height)):
        kind, line = raw[r * (stride + 1)], bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        colours.update(bytes(line[i:i + bpp]) for i in range(0, stride, bpp))
        prev = line
    return width, height, colours


def test_report_renders_in_headless_chromium(known_run):
    """Chromium must be had (tests/env/chromium-up.sh installs it): a missing browser fails."""
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "chromium-up.sh")], capture_output=True, text=True,
                        timeout=1200)
    assert up.returncode == 0, f"no headless Chromium for the report test:\n{up.stderr[-3000:]}"
    chromium = up.stdout.strip().splitlines()[-1]
    _app_id, page, _figures = make_report(known_run, "app-primes")
    shot = known_run["tmp"] / "report.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1400,3000", "--enable-logging=stderr", "--v=0", f"file://{page}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # This Chromium (156) logs every console message as "INFO:CONSOLE(...)" on stderr.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    width, height, colours = png_top_colours(shot, rows=700)
    assert (width, height) == (1400, 3000)
    # Text, tables, module colours and chart lines: a blank or one-colour page has a handful.
    assert len(colours) > 50, len(colours)


def test_task_show_prints_every_attempt_with_its_stages(known_run):
    conn, app_id = known_run["conn"], known_run["ids"]["retry-test"]
    task_id = conn.execute("SELECT id FROM tasks WHERE app_id = %s AND body = '1'", (app_id,)).fetchone()[0]
    text = known_run["cli"]("task", "show", task_id).stdout
    for needle in ("4 execution(s)", "attempt 1: code 1", "attempt 4: code 1", "on host ", "worker ",
                   "program_start", "stages: queue wait", "run ", "stdout:", "exits with 1"):
        assert needle in text, (needle, text)
    shown = json.loads(known_run["cli"]("task", "show", task_id, "--json").stdout)
    assert [e["attempt"] for e in shown["executions"]] == [1, 2, 3, 4]
    for e in shown["executions"]:
        assert e["status_code"] == 1 and e["host"] and e["worker_id"]
        assert set(e["durations"]) >= {"queue_wait", "run", "stage_out", "committing"}
        assert e["durations"]["run"] == pytest.approx((datetime_of(e["t_program_end"])
                                                      - datetime_of(e["t_program_start"])).total_seconds())


def datetime_of(text):
    from datetime import datetime
    return datetime.fromisoformat(text)


def test_task_list_filters_by_module_status_and_host(known_run):
    cli, conn, app_id = known_run["cli"], known_run["conn"], known_run["ids"]["app-primes"]
    host = conn.execute("SELECT w.host FROM tasks t JOIN workers w ON w.id = t.worker_id WHERE t.app_id = %s "
                        "LIMIT 1", (app_id,)).fetchone()[0]
    listed = json.loads(cli("task", "list", app_id, "--host", host, "--json").stdout)
    assert len(listed) == 21 and {r["host"] for r in listed} == {host}
    assert json.loads(cli("task", "list", app_id, "--host", "no-such-host", "--json").stdout) == []
    calc = json.loads(cli("task", "list", app_id, "--module", "calc", "--status", "OK", "--json").stdout)
    assert len(calc) == 10 and {r["module"] for r in calc} == {"calc"}
    failed = json.loads(cli("task", "list", known_run["ids"]["retry-test"], "--status", "failed", "--json").stdout)
    assert sorted(r["status"] for r in failed) == [1, 2, 3]
    assert [r["body"] for r in json.loads(cli("task", "list", known_run["ids"]["retry-test"], "--status", "124",
                                              "--json").stdout)] == []
    bad = cli("task", "list", app_id, "--status", "DONE", check=1)
    assert bad.stderr.startswith("error: --status: unknown status 'DONE'")


def test_app_show_and_watch_once(known_run):
    cli, app_id = known_run["cli"], known_run["ids"]["retry-test"]
    summary = json.loads(cli("app", "show", app_id, "--json").stdout)
    retry = summary["modules"]["retry"]
    assert (retry["total"], retry["failed"], retry["codes"]) == (3, 3, {"1": 1, "2": 1, "3": 1})
    assert retry["eta_seconds"] == 0.0 and retry["rate"] >= 0
    for args in (("app", "watch", app_id, "--once"), ("app", "watch", app_id), ("app", "show", app_id)):
        started = time.monotonic()
        out = cli(*args).stdout     # not a terminal: one frame, at once
        assert time.monotonic() - started < 30
        assert "FINISHED" in out and "retry" in out and "3/3" in out, out
        assert "with code 1" in out and "tasks/s" in out


def test_task_retry_by_module_and_code(sbx, sbx_env, conn):
    summary = json.loads(sbx("run", "--json", EXAMPLES / "retry-test", check=0).stdout)
    app_id = summary["id"]
    assert sbx("task", "retry", app_id, "--code", "0").stderr.startswith("error: --code 0: not a failure code")
    assert "has no module 'nope'" in sbx("task", "retry", app_id, "--module", "nope").stderr
    proc = sbx("task", "retry", app_id, "--module", "retry", "--code", "2", check=0)
    assert proc.stdout.strip() == "1 task(s) made READY again"
    status = dict(conn.execute("SELECT body, status FROM tasks WHERE app_id = %s", (app_id,)).fetchall())
    assert status == {"1": 1, "2": -1, "3": 3}
    assert conn.execute("SELECT status FROM apps WHERE id = %s", (app_id,)).fetchone()[0] == "RUNNING"
    # A controller runs it: one more attempt, which fails again with 2 and stays final.
    ctl = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "controller"], env=sbx_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while conn.execute("SELECT status FROM apps WHERE id = %s", (app_id,)).fetchone()[0] != "FINISHED":
            assert time.monotonic() < deadline, "the retried app did not finish"
            time.sleep(0.3)
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)
    codes = [r[0] for r in conn.execute("SELECT e.status_code FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                                        "WHERE t.app_id = %s AND t.body = '2' ORDER BY e.attempt", (app_id,))]
    assert codes == [2, 2, 2, 2]
    assert sbx("task", "retry", app_id, "--task", 999999, check=0).stdout.strip() == "0 task(s) made READY again"


def test_pause_resume_cancel_say_what_happens_to_the_pools(sbx, tmp_path):
    (tmp_path / "app.yaml").write_text("name: p\nmodules:\n  a:\n    base_image: host\n    command: /bin/true\n"
                                       "    start_task: x\n")
    app_id = json.loads(sbx("submit", "--json", tmp_path / "app.yaml", check=0).stdout)["id"]
    paused = sbx("app", "pause", app_id, check=0)
    assert "RUNNING -> PAUSED: 0 running worker(s) finish their current task and exit" in paused.stdout
    resumed = sbx("app", "resume", app_id, check=0)
    assert "PAUSED -> RUNNING: the controller starts workers" in resumed.stdout
    assert "no controller is running" in resumed.stderr
    assert "RUNNING -> CANCELLED" in sbx("app", "cancel", app_id, check=0).stdout
    assert sbx("app", "resume", app_id, check=1).stderr.startswith("error: app")
