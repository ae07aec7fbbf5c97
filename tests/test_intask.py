"""The in-task `scalebox` command (scalebox_hpc/intask/scalebox) run as a program calls it,
read back as the worker reads it."""
from __future__ import annotations

import subprocess

import pytest

from scalebox_hpc import intask
from scalebox_hpc.errors import TaskFileError
from scalebox_hpc.taskfiles import INTASK_DIR, read_intask_dir

MODULES = {"calc", "gather"}
ODD = ["it's \"quoted\"; $(id) `id` $HOME \\ * ?", "ünïcödé", "trailing newline\n", "", "-H", "a,{\"x\":1}"]


def scalebox(work, *args, stdin=None, env_extra=None):
    env = {"PATH": "/usr/bin:/bin", "WORK_DIR": str(work), **(env_extra or {})}
    return subprocess.run(["sh", str(intask.SCRIPT), *args], input=stdin, env=env, capture_output=True,
                          text=True)


def read(work):
    return read_intask_dir(str(work / INTASK_DIR), known_modules=MODULES)


def test_bodies_pass_byte_for_byte_in_order(tmp_path):
    assert scalebox(tmp_path, "task", "add", "--sink-job", "calc", "--", *ODD).returncode == 0
    assert scalebox(tmp_path, "task", "add", "-h", "k=v", "--to-host", "n1", "last").returncode == 0
    found = read(tmp_path)
    assert [m.body for m in found.messages] == ODD + ["last"]
    assert {m.module for m in found.messages[:-1]} == {"calc"}
    assert found.messages[-1].module is None and found.messages[-1].headers == {"k": "v", "to_host": "n1"}


def test_bodies_from_stdin_and_a_task_file(tmp_path):
    (tmp_path / "list").write_text("a b\n\\n\nno newline at the end")
    assert scalebox(tmp_path, "task", "add", "--task-file", str(tmp_path / "list")).returncode == 0
    assert scalebox(tmp_path, "task", "add", stdin="x\ny\n").returncode == 0
    assert [m.body for m in read(tmp_path).messages] == ["a b", "\\n", "no newline at the end", "x", "y"]


def test_task_file_lines_are_read_as_sink_tasks_lines(tmp_path):
    (tmp_path / "list").write_text('plain\ngather,to gather\nwith,{"h":"1"}\n')
    assert scalebox(tmp_path, "task", "add", "--sink-module", "calc", "-H", "k=v", "--task-file",
                    str(tmp_path / "list")).returncode == 0
    got = [(m.module, m.body, m.headers) for m in read(tmp_path).messages]
    assert got == [("calc", "plain", {"k": "v"}), ("gather", "to gather", {"k": "v"}),
                   ("calc", "with", {"k": "v", "h": "1"})]


def test_result_and_semaphores(tmp_path):
    assert scalebox(tmp_path, "app", "set-finished", "--job-id=7", "Hello", "you").returncode == 0
    assert scalebox(tmp_path, "semaphore", "increment-n", "s:sum", "12").returncode == 0
    assert scalebox(tmp_path, "semaphore", "increment-n", "s:sum", "-2").returncode == 0
    assert scalebox(tmp_path, "semaphore", "increment", "s:n").returncode == 0
    found = read(tmp_path)
    assert found.app_result == "Hello you"
    assert [(s.name, s.op, s.value) for s in found.semaphores] == [("s:sum", "+", 12), ("s:sum", "-", 2),
                                                                    ("s:n", "+", 1)]


@pytest.mark.parametrize("args, message", [
    (["task", "add", "--bogus", "x"], "unknown flag '--bogus' for 'task add'"),
    (["task", "add", "-H", "novalue", "x"], "header 'novalue' is not k=v"),
    (["task", "add", "--headers", "[1]", "x"], "is not a JSON object"),
    (["task", "add", "--sink-job"], "flag --sink-job needs a value"),
    (["task", "rm"], "unknown command 'task rm'"),
    (["semaphore", "increment-n", "s", "x"], "'x' is not an integer"),
    (["app", "set-status", "RUNNING"], "only FINISHED"),
])
def test_bad_calls_get_one_line_and_exit_2(tmp_path, args, message):
    proc = scalebox(tmp_path, *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and proc.stderr.startswith("scalebox: ")
    assert read(tmp_path).messages == []


def test_outside_a_task_it_says_so(tmp_path):
    proc = subprocess.run(["sh", str(intask.SCRIPT), "task", "add", "x"], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "WORK_DIR is not set" in proc.stderr


def test_unknown_sink_module_fails_the_task_file_check(tmp_path):
    assert scalebox(tmp_path, "task", "add", "--sink-module", "nope", "x").returncode == 0
    with pytest.raises(TaskFileError, match="unknown sink module \"nope\"; expected one of: calc, gather"):
        read(tmp_path)
