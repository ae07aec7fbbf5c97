"""Rules of a Slurm site's pool, with a scripted scheduler in place of Slurm (the real
thing is exercised in test_slurm.py): admission, arrays split at MaxArraySize, the
per-minute sbatch budget, the degraded state and its probe, lost-job detection, and
HOST-BOUND modules: workers sent to the hosts their tasks name, host_fallback when a
host is gone."""
from __future__ import annotations


import pytest

from scalebox_hpc.controller import Controller, ControllerSettings
from scalebox_hpc.states import Code
from scalebox_hpc.db.apps import Apps
from scalebox_hpc.db.connection import Database
from scalebox_hpc.db.reporting import Reporting
from scalebox_hpc.db.rows import Message
from scalebox_hpc.siteconfig import load_site
from scalebox_hpc.sites import LiveWorker
from scalebox_hpc.sites.slurm import BatchSite, Job, SchedulerError

MODULE = {"id": 1, "name": "calc", "app_id": 7}


class ScriptedScheduler:
    def __init__(self):
        self.scripts: list[str] = []
        self.queue: dict[str, Job] = {}
        self.fail_with: str | None = None
        self.squeue_calls = 0
        self.node_states: dict[str, tuple[str, str]] | None = {"n1": ("idle", ""), "n2": ("idle", "")}
        self.sinfo_calls = 0

    def submit(self, script):
        if self.fail_with:
            raise SchedulerError(self.fail_with)
        self.scripts.append(script)
        return str(100 + len(self.scripts))

    def jobs(self, prefix):
        self.squeue_calls += 1
        return dict(self.queue)

    def cancel(self, job_ids):
        for j in job_ids:
            self.queue.pop(j, None)

    def max_array_size(self):
        return 3

    def nodes(self, partition):
        self.sinfo_calls += 1
        if self.node_states is None:
            raise SchedulerError("sinfo: error: Unable to contact slurm controller")
        return dict(self.node_states)


@pytest.fixture
def make_site(tmp_path):
    def make(pool="", slurm=""):
        path = tmp_path / "s.yaml"
        path.write_text(f"name: s\nscheduler: slurm\nslurm:\n  partition: main\n{slurm}pool:\n  poll_seconds: 5\n{pool}")
        settings = ControllerSettings(dsn="host=/run/pg dbname=x", state_dir=str(tmp_path))
        scheduler = ScriptedScheduler()
        return BatchSite(load_site(path), settings, scheduler), scheduler
    return make


def test_admission_respects_pool_limits(make_site):
    site, _ = make_site("  max_workers: 10\n  max_queued_jobs: 4\n")
    assert site.admit(50, live=0, pending=0) == 4            # queue cap
    assert site.admit(50, live=8, pending=1) == 2            # max_workers
    assert site.admit(50, live=4, pending=4) == 0
    wide, _ = make_site("  max_workers: 10\n  max_queued_jobs: 4\n", slurm="  nodes: 2\n")
    assert wide.admit(50, live=0, pending=2) == 6            # 3 more jobs of 2 nodes


def test_arrays_split_at_max_array_size_and_rate_limit(make_site):
    site, sched = make_site("  max_workers: 100\n  max_queued_jobs: 100\n  max_submissions_per_minute: 2\n")
    n = site.admit(8, live=0, pending=0)
    assert n == 8
    jobs = site.launch(list(range(1, 9)), MODULE)
    # MaxArraySize 3: arrays of 3, 3, 2, but only 2 sbatch calls this minute.
    assert len(sched.scripts) == 2
    assert "#SBATCH --array=0-2" in sched.scripts[0]
    assert jobs == {1: "101_0", 2: "101_1", 3: "101_2", 4: "102_0", 5: "102_1", 6: "102_2"}
    assert site.admit(2, live=6, pending=6) == 0             # budget spent: wait for the minute
    for i in range(len(site.recent)):
        site.recent[i] -= 61
    assert site.admit(2, live=6, pending=6) == 2


