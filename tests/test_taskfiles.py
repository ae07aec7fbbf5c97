import pytest

from scalebox_hpc.errors import TaskFileError
from scalebox_hpc.taskfiles import (
    SemaphoreOp,
    SinkMessage,
    TaskExecInfo,
    parse_file_list,
    parse_semaphores,
    parse_sink_tasks,
    parse_extra_attrs,
    parse_task_exec_json,
    parse_task_exec_yaml,
    parse_timestamps,
    sum_file_sizes,
)

MODULES = {"router", "calc", "sink"}


def sink(text, **kw):
    return parse_sink_tasks(text, known_modules=MODULES, **kw)


def one(line):
    [msg] = sink(line + "\n")
    return msg


def assert_one_line_error(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


# --- sink-tasks.txt: line formats -------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("100000", SinkMessage(None, "100000", {})),
    ('42,{"k":"v"}', SinkMessage(None, "42", {"k": "v"})),
    ("calc,7", SinkMessage("calc", "7", {})),
    ('calc,7,{"to_host":"n1","n":3}', SinkMessage("calc", "7", {"to_host": "n1", "n": 3})),
    # commas in the body: first field is not a module, so the whole text is the body
    ("a,b,c", SinkMessage(None, "a,b,c", {})),
    ("notamodule,x", SinkMessage(None, "notamodule,x", {})),
    # a known module name followed by a body that itself has commas
    ("calc,a,b,c", SinkMessage("calc", "a,b,c", {})),
    ('x,y,{"a":1}', SinkMessage(None, "x,y", {"a": 1})),
    # shell metacharacters and quotes are just text
    ("rm -rf /; echo $(id) `whoami` 'q' \"dq\"", SinkMessage(None, "rm -rf /; echo $(id) `whoami` 'q' \"dq\"", {})),
    ("calc,$(reboot);x", SinkMessage("calc", "$(reboot);x", {})),
    ("héllo wörld ✓ 日本", SinkMessage(None, "héllo wörld ✓ 日本", {})),
    ('router,π=3.14,{"ünï":"cödé"}', SinkMessage("router", "π=3.14", {"ünï": "cödé"})),
    # headers of all scalar types, kept as parsed
    ('b,{"s":"x","i":1,"f":1.5,"t":true,"n":null}',
     SinkMessage(None, "b", {"s": "x", "i": 1, "f": 1.5, "t": True, "n": None})),
    ("b,{}", SinkMessage(None, "b", {})),
    # a header value containing ',{' is still found
    ('b,{"k":"x,{y"}', SinkMessage(None, "b", {"k": "x,{y"})),
    # a body containing a JSON-looking part before the real headers
    ('b,{1},{"k":"v"}', SinkMessage(None, "b,{1}", {"k": "v"})),
    # module with headers but no body comma: the name is the body
    ('calc,{"k":"v"}', SinkMessage(None, "calc", {"k": "v"})),
    ("calc,", SinkMessage("calc", "", {})),
    ("  spaced body  ", SinkMessage(None, "  spaced body  ", {})),
])
def test_sink_line_formats(line, expected):
    assert one(line) == expected


@pytest.mark.parametrize("line, expected", [
    ('{"body":"x"}', SinkMessage(None, "x", {})),
    ('{"module":"calc","body":"a,b","headers":{"k":"v"}}', SinkMessage("calc", "a,b", {"k": "v"})),
    ('{"body":12}', SinkMessage(None, "12", {})),
    ('{"body":"$(id); \\"q\\"","module":null,"headers":null}', SinkMessage(None, '$(id); "q"', {})),
    ('{"body":"日本"}', SinkMessage(None, "日本", {})),
    ('  {"body":"indented"}', SinkMessage(None, "indented", {})),
])
def test_sink_json_form(line, expected):
    assert one(line) == expected


def test_sink_multiple_lines_crlf_and_blank_lines():
    text = "1\r\n\r\n  \ncalc,2\r\n{\"body\":\"3\"}\r\n"
    assert sink(text) == [
        SinkMessage(None, "1", {}),
        SinkMessage("calc", "2", {}),
        SinkMessage(None, "3", {}),
    ]


def test_sink_no_trailing_newline_and_empty_file():
    assert sink("a\nb") == [SinkMessage(None, "a", {}), SinkMessage(None, "b", {})]
    assert sink("") == []


