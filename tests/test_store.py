"""The queue's guarantees, checked on a real PostgreSQL through the db classes."""
from __future__ import annotations

from types import SimpleNamespace

from scalebox_hpc.db.apps import Apps
from scalebox_hpc.db.connection import Database
from scalebox_hpc.db.pools import Pools
from scalebox_hpc.db.queue import Queue
from scalebox_hpc.db.rows import Message, TaskResult
from scalebox_hpc.retry import RetryRules


def connect(dsn):
    """One connection and the classes over it, as a worker or the controller holds them."""
    database = Database(dsn)
    return SimpleNamespace(conn=database.conn, apps=Apps(database), queue=Queue(database), pools=Pools(database))


def make_app(s, bodies=(), modules=("m",), rules=()):
    mods = [{"name": n, "site": "local", "command": "@noop", "base_image": "host",
             "retry_rules": [list(r) for r in rules], "slots": 2} for n in modules]
    app_id = s.apps.create_app({"name": "t", "site": "local"}, mods, [(modules[0], b) for b in bodies])
    ids = {n: s.apps.module_id(app_id, n) for n in modules}
    return app_id, ids


def running_worker(s, module_id):
    wid = s.pools.create_worker(module_id, "local", 60)
    s.queue.start_worker(wid, host="h1", ip="10.0.0.1", pid=1, slurm_job_id=None, lease_seconds=60)
    return wid


def claim(s, wid, app_id, module_id, limit=10):
    return s.queue.claim(worker_id=wid, module_id=module_id, app_id=app_id, host="h1", host_bound=False,
                         limit=limit)


def result(task, code=0, messages=()):
    return TaskResult(task.id, task.attempt, code, {"task_id": task.id, "attempt": task.attempt,
                                                    "status_code": code}, list(messages))


def test_concurrent_claims_are_disjoint(dsn):
    a, b = connect(dsn), connect(dsn)
    app_id, ids = make_app(a, [str(i) for i in range(50)])
    wa, wb = running_worker(a, ids["m"]), running_worker(a, ids["m"])
    a.conn.execute("BEGIN")
    got_a = claim(a, wa, app_id, ids["m"], 30)       # rows stay locked: transaction open
    got_b = claim(b, wb, app_id, ids["m"], 30)       # skips them instead of waiting
    a.conn.execute("COMMIT")
    assert len(got_a) == 30 and len(got_b) == 20
    assert not {t.id for t in got_a} & {t.id for t in got_b}


def test_dedup_unless_repeatable(dsn):
    s = connect(dsn)
    app_id, ids = make_app(s, ["x", "x", "y"])
    assert s.apps.add_tasks(app_id, ids["m"], ["x", "z", "z"], {}) == 1
    assert s.apps.add_tasks(app_id, ids["m"], ["x", "x"], {"repeatable": "yes"}) == 2
    bodies = sorted(r[0] for r in s.conn.execute("SELECT body FROM tasks WHERE app_id = %s", (app_id,)))
    assert bodies == ["x", "x", "x", "y", "z"]


def test_completion_and_messages_are_one_transaction_and_exactly_once(dsn):
    s = connect(dsn)
    app_id, ids = make_app(s, ["t1"], modules=("m", "next"))
    wid = running_worker(s, ids["m"])
    (task,) = claim(s, wid, app_id, ids["m"])
    msg = Message(ids["next"], "out", {"repeatable": "yes"})
    r = result(task, 0, [msg])
    assert s.queue.complete(worker_id=wid, app_id=app_id, results=[r], retry_rules=RetryRules()) == 1
    # The same answer again (a retry after a dropped connection) changes nothing.
    assert s.queue.complete(worker_id=wid, app_id=app_id, results=[r], retry_rules=RetryRules()) == 0
    assert s.conn.execute("SELECT count(*) FROM tasks WHERE module_id = %s", (ids["next"],)).fetchone()[0] == 1
    assert s.conn.execute("SELECT count(*) FROM task_exec").fetchone()[0] == 1


def test_late_answer_of_a_recovered_attempt_is_dropped(dsn):
    s = connect(dsn)
    app_id, ids = make_app(s, ["t1"], modules=("m", "next"))
    wid = running_worker(s, ids["m"])
    (task,) = claim(s, wid, app_id, ids["m"])
    s.conn.execute("UPDATE workers SET lease_expires = now() - interval '1 second' WHERE id = %s", (wid,))
    lost, recovered = s.pools.recover_lost()
    assert [w.id for w in lost] == [wid] and recovered == 1
    status, attempts = s.conn.execute("SELECT status, attempts FROM tasks WHERE id = %s", (task.id,)).fetchone()
    assert (status, attempts) == (-1, 1)          # READY again, the lost attempt counted
    late = result(task, 0, [Message(ids["next"], "out")])
    assert s.queue.complete(worker_id=wid, app_id=app_id, results=[late], retry_rules=RetryRules()) == 0
    assert s.conn.execute("SELECT count(*) FROM tasks WHERE module_id = %s", (ids["next"],)).fetchone()[0] == 0
    codes = [r[0] for r in s.conn.execute("SELECT status_code FROM task_exec WHERE task_id = %s", (task.id,))]
    assert codes == [123]
    # A lost worker claims nothing more.
    assert claim(s, wid, app_id, ids["m"]) == []