def test_degraded_after_three_failures_then_one_probe(make_site):
    site, sched = make_site()
    sched.fail_with = "sbatch: error: invalid partition specified: later"
    for _ in range(3):
        assert site.launch([1], MODULE) == {}
    assert site.status == "DEGRADED" and "invalid partition" in site.reason
    assert site.admit(5, live=0, pending=0) == 0             # backing off
    site.retry_at = 0.0
    sched.fail_with = None
    assert site.admit(5, live=0, pending=0) > 0
    jobs = site.launch([1, 2, 3], MODULE)
    assert len(sched.scripts) == 1 and site.status == "OK"   # the probe went through
    assert len(jobs) == 3


def test_dead_workers_from_one_squeue_per_poll(make_site):
    site, sched = make_site()
    jobs = site.launch([1, 2], MODULE)
    assert jobs == {1: "101_0", 2: "101_1"}
    workers = [LiveWorker(w, 1, "RUNNING", None, None, j) for w, j in jobs.items()]
    sched.queue = {j: Job(j, "sbx-7-calc", "RUNNING") for j in jobs.values()}
    assert site.dead(workers) == []
    calls = sched.squeue_calls
    del sched.queue["101_1"]                                  # the job ended or was cancelled
    for _ in range(20):
        assert site.dead(workers) == []                       # within poll_seconds: the old view
    assert sched.squeue_calls == calls                        # and no new squeue
    site.snapshot_at -= 5
    assert site.dead(workers) == [2]
    assert sched.squeue_calls == calls + 1
    # A job submitted after the last squeue is not declared dead on that stale view.
    more = site.launch([3], MODULE)
    assert site.dead([LiveWorker(3, 1, "PENDING", None, None, more[3])]) == []


# -- HOST-BOUND modules -------------------------------------------------------------------

def test_gone_hosts_from_one_sinfo_per_poll(make_site):
    site, sched = make_site()
    sched.node_states = {"n1": ("idle", ""), "n2": ("down", "test"), "n3": ("drained", "maintenance"),
                         "n4": ("idle*", ""), "n5": ("mixed", "")}
    gone = site.gone_hosts({"n1", "n2", "n3", "n4", "n5", "n9"})
    assert sorted(gone) == ["n2", "n3", "n9"]                 # 'idle*' (not responding yet) is not gone
    assert gone["n2"] == "node n2 is down (sinfo, reason: test)"
    assert "not in partition main" in gone["n9"]
    for _ in range(10):
        site.gone_hosts({"n2"})
    assert sched.sinfo_calls == 1                             # at most one sinfo per poll interval
    # No answer, or no node in the partition, says nothing about a node: nobody is gone.
    sched.node_states = None
    site.node_view_at -= 5
    assert site.gone_hosts({"n2", "n9"}) == {}
    sched.node_states = {}
    site.node_view_at -= 5
    assert site.gone_hosts({"n2", "n9"}) == {}


def test_job_for_a_host_is_one_node_and_a_refusal_marks_the_host_gone(make_site):
    site, sched = make_site(slurm="  nodes: 2\n")
    assert site.launch([5], MODULE, host="n2") == {5: "101"}
    assert "#SBATCH --nodelist=n2" in sched.scripts[0] and "#SBATCH --nodes=1" in sched.scripts[0]
    assert "srun" not in sched.scripts[0]                     # one worker, on that node
    sched.fail_with = "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    assert site.launch([6], MODULE, host="n2") == {}
    assert site.failures == 0 and site.status == "OK"        # the node's fault, not the site's
    gone = site.gone_hosts({"n1", "n2"})
    assert list(gone) == ["n2"] and gone["n2"].startswith("sbatch refused a job for node n2:")
    assert site.gone_hosts({"n2"}) == {}                      # reported once; a new job may try again


def host_bound_app(store: Apps, *, slots=2):
    """An app with a HOST-BOUND module per host_fallback, on site 's'."""
    modules = [{"name": "consume", "site": "s", "task_dist_mode": "HOST-BOUND", "slots": slots},
               {"name": "roam", "site": "s", "task_dist_mode": "HOST-BOUND", "host_fallback": "anywhere",
                "slots": slots}]
    app_id = store.create_app({"name": "hb", "site": "s"}, modules, [])
    ids = {m.name: m.id for m in store.modules(app_id)}
    return app_id, ids


def add(store, app_id, module_id, bodies, host):
    store.insert_messages(app_id, [Message(module_id, b, {"to_host": host}) for b in bodies])