def test_sink_unicode_line_separator_is_not_a_line_break():
    assert sink("a\u2028b\n") == [SinkMessage(None, "a\u2028b", {})]


@pytest.mark.parametrize("line, fragment", [
    ('b,{"k":', "headers are not a JSON object"),
    ("b,{not json}", "headers are not a JSON object"),
    ('b,{"k":{"nested":1}}', "non-scalar"),
    ('b,{"k":[1,2]}', "non-scalar"),
    ('{"module":"nosuch","body":"x"}', 'unknown module "nosuch"'),
    ('{"module":"calc"}', 'no "body"'),
    ('{"module":"calc","body":"x","extra":1}', '"extra"'),
    ('{"body":["x"]}', '"body"'),
    ('{"body":true}', '"body"'),
    ('{"body":"x","module":3}', '"module"'),
    ('{"body":"x","headers":[1]}', "not an object"),
    ('{"body":"x"', "invalid JSON"),
])
def test_sink_malformed_lines_name_file_and_line(line, fragment):
    text = "ok1\ncalc,ok2\n" + line + "\n"
    with pytest.raises(TaskFileError) as exc_info:
        sink(text)
    assert_one_line_error(exc_info, "sink-tasks.txt line 3:", fragment, "expected")


def test_sink_error_uses_given_filename_and_counts_blank_lines():
    with pytest.raises(TaskFileError) as exc_info:
        sink("\n\nx,{bad\n", filename="messages.txt")
    assert_one_line_error(exc_info, "messages.txt line 3:")


def test_sink_unknown_module_error_lists_known_modules():
    with pytest.raises(TaskFileError) as exc_info:
        sink('{"module":"calk","body":"1"}\n')
    assert_one_line_error(exc_info, "calk", "calc, router, sink")


# --- semaphores.txt ----------------------------------------------------------

def test_semaphores_ok():
    text = "# comment\n\nfree-slots +3\nfree-slots -1\r\ncount=0\n done:g1 =10 \nx-1\na-b+2\n"
    assert parse_semaphores(text) == [
        SemaphoreOp("free-slots", "+", 3),
        SemaphoreOp("free-slots", "-", 1),
        SemaphoreOp("count", "=", 0),
        SemaphoreOp("done:g1", "=", 10),
        SemaphoreOp("x", "-", 1),
        SemaphoreOp("a-b", "+", 2),
    ]


@pytest.mark.parametrize("line", ["name", "name +", "name +x", "name +1.5", "+3", "a b +1", "name *2",
                                  "name --1"])
def test_semaphores_bad(line):
    with pytest.raises(TaskFileError) as exc_info:
        parse_semaphores("ok +1\n\n" + line + "\n")
    assert_one_line_error(exc_info, "semaphores.txt line 3:", "expected name +N")


# --- task-exec.json ----------------------------------------------------------

def test_task_exec_camel_case():
    text = """{
      "statusCode": 2, "inputBytes": 10, "outputBytes": 0,
      "inputFiles": ["a.dat"], "outputFiles": ["b.dat", "c.dat"],
      "timestamps": ["read-done,2024-05-01T12:00:00Z", "write-done, 2024-05-01T12:00:01.5+02:00"],
      "userText": "hello ✓"
    }"""
    assert parse_task_exec_json(text) == TaskExecInfo(
        status_code=2, input_bytes=10, output_bytes=0,
        input_files=["a.dat"], output_files=["b.dat", "c.dat"],
        timestamps=[("read-done", "2024-05-01T12:00:00Z"),
                    ("write-done", "2024-05-01T12:00:01.5+02:00")],
        user_text="hello ✓")


def test_task_exec_snake_case_and_timestamp_forms():
    info = parse_task_exec_json('{"status_code": 0, "input_bytes": 5, "output_files": [],'
                                ' "user_text": "", "timestamps": [["a", "2024-01-01T00:00:00"]]}')
    assert info == TaskExecInfo(status_code=0, input_bytes=5, output_files=[], user_text="",
                                timestamps=[("a", "2024-01-01T00:00:00")])
    info = parse_task_exec_json('{"timestamps": {"x": "2024-01-01", "y": "2024-01-01T01:02:03Z"}}')
    assert info.timestamps == [("x", "2024-01-01"), ("y", "2024-01-01T01:02:03Z")]


