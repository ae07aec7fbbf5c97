"""App definition loading: aliases, substitution, and error messages that point at file:line."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from scalebox_hpc.appdef import AppDef, load_app, load_env_file
from scalebox_hpc.errors import ConfigError


def write(path, text, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    if mode is not None:
        path.chmod(mode)
    return path


def script(path):
    return write(path, "#!/bin/sh\nexit 0\n", 0o755)


@pytest.fixture
def app_dir(tmp_path):
    script(tmp_path / "router.sh")
    script(tmp_path / "calc-code" / "run.sh")
    script(tmp_path / "calc-code" / "check")
    (tmp_path / "calc.sif").write_bytes(b"sif")
    return tmp_path


def load(app_dir, text, **kwargs):
    write(app_dir / "app.yaml", text)
    kwargs.setdefault("environ", {})
    return load_app(app_dir / "app.yaml", **kwargs)


def error(app_dir, text, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(app_dir, text, **kwargs)
    return str(info.value)


def test_valid_app_with_upstream_aliases(app_dir):
    app = load(app_dir, """
        name: app-primes
        cluster: local
        parameters:
          main_router: router
        jobs:
          router:
            command: ./router.sh
            start_message: 100000
          calc:
            base_image: ./calc.sif
            code_path: ./calc-code
            sink_jobs: router
            hosts: ["h0:4"]
            task_max_seconds: "600"
            retry_rules: "['1:3','2:2','*']"
            task_dist_mode: host_bound
            environments: [NUM_GROUPS=10]
            volumes: ["/data:/data:ro"]
            parameters:
              task_batch_size: 8
            variables:
              repeatable: yes
    """)
    assert app.name == "app-primes" and app.site == "local" and app.main_router == "router"
    assert app.path == str(app_dir / "app.yaml") and app.app_dir == str(app_dir)
    assert list(app.modules) == ["router", "calc"]
    router, calc = app.modules["router"], app.modules["calc"]
    assert router.base_image == "host"
    assert router.command == str(app_dir / "router.sh")
    assert router.start_tasks == ["100000"]
    assert router.line == 6
    assert calc.base_image == str(app_dir / "calc.sif")
    assert calc.code_path == str(app_dir / "calc-code")
    assert calc.command == str(app_dir / "calc-code" / "run.sh")
    assert calc.check == str(app_dir / "calc-code" / "check") and calc.setup is None
    assert calc.sink_modules == ["router"]
    assert calc.slots == 4
    assert calc.task_max_seconds == 600
    assert calc.retry_rules.rules == (("1", 3), ("2", 2), ("*", 1))
    assert calc.task_dist_mode == "HOST-BOUND"
    assert calc.environments == {"NUM_GROUPS": "10"}
    assert calc.volumes == ["/data:/data:ro"]
    assert calc.task_batch_size == 8

    data = app.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["modules"]["calc"]["retry_rules"] == [["1", 3], ["2", 2], ["*", 1]]
    assert AppDef.from_json(data) == app


def test_directory_path_and_hosts_sum(app_dir):
    write(app_dir / "scalebox.yaml", """
        name: a
        modules:
          m:
            command: router.sh
            hosts: ["h0:4", "h1:2", h2]
            task_dist_mode: SLOT-BOUND
    """)
    app = load_app(app_dir, environ={})
    assert app.modules["m"].slots == 7
    assert app.modules["m"].host_slots == {"h0": 4, "h1": 2, "h2": 1}   # per host, as upstream means it
    assert app.modules["m"].task_dist_mode == "DEFAULT"


def test_missing_app_file_in_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_app(tmp_path, environ={})
    assert str(tmp_path) in str(info.value) and "app.yaml" in str(info.value)


def test_file_start_tasks(app_dir):
    write(app_dir / "tasks.txt", "a\n\nb c\n  \nd\n")
    app = load(app_dir, """
        name: a
        modules:
          m:
            command: ./router.sh
            start_task: FILE:tasks.txt
    """)
    assert app.modules["m"].start_tasks == ["a", "b c", "d"]


def test_missing_start_task_file(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: ./router.sh
            start_task: FILE:nope.txt
    """)
    assert "app.yaml:5: modules.m.start_task:" in msg and "nope.txt" in msg


def test_variable_precedence_and_defaults(app_dir, tmp_path_factory):
    write(app_dir / "scalebox.env", """
        # app-level values
        B=from-scalebox-env
        C=from-scalebox-env
        D=from-scalebox-env
    """)
    extra = write(tmp_path_factory.mktemp("env") / "extra.env", """
        export C="from-e-file"
        D='from-e-file'
    """)
    app = load(app_dir, """
        name: ${NAME:-fallback}
        parameters:
          a: ${A}
          b: ${B}
          c: ${C}
          d: ${D}
          e: ${UNSET:-dflt}
          f: $${LITERAL}
        # ${IN_A_COMMENT} is never looked up
        modules:
          m:
            command: ./router.sh
    """, env_files=[str(extra)], environ={"D": "from-environ"},
        site_defaults={"A": "from-site", "B": "from-site", "C": "from-site", "D": "from-site"})
    assert app.name == "fallback"
    assert app.parameters == {"a": "from-site", "b": "from-scalebox-env", "c": "from-e-file",
                              "d": "from-environ", "e": "dflt", "f": "${LITERAL}"}