@pytest.fixture
def controller(make_site, dsn, tmp_path):
    site, sched = make_site("  max_workers: 10\n")
    ctl = Controller(ControllerSettings(dsn=dsn, state_dir=str(tmp_path)), sites={"s": site})
    yield ctl, site, sched, Apps(Database(dsn))
    ctl.close()


def sent_to(scripts):
    return [s.split("--nodelist=")[1].split()[0] if "--nodelist=" in s else None for s in scripts]


def test_workers_are_sent_to_the_hosts_with_tasks_round_by_round(controller):
    ctl, site, sched, store = controller
    app_id, ids = host_bound_app(store, slots=3)
    add(store, app_id, ids["consume"], ["a", "b", "c"], "n1")
    add(store, app_id, ids["consume"], ["d"], "n2")
    report = ctl.step()
    assert report["started"] == 2 and report["host_gone"] == 0
    assert sorted(sent_to(sched.scripts)) == ["n1", "n2"]
    rows = Reporting(store.database).workers(app_id)
    assert len(rows) == 2 and all(r.status == "PENDING" for r in rows)
    # Pending workers count on the host they were sent to: n2 has one for its one task;
    # n1 gets one more for its three, and then the module's 3 slots are full.
    assert ctl.step()["started"] == 1 and sent_to(sched.scripts)[-1] == "n1"
    assert ctl.step()["started"] == 0
    # Tasks without a to_host go to the module's ordinary pool, which those three cover.
    store.insert_messages(app_id, [Message(ids["consume"], "free")])
    assert ctl.step()["started"] == 0 and len(sched.scripts) == 3


def test_slots_cap_the_workers_sent_to_hosts(controller):
    ctl, site, sched, store = controller
    app_id, ids = host_bound_app(store, slots=1)
    add(store, app_id, ids["consume"], ["a"], "n1")
    add(store, app_id, ids["consume"], ["b"], "n2")
    assert ctl.step()["started"] == 1


def test_gone_host_fails_or_frees_its_tasks_by_host_fallback(controller):
    ctl, site, sched, store = controller
    sched.node_states = {"n1": ("idle", ""), "n2": ("down", "test")}
    app_id, ids = host_bound_app(store)
    add(store, app_id, ids["consume"], ["a", "b"], "n2")
    add(store, app_id, ids["roam"], ["c"], "n2")
    add(store, app_id, ids["consume"], ["d"], "n1")
    report = ctl.step()
    assert report["host_gone"] == 3
    tasks = {r.body: r for r in Reporting(store.database).find_tasks(app_id, limit=10)}
    # fail: a final system code, and an attempt whose note names the host and why.
    for body in ("a", "b"):
        task = tasks[body]
        assert (task.status, task.attempts, task.to_host) == (Code.HOST_GONE, 1, "n2")
        (code, note), = store.database.conn.execute("SELECT status_code, note FROM task_exec WHERE task_id = %s",
                                                    (task.id,)).fetchall()
        assert code == Code.HOST_GONE and "to_host n2 is gone: node n2 is down (sinfo, reason: test)" in note
    # anywhere: READY for any worker, the host it wanted kept in its headers.
    freed = tasks["c"]
    assert (freed.status, freed.to_host) == (-1, None)
    assert freed.headers["wanted_host"] == "n2" and "to_host" not in freed.headers
    assert tasks["d"].status == -1                               # n1 is fine
    # Only n1 got a worker sent to it; that pilot serves roam's freed task too (its
    # app's modules), so the ordinary pool asks for no other.
    assert sent_to(sched.scripts) == ["n1"]
    ctl.step()
    assert sent_to(sched.scripts) == ["n1"]


def test_queued_worker_for_a_host_that_goes_down_is_cancelled(controller):
    ctl, site, sched, store = controller
    app_id, ids = host_bound_app(store)
    add(store, app_id, ids["consume"], ["a"], "n2")
    assert ctl.step()["started"] == 1
    sched.queue = {"101": None}
    sched.node_states = {"n1": ("idle", ""), "n2": ("drained", "")}
    site.node_view_at -= 5
    assert ctl.step()["host_gone"] == 1
    assert "101" not in sched.queue                           # scancel'ed
    (status, message), = store.database.conn.execute("SELECT status, message FROM workers").fetchall()
    assert status == "EXITED" and "node n2 is drained" in message