def test_task_exec_empty_object_and_nulls():
    assert parse_task_exec_json("{}") == TaskExecInfo()
    assert parse_task_exec_json('{"statusCode": null}') == TaskExecInfo()


@pytest.mark.parametrize("text, key", [
    ('{"statusCode": "1"}', '"statusCode"'),
    ('{"statusCode": true}', '"statusCode"'),
    ('{"inputBytes": -1}', '"inputBytes"'),
    ('{"output_bytes": 1.5}', '"output_bytes"'),
    ('{"inputFiles": "a.dat"}', '"inputFiles"'),
    ('{"outputFiles": [1]}', '"outputFiles"'),
    ('{"userText": 3}', '"userText"'),
    ('{"timestamps": "a,2024-01-01"}', '"timestamps"'),
    ('{"timestamps": ["no-comma"]}', '"timestamps"'),
    ('{"timestamps": [["a", "yesterday"]]}', '"timestamps"'),
    ('{"timestamps": {"a": "2024-13-01"}}', '"timestamps"'),
    ('{"statusCode": 1, "status_code": 1}', '"status_code"'),
])
def test_task_exec_bad_type_names_key(text, key):
    with pytest.raises(TaskFileError) as exc_info:
        parse_task_exec_json(text)
    assert_one_line_error(exc_info, "task-exec.json:", key, "expected")


def test_task_exec_unknown_key():
    with pytest.raises(TaskFileError) as exc_info:
        parse_task_exec_json('{"statusCode": 0, "exitCode": 1}')
    assert_one_line_error(exc_info, "task-exec.json:", '"exitCode"', "unknown key", "statusCode")


def test_task_exec_invalid_json_names_line():
    with pytest.raises(TaskFileError) as exc_info:
        parse_task_exec_json('{\n  "statusCode": 0,\n  "inputBytes": ,\n}')
    assert_one_line_error(exc_info, "task-exec.json line 3:", "invalid JSON")


def test_task_exec_not_an_object():
    with pytest.raises(TaskFileError) as exc_info:
        parse_task_exec_json("[1, 2]")
    assert_one_line_error(exc_info, "task-exec.json:", "JSON object")


# --- timestamps.txt ----------------------------------------------------------

def test_timestamps_ok():
    text = "start,2024-05-01T12:00:00Z\r\n\n stage 2 , 2024-05-01 12:00:01.123456+00:00\nd,2024-05-01\n"
    assert parse_timestamps(text) == [
        ("start", "2024-05-01T12:00:00Z"),
        ("stage 2", "2024-05-01 12:00:01.123456+00:00"),
        ("d", "2024-05-01"),
    ]


@pytest.mark.parametrize("line", ["no-comma", ",2024-05-01T00:00:00", "x,not a date", "x,2024-02-30", "x,"])
def test_timestamps_bad(line):
    with pytest.raises(TaskFileError) as exc_info:
        parse_timestamps("a,2024-01-01T00:00:00\n" + line + "\n")
    assert_one_line_error(exc_info, "timestamps.txt line 2:", "expected label,ISO-8601")


# --- file lists and sizes ----------------------------------------------------

def test_parse_file_list():
    text = "a.dat\r\n\n  sub/b.dat  \n/abs/c.dat\n\t\n"
    assert parse_file_list(text, "input-files.txt") == ["a.dat", "sub/b.dat", "/abs/c.dat"]
    assert parse_file_list("", "output-files.txt") == []


def test_sum_file_sizes(tmp_path):
    (tmp_path / "a.dat").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.dat").write_bytes(b"y" * 5)
    other = tmp_path.parent / f"{tmp_path.name}-abs.dat"
    other.write_bytes(b"z" * 7)
    try:
        paths = ["a.dat", "sub/b.dat", "missing.dat", str(other)]
        assert sum_file_sizes(paths, str(tmp_path)) == 22
        assert sum_file_sizes(["sub"], str(tmp_path)) == 5  # a directory counts its files
        assert sum_file_sizes([], str(tmp_path)) == 0
    finally:
        other.unlink()


# --- upstream's forms ------------------------------------------------------------