def test_lost_attempts_retry_three_times_by_default(dsn):
    s = connect(dsn)
    app_id, ids = make_app(s, ["t1"])
    for _ in range(4):
        wid = running_worker(s, ids["m"])
        (task,) = claim(s, wid, app_id, ids["m"])
        s.conn.execute("UPDATE workers SET lease_expires = now() - interval '1 second' WHERE id = %s", (wid,))
        s.pools.recover_lost()
    assert s.conn.execute("SELECT status, attempts FROM tasks").fetchone() == (123, 4)


def test_returned_tasks_cost_no_attempt(dsn):
    s = connect(dsn)
    app_id, ids = make_app(s, ["a", "b"])
    wid = running_worker(s, ids["m"])
    got = claim(s, wid, app_id, ids["m"])
    assert s.queue.return_tasks(wid, [t.id for t in got]) == 2
    rows = s.conn.execute("SELECT status, attempts, worker_id FROM tasks").fetchall()
    assert rows == [(-1, 0, None), (-1, 0, None)]
    assert s.conn.execute("SELECT count(*) FROM task_exec").fetchone()[0] == 0


def test_retry_rules_and_semaphores(dsn):
    s = connect(dsn)
    app_id, ids = make_app(s, ["a"], rules=[("1", 1)])
    wid = running_worker(s, ids["m"])
    (task,) = claim(s, wid, app_id, ids["m"])
    failed = result(task, 1)
    failed.semaphores = [("sem", "+", 5)]         # a failed attempt applies nothing
    s.queue.complete(worker_id=wid, app_id=app_id, results=[failed], retry_rules=RetryRules((("1", 1),)))
    assert s.conn.execute("SELECT status FROM tasks").fetchone()[0] == -1
    (task,) = claim(s, wid, app_id, ids["m"])
    ok = result(task, 0)
    ok.semaphores = [("sem", "+", 5), ("sem", "-", 2), ("other", "=", 7)]
    ok.app_result = "all good"
    s.queue.complete(worker_id=wid, app_id=app_id, results=[ok], retry_rules=RetryRules((("1", 1),)))
    assert dict(s.conn.execute("SELECT name, value FROM semaphores").fetchall()) == {"sem": 3, "other": 7}
    assert s.conn.execute("SELECT result FROM apps").fetchone()[0] == "all good"
    assert [r[0] for r in s.conn.execute("SELECT status_code FROM task_exec ORDER BY attempt")] == [1, 0]


def test_a_claim_reads_the_ready_index_not_the_rows_in_front(dsn):
    # An earlier app's 10,000 finished tasks lie in front of this app's 20,000 ready ones,
    # and the statistics say nearly every row is ready. The claim must go straight to the
    # ready ones (tasks_ready), not read every row before them in id order.
    s, stats = connect(dsn), connect(dsn)
    make_app(s, [str(i) for i in range(10000)])
    s.conn.execute("UPDATE tasks SET status = 0")
    app_id, ids = make_app(s, [str(i) for i in range(20000)])
    s.conn.execute("ANALYZE tasks")
    wid = running_worker(s, ids["m"])
    read = ("SELECT coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0) "
            "FROM pg_statio_user_tables WHERE relname = 'tasks'")
    s.conn.execute("SELECT pg_stat_force_next_flush()")
    before = stats.conn.execute(read).fetchone()[0]
    s.conn.execute("SELECT pg_stat_force_next_flush()")
    got = s.queue.claim_pilot(worker_id=wid, host="h1", entries=[(ids["m"], 0, 2)])
    after = stats.conn.execute(read).fetchone()[0]
    assert [t.body for t in got] == ["0", "1"]
    assert after - before < 30, f"one claim read {after - before} heap pages of tasks"
    s.conn.execute("SELECT pg_stat_force_next_flush()")
    got = claim(s, wid, app_id, ids["m"], 2)        # the one-module claim, the same way
    assert [t.body for t in got] == ["2", "3"]
    assert stats.conn.execute(read).fetchone()[0] - after < 30
