"""Pilots (issue 11) on the local site with a real PostgreSQL: many tasks at once per
worker, per-task cores and GPUs, a pipeline in one pilot, slots across pilots, and a
SIGKILLed pilot's running tasks recovered one attempt each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import local_site
from test_faults import query, wait_for
from test_worker import run_controller_until_done


def write_app(root: Path, yaml: str, programs: dict[str, str]) -> Path:
    (root / "code").mkdir(parents=True)
    for name, text in programs.items():
        path = root / "code" / name
        path.write_text("#!/bin/sh\n" + text)
        path.chmod(0o755)
    (root / "app.yaml").write_text(yaml)
    return root


def module_yaml(name: str, command: str, **keys) -> str:
    text = f"  {name}:\n    base_image: host\n    code_path: ./code\n    command: ./{command}\n"
    return text + "".join(f"    {k}: {v}\n" for k, v in keys.items())


def max_overlap(intervals) -> int:
    """The most intervals (start, end) open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def runs(dsn, app_id, module=None):
    """(worker, slot, cpus, gpus, start, end, stdout) of each successful attempt."""
    return query(dsn, "SELECT e.worker_id, e.slot, e.cpus, e.gpus, e.t_program_start, e.t_program_end, e.stdout "
                      "FROM task_exec e JOIN tasks t ON t.id = e.task_id JOIN modules m ON m.id = t.module_id "
                      "WHERE t.app_id = %s AND e.status_code = 0 AND (%s::text IS NULL OR m.name = %s)",
                 app_id, module, module)


