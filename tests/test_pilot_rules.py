"""The pure rules a pilot follows: what a node gives it (from Slurm's variables or
the site config) and which modules its free cores and GPUs go to."""
from __future__ import annotations

import pytest

from scalebox_hpc.policy import Budget, Candidate, plan, stages
from scalebox_hpc.resources import GPU_VARIABLES, NodeResources, gpu_environment, node_resources


# -- node resources ------------------------------------------------------------------
def test_slurm_job_cpus_gpus_and_memory():
    env = {"SLURM_JOB_ID": "42", "SLURM_CPUS_ON_NODE": "64", "SLURM_JOB_GPUS": "0,1,2,3",
           "SLURM_MEM_PER_NODE": "256000"}
    assert node_resources(env, cpus=2) == NodeResources(64, ("0", "1", "2", "3"), 256000, "Slurm job 42")


def test_slurm_cpus_per_node_list_and_memory_per_cpu():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "16(x2),8", "SLURM_MEM_PER_CPU": "2000"}
    r = node_resources(env)
    assert (r.cpus, r.gpus, r.mem_mb) == (16, (), 32000)


def test_gpus_are_named_as_the_programs_see_them():
    # CUDA_VISIBLE_DEVICES (what CUDA in the job sees) wins over Slurm's physical ids;
    # a step's GPUs over the job's; 'NoDevFiles' means none.
    env = {"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "2,3", "SLURM_STEP_GPUS": "3"}
    assert node_resources(env).gpus == ("3",)
    assert node_resources({**env, "CUDA_VISIBLE_DEVICES": "0"}).gpus == ("0",)
    assert node_resources({**env, "CUDA_VISIBLE_DEVICES": "NoDevFiles"}).gpus == ()


def test_local_site_default_is_the_whole_machine(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 12)
    assert node_resources({}).cpus == 12
    assert node_resources({}, cpus=3, gpus=["0"], mem_mb=1024) == NodeResources(3, ("0",), 1024, "site config")
    assert "3 cores, GPUs 0, 1024 MiB" in node_resources({}, cpus=3, gpus=["0"], mem_mb=1024).describe()


def test_gpu_environment_names_only_the_tasks_devices():
    assert gpu_environment(["1", "3"]) == dict.fromkeys(GPU_VARIABLES, "1,3")
    assert gpu_environment([]) == dict.fromkeys(GPU_VARIABLES, "")   # a CPU task sees no GPU


# -- the claim policy -------------------------------------------------------------------
def c(mid, stage=0, ready=100, room=None, **kw):
    return Candidate(mid, stage, ready, room, **kw)


def test_fills_the_cores_downstream_first():
    got = plan([c(1, stage=0), c(2, stage=1), c(3, stage=2)], Budget(cpus=8))
    # one each first (nobody starves), then the last stage takes the rest
    assert got == {1: 1, 2: 1, 3: 6}


def test_no_module_starves_while_downstream_has_work():
    got = plan([c(1, stage=0), c(2, stage=5)], Budget(cpus=2))
    assert got == {1: 1, 2: 1}


def test_longest_unserved_goes_first_when_cores_are_few():
    got = plan([c(1, stage=3, last_served=10.0), c(2, stage=0, last_served=5.0)], Budget(cpus=1))
    assert got == {2: 1}


def test_slots_room_and_ready_bound_what_is_claimed():
    got = plan([c(1, stage=1, ready=2), c(2, stage=2, room=3), c(3, room=0)], Budget(cpus=16))
    assert got == {1: 2, 2: 3}


def test_task_cpus_gpus_and_memory_are_counted():
    cands = [c(1, stage=1, cpus=2), c(2, stage=0, cpus=1, gpus=1)]
    assert plan(cands, Budget(cpus=4)) == {1: 2}                      # no GPU: the GPU module waits
    assert plan(cands, Budget(cpus=5, gpus=2)) == {1: 2, 2: 1}
    assert plan([c(1, cpus=1, mem_mb=3000)], Budget(cpus=8, mem_mb=10000)) == {1: 3}


def test_simulated_pipeline_moves_data_on_and_serves_every_stage():
    # A 3-stage pipeline on an 8-core pilot, tasks of one cycle each: whatever a stage
    # finishes becomes ready for the next. Downstream first keeps little data waiting,
    # and every stage runs in every cycle while it has work.
    ready = {1: 200, 2: 0, 3: 0}
    done = 0
    waiting_peak = 0
    served = {1: 0.0, 2: 0.0, 3: 0.0}
    for cycle in range(1, 200):
        got = plan([c(m, stage=m - 1, ready=ready[m], last_served=served[m]) for m in ready], Budget(cpus=8))
        assert sum(got.values()) == min(8, sum(ready.values()))       # never a free core with work ready
        for m, n in got.items():
            ready[m] -= n
            served[m] = float(cycle)
            if m < 3:
                ready[m + 1] += n
            else:
                done += n
        waiting_peak = max(waiting_peak, ready[2] + ready[3])
        if done == 200:
            break
    assert done == 200 and waiting_peak <= 16


# -- stages ---------------------------------------------------------------------------
def test_stages_follow_sink_modules():
    assert stages({"scatter": ["calc"], "calc": ["gather"], "gather": []}) == {"scatter": 0, "calc": 1, "gather": 2}


def test_stages_of_a_router_app():
    # Upstream's pattern: the router sends to every module, which answer to it.
    got = stages({"router": ["a", "b"], "a": [], "b": ["c"], "c": []}, main_router="router")
    assert got == {"router": 0, "a": 1, "b": 1, "c": 2}


@pytest.mark.parametrize("sinks", [{}, {"only": []}])
def test_stages_trivial(sinks):
    assert set(stages(sinks).values()) <= {0}