def test_undefined_variable_names_file_line_and_variable(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: ${PROGRAM}
    """)
    assert "app.yaml:4:" in msg
    assert "undefined variable ${PROGRAM}: set it in the shell, scalebox.env or an -e FILE" in msg


def test_malformed_yaml_has_file_and_line(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: ./router.sh
           slots: [1
    """)
    assert "app.yaml:5:" in msg and "invalid YAML" in msg


def test_unknown_key_with_line_and_suggestion(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          calc:
            command: ./router.sh
            slotz: 4
    """)
    assert "app.yaml:5: modules.calc.slotz: unknown key 'slotz'" in msg
    assert "known: " in msg and "task_max_seconds" in msg
    assert "did you mean 'slots'?" in msg


def test_unknown_key_inside_module_parameters(app_dir):
    msg = error(app_dir, """
        name: a
        jobs:
          calc:
            command: ./router.sh
            parameters:
              no_such_key: x
    """)
    assert "app.yaml:6: jobs.calc.parameters.no_such_key: unknown key" in msg


def test_alias_given_twice(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          calc:
            command: ./router.sh
            slots: 2
            hosts: ["h0:4"]
    """)
    assert "app.yaml:6: modules.calc.hosts:" in msg and "modules.calc.slots" in msg


def test_unknown_sink_module(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          a:
            command: ./router.sh
            sink_modules: [b, x]
          b:
            command: ./router.sh
          c:
            command: ./router.sh
    """)
    assert "app.yaml:5: modules.a.sink_modules: unknown sink module 'x' (modules: a, b, c)" in msg


def test_unknown_main_router(app_dir):
    msg = error(app_dir, """
        name: a
        parameters:
          main_router: routr
        modules:
          router:
            command: ./router.sh
    """)
    assert "app.yaml:3: parameters.main_router:" in msg and "did you mean 'router'?" in msg


def test_invalid_retry_rule(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: ./router.sh
            retry_rules: ['1:3', 'x:2']
    """)
    assert "app.yaml:5: modules.m.retry_rules: invalid retry rule 'x:2'" in msg
    assert "use CODE:RETRIES" in msg


def test_missing_program(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: ./nope.sh
    """)
    assert "app.yaml:4: modules.m.command: program not found:" in msg
    assert str(app_dir / "nope.sh") in msg


def test_program_not_executable(app_dir):
    write(app_dir / "plain.sh", "echo\n", 0o644)
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: plain.sh
    """)
    assert "modules.m.command: program is not executable" in msg


def test_missing_default_run_sh_in_code_path(app_dir):
    (app_dir / "empty").mkdir()
    msg = error(app_dir, """
        name: a
        modules:
          m:
            code_path: empty
    """)
    assert "modules.m.command: program not found:" in msg and str(app_dir / "empty" / "run.sh") in msg


def test_program_inside_container_is_not_checked(app_dir):
    app = load(app_dir, """
        name: a
        modules:
          m:
            base_image: docker://alpine:3
            command: /app/bin/run.sh
          n:
            base_image: oras://example.org/img:1
          builtin:
            command: "@noop"
    """)
    assert app.modules["m"].command == "/app/bin/run.sh" and not app.modules["m"].hooks_in_image
    # No command: upstream's agent convention, the image's /app/bin/run.sh, and its
    # check.sh/setup.sh/teardown.sh where the image has them.
    assert app.modules["n"].command == "/app/bin/run.sh" and app.modules["n"].hooks_in_image
    assert app.modules["builtin"].command == "@noop"


