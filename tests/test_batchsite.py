"""Rules of a Slurm site's pool, with a scripted scheduler in place of Slurm (the real
thing is exercised in test_slurm.py): admission, arrays split at MaxArraySize, the
per-minute sbatch budget, the degraded state and its probe, lost-job detection."""
from __future__ import annotations

import pytest

from scalebox_hpc.controller import ControllerSettings
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