@contextmanager
def controller(env):
    """A controller running in the background for the duration of the block."""
    ctl = subprocess.Popen([sys.executable, "-m", "scalebox_hpc", "controller"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield ctl
    finally:
        ctl.terminate()
        ctl.wait(timeout=30)


def submit(sbx, app: Path) -> int:
    return json.loads(sbx("submit", "--json", app, check=0).stdout)["id"]


def peak_connections(dsn, stop: threading.Event, peaks: dict) -> None:
    """Until stop: the most PostgreSQL connections each pilot held at once (they are
    named 'scalebox-hpc worker N' in pg_stat_activity)."""
    while not stop.is_set():
        for name, n in query(dsn, "SELECT application_name, count(*) FROM pg_stat_activity "
                                  "WHERE application_name LIKE 'scalebox-hpc worker %%' GROUP BY 1"):
            peaks[name] = max(peaks.get(name, 0), n)
        time.sleep(0.05)


def test_one_pilot_with_4_cores_runs_4_tasks_at_once(sbx, sbx_env, dsn, tmp_path):
    """4 at once in one pilot, on at most 2 database connections whatever its lanes."""
    local_site(sbx_env, tmp_path, cpus=4)
    app = write_app(tmp_path / "four", "name: four\nmodules:\n" + module_yaml("work", "nap.sh", slots=4),
                    {"nap.sh": "sleep 1\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "work", *[f"t{i}" for i in range(8)], check=0)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=peak_connections, args=(dsn, stop, peaks))
    sampler.start()
    try:
        run_controller_until_done(sbx_env, dsn, app_id)
    finally:
        stop.set()
        sampler.join()
    rows = runs(dsn, app_id)
    assert len(rows) == 8
    (worker_id, cpus), = query(dsn, "SELECT id, cpus FROM workers")
    assert cpus == 4, "one pilot, of 4 cores"
    assert max_overlap([(r[4], r[5]) for r in rows]) == 4
    assert {r[1] for r in rows} == {0, 1, 2, 3} and {r[2] for r in rows} == {1}
    assert peaks == {f"scalebox-hpc worker {worker_id}": 2}, "its claims and commits, and its heartbeat"


def test_an_idle_pilot_leaves_after_idle_seconds(sbx, sbx_env, dsn, tmp_path):
    """A pilot with nothing it may run leaves after the idle time, though its app goes on
    (here a module whose check hook keeps saying no), and its task stays READY."""
    local_site(sbx_env, tmp_path, cpus=2)
    yaml = ("name: idle\nmodules:\n" + module_yaml("work", "nap.sh") +
            module_yaml("closed", "nap.sh", check="./no.sh"))
    app = write_app(tmp_path / "idle", yaml, {"nap.sh": "sleep 0.2\n", "no.sh": "exit 1\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "work", "w", check=0)
    sbx("task", "add", app_id, "closed", "c", check=0)
    with controller({**sbx_env, "SCALEBOX_IDLE_SECONDS": "3"}):
        (message, lived), = wait_for(
            lambda: query(dsn, "SELECT message, extract(epoch from stopped_at - started_at) FROM workers "
                               "WHERE status = 'EXITED' ORDER BY id LIMIT 1"), timeout=60, what="an idle exit")
    assert message == "idle for 3 s"
    assert 3 <= float(lived) < 10
    assert query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] == "RUNNING"
    statuses = dict(query(dsn, "SELECT body, status FROM tasks WHERE app_id = %s", app_id))
    assert statuses == {"w": 0, "c": -1}


def test_task_cpus_2_runs_2_at_a_time(sbx, sbx_env, dsn, tmp_path):
    local_site(sbx_env, tmp_path, cpus=4)
    app = write_app(tmp_path / "two", "name: two\nmodules:\n" + module_yaml("work", "nap.sh", slots=2, task_cpus=2),
                    {"nap.sh": "echo $OMP_NUM_THREADS\nsleep 1\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "work", *[f"t{i}" for i in range(6)], check=0)
    run_controller_until_done(sbx_env, dsn, app_id)
    rows = runs(dsn, app_id)
    assert len(rows) == 6 and query(dsn, "SELECT count(*) FROM workers")[0][0] == 1
    assert max_overlap([(r[4], r[5]) for r in rows]) == 2
    assert {r[2] for r in rows} == {2} and {r[6] for r in rows} == {"2\n"}


def test_gpu_tasks_see_their_own_devices(sbx, sbx_env, dsn, tmp_path):
    local_site(sbx_env, tmp_path, cpus=4, gpus=2)
    app = write_app(tmp_path / "gpu", "name: gpu\nmodules:\n" +
                    module_yaml("train", "gpu.sh", slots=4, task_gpus=1) + module_yaml("cpu", "gpu.sh", slots=1),
                    {"gpu.sh": "echo \"cuda=$CUDA_VISIBLE_DEVICES rocr=$ROCR_VISIBLE_DEVICES\"\nsleep 1\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "train", "a", "b", check=0)
    sbx("task", "add", app_id, "cpu", "c", check=0)
    run_controller_until_done(sbx_env, dsn, app_id)
    train = runs(dsn, app_id, "train")
    assert max_overlap([(r[4], r[5]) for r in train]) == 2, "both GPU tasks ran at once"
    assert sorted(r[6] for r in train) == ["cuda=0 rocr=0\n", "cuda=1 rocr=1\n"]
    assert sorted(r[3] for r in train) == ["0", "1"]
    # A task that asked for no GPU sees none on a GPU node.
    assert [r[6] for r in runs(dsn, app_id, "cpu")] == ["cuda= rocr=\n"]


def test_pipeline_runs_in_one_pilot(sbx, sbx_env, dsn, tmp_path):
    """Each stage's tasks start in the pilot that ran the stage before: one worker job
    (its 4 cores hold what all stages may run at once)."""
    local_site(sbx_env, tmp_path, cpus=4)
    yaml = ("name: pipe\nmodules:\n" + module_yaml("scatter", "scatter.sh", sink_modules="[calc]") +
            module_yaml("calc", "calc.sh", slots=2, sink_modules="[gather]") + module_yaml("gather", "gather.sh"))
    app = write_app(tmp_path / "pipe", yaml, {
        "scatter.sh": 'for i in 1 2 3 4 5 6; do echo "$i" >> "$WORK_DIR/sink-tasks.txt"; done\n',
        "calc.sh": 'sleep 0.3; echo "sq-$(( $1 * $1 ))" > "$WORK_DIR/sink-tasks.txt"\n',
        "gather.sh": "echo got $1\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "scatter", "go", check=0)
    run_controller_until_done(sbx_env, dsn, app_id)
    assert sorted(r[6] for r in runs(dsn, app_id, "gather")) == sorted(
        f"got sq-{i * i}\n" for i in range(1, 7))
    assert query(dsn, "SELECT count(*) FROM workers")[0][0] == 1, "no second worker for the later stages"
    assert query(dsn, "SELECT count(DISTINCT worker_id) FROM task_exec")[0][0] == 1


def test_slots_hold_across_pilots(sbx, sbx_env, dsn, tmp_path):
    """Three pilots or more serve one app; a module's slots cap its tasks across all."""
    local_site(sbx_env, tmp_path, cpus=2)
    yaml = "name: slots\nmodules:\n" + module_yaml("a", "nap.sh", slots=3) + module_yaml("b", "nap.sh", slots=4)
    app = write_app(tmp_path / "slots", yaml, {"nap.sh": "sleep 0.6\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "a", *[f"a{i}" for i in range(12)], check=0)
    sbx("task", "add", app_id, "b", *[f"b{i}" for i in range(12)], check=0)
    run_controller_until_done(sbx_env, dsn, app_id, timeout=180)
    a, b = runs(dsn, app_id, "a"), runs(dsn, app_id, "b")
    assert len(a) == len(b) == 12
    assert len({r[0] for r in a + b}) >= 3, "the tasks were spread over several pilots"
    assert max_overlap([(r[4], r[5]) for r in a]) <= 3
    assert max_overlap([(r[4], r[5]) for r in b]) <= 4


def test_sigkilled_pilot_loses_each_running_task_once(sbx, sbx_env, dsn, tmp_path):
    """SIGKILL of a pilot running 4 tasks: 4 attempts recorded with code 123, each task
    retried and its message routed exactly once."""
    local_site(sbx_env, tmp_path, cpus=4)
    yaml = ("name: kill\nmodules:\n" + module_yaml("work", "work.sh", slots=4, sink_modules="[sink]") +
            module_yaml("sink", "sink.sh", slots=1))
    app = write_app(tmp_path / "kill", yaml, {
        # The first attempt sleeps long (it is the one killed); the retry is quick.
        "work.sh": '[ "$ATTEMPT" = 1 ] && sleep 60\necho "$1" > "$WORK_DIR/sink-tasks.txt"\n',
        "sink.sh": "echo $1\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "work", "w1", "w2", "w3", "w4", check=0)
    with controller(sbx_env):
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = -3")[0][0] == 4,
                 timeout=60, what="4 running tasks")
        (pid,), = query(dsn, "SELECT DISTINCT w.pid FROM workers w JOIN tasks t ON t.worker_id = w.id "
                             "WHERE t.status = -3")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] == "FINISHED",
                 timeout=120, interval=0.2, what="app FINISHED")
    lost = query(dsn, "SELECT t.body FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "WHERE e.status_code = 123")
    assert sorted(b for b, in lost) == ["w1", "w2", "w3", "w4"]
    assert sorted(r[6] for r in runs(dsn, app_id, "sink")) == ["w1\n", "w2\n", "w3\n", "w4\n"]
    assert query(dsn, "SELECT count(*) FROM tasks t JOIN modules m ON m.id = t.module_id "
                      "WHERE m.name = 'sink'")[0][0] == 4


def test_submit_refuses_a_task_bigger_than_any_pilot(sbx, sbx_env, tmp_path):
    local_site(sbx_env, tmp_path, cpus=4)
    app = write_app(tmp_path / "big", "name: big\nmodules:\n" + module_yaml("huge", "x.sh", task_cpus=5),
                    {"x.sh": "true\n"})
    proc = sbx("submit", app, check=1)
    line, = proc.stderr.strip().splitlines()
    assert "modules.huge" in line and "task_cpus 5" in line and "site local" in line and "4 cores" in line
    assert "Traceback" not in proc.stderr


def test_a_pilot_takes_up_another_app_on_its_site(sbx, sbx_env, dsn, tmp_path):
    """A pilot serves every running app of its site: an app submitted while another's
    pilot runs has its tasks run by that pilot, with no second worker, side by side."""
    local_site(sbx_env, tmp_path, cpus=2)
    first = write_app(tmp_path / "first", "name: first\nmodules:\n" + module_yaml("a", "nap.sh", slots=1),
                      {"nap.sh": "sleep 1\n"})
    second = write_app(tmp_path / "second", "name: second\nmodules:\n" +
                       module_yaml("b", "nap.sh", slots=1, start_task="[b1, b2]"), {"nap.sh": "sleep 0.5\n"})
    a_id = submit(sbx, first)
    sbx("task", "add", a_id, "a", *[f"a{i}" for i in range(4)], check=0)
    with controller(sbx_env):
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = -3")[0][0] == 1,
                 timeout=60, what="first app running")
        b_id = submit(sbx, second)
        for app_id in (a_id, b_id):
            wait_for(lambda a=app_id: query(dsn, "SELECT status FROM apps WHERE id = %s", a)[0][0] == "FINISHED",
                     timeout=60, interval=0.2, what=f"app {app_id} FINISHED")
    a, b = runs(dsn, a_id), runs(dsn, b_id)
    assert len(a) == 4 and len(b) == 2
    assert query(dsn, "SELECT count(*) FROM workers")[0][0] == 1, "no worker of its own for the second app"
    assert {r[0] for r in a + b} == {1}
    assert min(r[4] for r in b) < max(r[5] for r in a), "the second app ran while the first still did"


def test_cancelling_one_app_leaves_the_pilots_other_app_running(sbx, sbx_env, dsn, tmp_path):
    """Cancel one of two apps a pilot serves: its running task is stopped and counts for
    nothing; the other app's task runs on to its end and no attempt of it is lost."""
    local_site(sbx_env, tmp_path, cpus=2)
    keep = write_app(tmp_path / "keep", "name: keep\nmodules:\n" + module_yaml("k", "nap.sh"),
                     {"nap.sh": "sleep 4\necho kept\n"})
    drop = write_app(tmp_path / "drop", "name: drop\nmodules:\n" + module_yaml("d", "nap.sh", start_task="[d1]"),
                     {"nap.sh": "sleep 60\n"})
    keep_id = submit(sbx, keep)
    sbx("task", "add", keep_id, "k", "k1", check=0)
    with controller(sbx_env):
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = -3")[0][0] == 1,
                 timeout=60, what="the first app's task running")
        drop_id = submit(sbx, drop)
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = -3")[0][0] == 2,
                 timeout=30, what="both apps' tasks running in the pilot")
        started = time.monotonic()
        sbx("app", "cancel", drop_id, check=0)
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", keep_id)[0][0] == "FINISHED",
                 timeout=60, interval=0.2, what="the kept app FINISHED")
        (gone,), = wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE app_id = %s AND status = -3",
                                          drop_id)[0][0] == 0 and [(True,)], timeout=30, what="d1 stopped")
    assert time.monotonic() - started < 40, "the cancelled app's program was not left to run its 60 s"
    assert [r[6] for r in runs(dsn, keep_id)] == ["kept\n"]
    assert query(dsn, "SELECT count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "WHERE t.app_id = %s", keep_id)[0][0] == 1, "one attempt, none lost"
    assert query(dsn, "SELECT count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "WHERE t.app_id = %s AND e.status_code = 0", drop_id)[0][0] == 0
    assert query(dsn, "SELECT count(*) FROM workers")[0][0] == 1
    assert query(dsn, "SELECT status FROM apps WHERE id = %s", drop_id)[0][0] == "CANCELLED"


def test_builtin_pass_routes_its_body_on_without_a_process(sbx, sbx_env, dsn, tmp_path):
    # '@pass' (a pipeline stage of no cost, for benchmarks) sends its body to its sink
    # modules; an unknown builtin is refused at submit.
    app = tmp_path / "pass"
    app.mkdir()
    (app / "app.yaml").write_text("name: pass\nmodules:\n  a:\n    command: '@pass'\n    sink_modules: [b]\n"
                                  "    start_task: [x, 'y,z']\n  b:\n    command: '@noop'\n")
    summary = json.loads(sbx("run", "--json", app, check=0).stdout)
    assert summary["modules"]["a"]["ok"] == 2 and summary["modules"]["b"]["ok"] == 2
    rows = query(dsn, "SELECT t.body, t.from_task_id IS NOT NULL FROM tasks t JOIN modules m ON m.id = t.module_id "
                      "WHERE t.app_id = %s AND m.name = 'b' ORDER BY t.body", summary["id"])
    assert rows == [("x", True), ("y,z", True)]
    (app / "app.yaml").write_text("name: bad\nmodules:\n  a:\n    command: '@nope'\n")
    proc = sbx("submit", app, check=1)
    assert "unknown builtin program @nope (builtins: @noop, @pass)" in proc.stderr


# -- batches of short host tasks run in a process of their lane (laneproc.py) -------------
def pilot_pid(dsn) -> int:
    return wait_for(lambda: query(dsn, "SELECT pid FROM workers WHERE pid IS NOT NULL"), timeout=60,
                    what="a pilot")[0][0]


def children(pid: int) -> set[int]:
    """The live processes whose parent is pid."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def test_short_tasks_run_in_lane_processes_each_with_its_own_output(sbx, sbx_env, dsn, tmp_path):
    """300 short tasks on 2 lanes: once batches are long, each lane runs them in a
    process of its own (the program's parent is not the pilot); every task still gets
    its own output, files and exit code on record, and the lanes' processes end with
    the pilot."""
    local_site(sbx_env, tmp_path, cpus=2)
    app = write_app(tmp_path / "short", "name: short\nmodules:\n" + module_yaml("m", "m.sh", slots=2), {
        "m.sh": 'echo "$1 $PPID"\necho "err $1" >&2\n[ $(($1 % 50)) = 7 ] && echo x > "$WORK_DIR/o-$1.dat"\n'
                '[ $(($1 % 100)) = 99 ] && exit 3\nexit 0\n'})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "m", *map(str, range(300)), check=0)
    with controller(sbx_env):
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] in ("FINISHED", "ERROR"),
                 timeout=120, interval=0.2, what="app ended")
        pid = pilot_pid(dsn)
        rows = query(dsn, "SELECT t.body, e.status_code, e.stdout, e.stderr, e.output_files FROM task_exec e "
                          "JOIN tasks t ON t.id = e.task_id WHERE t.app_id = %s AND e.attempt = 1", app_id)
        wait_for(lambda: query(dsn, "SELECT status FROM workers")[0][0] == "EXITED", timeout=30,
                 what="the pilot gone")
    assert len(rows) == 300
    parents = set()
    for body, code, stdout, stderr, files in rows:
        i = int(body)
        assert code == (3 if i % 100 == 99 else 0), (body, code, stderr)
        number, parent = stdout.split()
        assert number == body and stderr == f"err {body}\n"
        assert (files == [f"o-{body}.dat"]) == (i % 50 == 7), (body, files)
        parents.add(int(parent))
    lanes = parents - {pid}
    assert pid in parents, "the first tasks, one by one, ran in the pilot's lane threads"
    assert len(lanes) == 2, f"each lane ran its batches in one process of its own: {parents}"
    assert not children(pid) and not any(Path(f"/proc/{p}").exists() for p in lanes)


def test_drained_pilot_lets_a_lane_process_finish_its_task_and_returns_the_rest(sbx, sbx_env, dsn, tmp_path):
    """SIGUSR1 while the lanes run batches in their processes: the running tasks finish
    and count, the batches' other tasks go back unstarted (no attempt), nothing is lost."""
    local_site(sbx_env, tmp_path, cpus=2)
    app = write_app(tmp_path / "drain", "name: drain\nmodules:\n" + module_yaml("m", "m.sh", slots=2),
                    {"m.sh": "sleep 0.01\n"})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "m", *map(str, range(3000)), check=0)
    with controller(sbx_env) as ctl:
        wait_for(lambda: query(dsn, "SELECT count(*) FROM task_exec")[0][0] >= 300, timeout=60,
                 what="300 tasks done")
        pid = pilot_pid(dsn)
        assert len(children(pid)) >= 2, "the lanes run in processes of their own"
        ctl.terminate()     # no controller to start another pilot
        ctl.wait(timeout=30)
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: query(dsn, "SELECT status FROM workers WHERE pid = %s", pid)[0][0] == "EXITED",
                 timeout=30, what="the pilot drained")
    codes = dict(query(dsn, "SELECT e.status_code, count(*) FROM task_exec e GROUP BY 1"))
    ready, held = query(dsn, "SELECT count(*) FILTER (WHERE status = -1), count(*) FILTER (WHERE status IN (-2, -3)) "
                             "FROM tasks WHERE app_id = %s", app_id)[0]
    assert list(codes) == [0], f"every attempt ran to its end: {codes}"
    assert held == 0 and ready + codes[0] == 3000 and ready > 0
    assert query(dsn, "SELECT count(*) FROM tasks t WHERE app_id = %s AND status = -1 AND EXISTS "
                      "(SELECT 1 FROM task_exec e WHERE e.task_id = t.id)", app_id)[0][0] == 0
    assert not children(pid)


def test_sigkilled_pilot_takes_its_lane_processes_with_it(sbx, sbx_env, dsn, tmp_path):
    """SIGKILL of a pilot whose lanes run batches in processes: those end at once too
    (no task starts after), the tasks it held (the two programs running, the rest of
    their batches) are recovered as attempts with code 123, and every task is done
    exactly once in the end."""
    local_site(sbx_env, tmp_path, cpus=2)
    hold = tmp_path / "hold"
    hold.touch()
    app = write_app(tmp_path / "kill", "name: killp\nmodules:\n" + module_yaml("m", "m.sh", slots=2), {
        # Tasks 200 and up sleep until the pilot is killed (the marker goes then); whatever
        # runs after, in this pilot's batches or not, is quick.
        "m.sh": f'[ "$1" -ge 200 ] && [ -e {hold} ] && sleep 60\necho "$1"\n'})
    app_id = submit(sbx, app)
    sbx("task", "add", app_id, "m", *map(str, range(400)), check=0)
    with controller(sbx_env):
        wait_for(lambda: query(dsn, "SELECT count(*) FROM tasks WHERE status = -3")[0][0] == 2,
                 timeout=60, what="2 long tasks running")
        pid = pilot_pid(dsn)
        lanes = children(pid)
        assert len(lanes) == 2
        # Both lanes are in a 60 s program: what the pilot holds stays as it is until the kill.
        held = {b for b, in query(dsn, "SELECT body FROM tasks WHERE app_id = %s AND status IN (-2, -3)", app_id)}
        running = {b for b, in query(dsn, "SELECT body FROM tasks WHERE app_id = %s AND status = -3", app_id)}
        os.kill(pid, signal.SIGKILL)
        hold.unlink()
        wait_for(lambda: not any(Path(f"/proc/{p}/stat").exists() and " Z " not in Path(f"/proc/{p}/stat").read_text()
                                 for p in lanes), timeout=5, what="the lane processes gone")
        wait_for(lambda: query(dsn, "SELECT status FROM apps WHERE id = %s", app_id)[0][0] == "FINISHED",
                 timeout=240, interval=0.2, what="app FINISHED")
    lost = query(dsn, "SELECT t.body FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "WHERE t.app_id = %s AND e.status_code = 123", app_id)
    assert len(running) == 2 and running <= held
    assert sorted(b for b, in lost) == sorted(held), "one attempt lost for each task it held, no other"
    done = query(dsn, "SELECT t.body, count(*) FROM task_exec e JOIN tasks t ON t.id = e.task_id "
                      "WHERE t.app_id = %s AND e.status_code = 0 GROUP BY 1", app_id)
    assert sorted(int(b) for b, _ in done) == list(range(400)) and {n for _, n in done} == {1}


def ahead_processes(state_dir: str) -> list[int]:
    """Live processes started ahead (worker-ahead) by scalebox-hpc run on this state directory."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if b"worker-ahead" in cmdline and f"SCALEBOX_STATE_DIR={state_dir}".encode() in environ.split(b"\0"):
            found.append(int(entry))
    return found


def test_run_starts_its_local_pilot_while_it_writes_the_app(sbx, sbx_env, dsn, tmp_path):
    """scalebox-hpc run starts the local pilot's process before it writes the app: the
    tasks' pilot is that process, it was there before the app, it logs to its worker's
    log as a launched pilot does, and nothing started ahead outlives its use."""
    app = write_app(tmp_path / "ahead", "name: ahead\nmodules:\n" + module_yaml("m", "m.sh", start_task="[a, b, c]"),
                    {"m.sh": "tr '\\0' ' ' < /proc/$PPID/cmdline\n"})
    summary = json.loads(sbx("run", "--json", app, check=0).stdout)
    assert summary["modules"]["m"]["ok"] == 3
    (wid, created), = query(dsn, "SELECT w.id, a.created_at FROM workers w JOIN modules m ON m.id = w.module_id "
                                 "JOIN apps a ON a.id = m.app_id")
    assert all("worker-ahead" in r[6] for r in runs(dsn, summary["id"])), "the pilot is the process started ahead"
    logs = Path(sbx_env["SCALEBOX_STATE_DIR"], "logs")
    # Started (its log opened) before the app was written; it never wrote there.
    ahead_log = logs / "worker-ahead.log"
    assert ahead_log.stat().st_size == 0 and ahead_log.stat().st_mtime < created.timestamp()
    log = logs / f"worker-{wid}.log"
    wait_for(lambda: "stopped: EXITED" in log.read_text(), timeout=30, what="the pilot's sign-off in its log")
    assert f"worker {wid} on " in log.read_text()
    wait_for(lambda: not ahead_processes(sbx_env["SCALEBOX_STATE_DIR"]), timeout=30, what="no process left")