def test_missing_image_path(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            base_image: images/missing.sif
    """)
    assert "app.yaml:4: modules.m.base_image: image not found:" in msg
    assert str(app_dir / "images" / "missing.sif") in msg


def test_duplicate_key(app_dir):
    msg = error(app_dir, """
        name: a
        modules:
          m:
            command: ./router.sh
            slots: 2
            slots: 3
    """)
    assert "app.yaml:6:" in msg and "duplicate key 'slots' (first at line 5)" in msg


@pytest.mark.parametrize("snippet, expected", [
    ("slots: 0", "modules.m.slots: expected an integer >= 1"),
    ("slots: yes", "modules.m.slots: expected an integer >= 1"),
    ("task_max_seconds: -5", "modules.m.task_max_seconds: expected an integer >= 1"),
    ("environments: [NOVALUE]", "modules.m.environments: invalid entry 'NOVALUE'"),
    ("volumes: ['']", "modules.m.volumes: empty volume entry"),
    ("task_dist_mode: sideways", "modules.m.task_dist_mode: unknown task_dist_mode"),
    ("code_path: nowhere", "modules.m.code_path: directory not found"),
])
def test_module_value_errors(app_dir, snippet, expected):
    msg = error(app_dir, f"name: a\nmodules:\n  m:\n    command: ./router.sh\n    {snippet}\n")
    assert f"app.yaml:5: {expected}" in msg


def test_bad_module_name_and_empty_app(app_dir):
    assert "invalid module name '-m'" in error(app_dir, "name: a\nmodules:\n  -m:\n    command: ./router.sh\n")
    assert "no modules" in error(app_dir, "name: a\nmodules: {}\n")
    assert "non-empty 'name'" in error(app_dir, "modules:\n  m:\n    command: ./router.sh\n")


def test_env_file(tmp_path):
    path = write(tmp_path / "x.env", """
        # comment

        export A=1
        B = "two words"   # trailing comment
        C='#not a comment'
        D=plain # comment
        E=
    """)
    assert load_env_file(path) == {"A": "1", "B": "two words", "C": "#not a comment",
                                   "D": "plain", "E": ""}


@pytest.mark.parametrize("line", ["JUSTANAME", "1X=2", "A='unterminated", 'A="x" junk'])
def test_env_file_malformed_line(tmp_path, line):
    path = write(tmp_path / "bad.env", f"OK=1\n\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_env_file(path)
    assert f"{path}:3:" in str(info.value)


def test_malformed_env_file_stops_load(app_dir):
    write(app_dir / "scalebox.env", "A=1\nnot a line\n")
    msg = error(app_dir, "name: a\nmodules:\n  m:\n    command: ./router.sh\n")
    assert f"{os.path.join(app_dir, 'scalebox.env')}:2:" in msg


def test_task_resources(app_dir):
    write(app_dir / "app.yaml", """
        name: a
        modules:
          plain:
            command: ./router.sh
          big:
            command: ./router.sh
            task_cpus: 8
            task_gpus: 2
            task_mem: 4G
          mib:
            command: ./router.sh
            task_mem: 1500
    """)
    app = load_app(app_dir, environ={})
    plain, big, mib = (app.modules[n] for n in ("plain", "big", "mib"))
    assert (plain.task_cpus, plain.task_gpus, plain.task_mem) == (1, 0, None)
    assert (big.task_cpus, big.task_gpus, big.task_mem) == (8, 2, 4096)
    assert mib.task_mem == 1500
    assert AppDef.from_json(app.to_json()) == app


@pytest.mark.parametrize("key, value, words", [
    ("task_cpus", "0", "task_cpus"),
    ("task_gpus", "-1", "task_gpus"),
    ("task_mem", "lots", "invalid memory size 'lots'"),
])
def test_bad_task_resources(app_dir, key, value, words):
    msg = error(app_dir, f"""
        name: a
        modules:
          m:
            command: ./router.sh
            {key}: {value}
    """)
    assert "app.yaml:5:" in msg and f"modules.m.{key}" in msg and words in msg


def test_upstream_keys_without_effect_are_named_with_the_reason(tmp_path, caplog):
    (tmp_path / "app.yaml").write_text(
        "name: up\njobs:\n  a:\n    base_image: host\n    command: /bin/true\n"
        "    arguments:\n      max_sleep_count: 3\n      output_text_size: 100\n      slot_options: always_running\n"
        "    parameters:\n      key_group_regex: x\n      task_dist_mode: SLOT-BOUND\n      start_message: ANY\n")
    with caplog.at_level("WARNING", logger="scalebox_hpc.appdef"):
        app = load_app(tmp_path)
    module = app.modules['a']
    assert module.stdout_limit == 100 and module.task_dist_mode == "DEFAULT" and module.start_tasks == ["ANY"]
    warned = [r.getMessage() for r in caplog.records]
    for key in ("arguments.max_sleep_count", "arguments.slot_options", "parameters.key_group_regex",
                "parameters.task_dist_mode"):
        assert any(f"jobs.a.{key}" in w and "has no effect here" in w for w in warned), (key, warned)
    assert all(w.count("\n") == 0 for w in warned)


def test_upstream_app_parameters(tmp_path, caplog):
    (tmp_path / "app.yaml").write_text(
        "name: up\nparameters:\n  message_router: r\n  initial_status: RUNNING\njobs:\n"
        "  r:\n    base_image: host\n    command: /bin/true\n    start_message: go\n")
    with caplog.at_level("WARNING", logger="scalebox_hpc.appdef"):
        app = load_app(tmp_path)
    assert app.main_router == "r"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "parameters.initial_status has no effect here" in warned[0]


def test_upstream_action_variables_name_the_program_and_hooks(app_dir):
    script(app_dir / "calc-code" / "mycheck.sh")
    script(app_dir / "calc-code" / "go.sh")
    app = load(app_dir, """
        name: a
        modules:
          m:
            code_path: calc-code
            environments: [ACTION_RUN=go.sh, ACTION_CHECK=mycheck.sh]
    """)
    m = app.modules["m"]
    assert (m.command, m.check) == (str(app_dir / "calc-code" / "go.sh"), str(app_dir / "calc-code" / "mycheck.sh"))
    msg = error(app_dir, """
        name: a
        modules:
          m:
            code_path: calc-code
            environments: [ACTION_SETUP=missing.sh]
    """)
    assert "modules.m.environments.ACTION_SETUP: program not found" in msg