def test_timestamps_bare_iso_lines_as_upstream_writes_them():
    # Upstream's timestamps.txt holds bare date-times, `date --iso-8601=ns` among them
    # (a comma before nine digits of fraction); a label is optional.
    text = ("2008-03-19T18:35:03-08:00\n2012-11-17T08:52:21,963572856+08:00\n"
            "done,2012-11-17T08:52:21,963572856+08:00\n")
    assert parse_timestamps(text) == [("", "2008-03-19T18:35:03-08:00"),
                                      ("", "2012-11-17T08:52:21,963572856+08:00"),
                                      ("done", "2012-11-17T08:52:21,963572856+08:00")]


def test_task_exec_upstream_sink_job_and_message_body():
    info = parse_task_exec_json('{"statusCode":0, "timestamps":["2018-03-19T18:35:03-08:00",'
                                '"2022-11-17T08:52:21,963572856+08:00"], "sinkJob":"next", "messageBody":"1"}')
    assert info.timestamps == [("", "2018-03-19T18:35:03-08:00"), ("", "2022-11-17T08:52:21,963572856+08:00")]
    assert [(m.module, m.body) for m in info.messages({"next"})] == [("next", "1")]
    listed = parse_task_exec_json('{"messageBody": ["a", "b,c"]}')
    assert [(m.module, m.body) for m in listed.messages({"next"})] == [(None, "a"), (None, "b,c")]
    with pytest.raises(TaskFileError) as exc_info:
        info.messages({"other"})
    assert_one_line_error(exc_info, 'task-exec.json: key "sinkJob": unknown module "next"', "other")
    with pytest.raises(TaskFileError) as exc_info:
        parse_task_exec_json('{"messageBody": 5}')
    assert_one_line_error(exc_info, '"messageBody"', "a string or a list of strings")


def test_sink_upstream_json_bodies():
    # Upstream's seven line forms; in 2, 4 and 7 the body is JSON text, kept as written.
    text = ('body1\n{"bh0":"a","body":"body2"}\nbody3,{"h0":"a","h1":"b"}\n'
            '{"bh0":"a","body":"body4"},{"h0":"a","h1":"b"}\nsink-mod0,body5\n'
            'sink_mod1,body6,{"h0":"a","h1":"b"}\nsink-mod2,{"bh0":"a","body":"body7"},{"h0":"a","h1":"b"}\n'
            '{"nested":{"x":[1,{"y":2}]}}\n')
    got = [(m.module, m.body, m.headers) for m in
           parse_sink_tasks(text, known_modules={"sink-mod0", "sink_mod1", "sink-mod2"})]
    h = {"h0": "a", "h1": "b"}
    assert got == [(None, "body1", {}), (None, '{"bh0":"a","body":"body2"}', {}), (None, "body3", h),
                   (None, '{"bh0":"a","body":"body4"}', h), ("sink-mod0", "body5", {}), ("sink_mod1", "body6", h),
                   ("sink-mod2", '{"bh0":"a","body":"body7"}', h), (None, '{"nested":{"x":[1,{"y":2}]}}', {})]


def test_task_exec_yaml_keeps_timestamps_as_written_and_checks_keys():
    info = parse_task_exec_yaml("statusCode: 3\ninputBytes: 10\ntimestamps: [2024-05-01T12:00:00Z, 'a,2024-05-01']\n"
                                "sinkJob: next\nmessageBody: [x, y]\n")
    assert (info.status_code, info.input_bytes, info.sink_module, info.message_body) == (3, 10, "next", ["x", "y"])
    assert info.timestamps == [("", "2024-05-01T12:00:00Z"), ("a", "2024-05-01")]   # text, not datetimes
    assert parse_task_exec_yaml("") == TaskExecInfo()
    for text, needle in (("statusCode: zero\n", 'key "statusCode"'), ("- 1\n", "top level is a YAML list"),
                         ("a: [\n", "task-exec.yaml line 2: invalid YAML")):
        with pytest.raises(TaskFileError) as exc_info:
            parse_task_exec_yaml(text)
        assert_one_line_error(exc_info, needle)


def test_extra_attrs_is_a_mapping_kept_as_json():
    assert parse_extra_attrs("n: 1\nwhen: 2024-05-01\nnested: {a: [1, b]}\n") == \
        {"n": 1, "when": "2024-05-01", "nested": {"a": [1, "b"]}}
    with pytest.raises(TaskFileError) as exc_info:
        parse_extra_attrs("just text\n")
    assert_one_line_error(exc_info, "extra-attrs.yaml: top level is a YAML str")
