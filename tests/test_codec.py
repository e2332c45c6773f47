"""The wire codec against the calling convention's exact JSON."""

import json

import pytest

from xapi_storage_tasks.tasks.record import Task
from xapi_storage_tasks.tasks.state import Completed, Failed, Pending, from_wire
from xapi_storage_tasks.wire import codec, ids
from xapi_storage_tasks.wire.errors import InvalidArguments, TaskDoesNotExist


def test_states_give_their_wire_values_with_floats_and_tags():
    assert json.dumps(Pending(0).to_wire()) == '["Pending", 0.0]'
    assert json.dumps(Completed(12).to_wire()) == '["Completed", {"duration": 12.0}]'
    assert Completed(1.5, codec.UNIT_RESULT).to_wire() == [
        "Completed",
        {"duration": 1.5, "result": ["UnitResult", None]},
    ]
    assert Failed("Cancelled").to_wire() == ["Failed", "Cancelled"]


def test_state_decoding_is_case_insensitive_and_strict():
    assert from_wire(["pending", 0.5]) == Pending(0.5)
    assert from_wire(["COMPLETED", {"duration": 2}]) == Completed(2.0)
    for bad in (["Pending"], ["Running", 1.0], ["Failed", 3], "Pending", ["Completed", {}]):
        with pytest.raises(ValueError):
            from_wire(bad)


def test_task_record_ctime_is_float():
    task = Task(ids.new_id(), "d", 1764340000, Pending(0.42))
    text = json.dumps(task.to_wire())
    assert '"ctime": 1764340000.0' in text
    assert json.loads(text)["state"] == ["Pending", 0.42]


def test_status_never_complete_and_failed():
    assert Failed("x").status() == {"failed": True, "complete": False}  # progress omitted
    assert Completed(1).status() == {"failed": False, "complete": True, "progress": 1.0}
    assert isinstance(Pending(0).status()["progress"], float)


def test_error_record_has_every_field_typed():
    err = TaskDoesNotExist("abc")
    record = codec.error_record(err, [("/a.py", 3), ("/b.py", 9)])
    assert record == {
        "code": "SR_BACKEND_FAILURE",
        "params": ["Task_does_not_exist", "abc"],
        "backtrace": {"error": "Task_does_not_exist: abc", "files": ["/a.py", "/b.py"], "lines": [3, 9]},
    }


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x\x00y", "01A222D6-2DAE-7D19-96ED-88B4B83C3579", 7, None])
def test_task_ids_are_validated(bad):
    with pytest.raises(InvalidArguments):
        codec.decode_task_id("id", bad)


def test_new_ids_are_valid_and_sort_by_time():
    made = [ids.new_id(t) for t in (1, 250, 1_000_000, 10**18)]
    assert all(ids.is_valid(i) for i in made)
    assert made == sorted(made)
    assert all(i[14] == "7" for i in made)


def test_blocklist_decoding():
    assert codec.decode_blocklist("b", {"blocksize": 512, "ranges": [[8, 2], [0, 4]]}) == (512, [(0, 4), (8, 2)])
    assert codec.decode_blocklist("b", {"blocksize": 512, "ranges": []}) == (512, [])
    for bad in (
        {"blocksize": 0, "ranges": []},
        {"blocksize": 512, "ranges": [[0, 4], [3, 1]]},
        {"blocksize": 512, "ranges": [[-1, 4]]},
        {"blocksize": 512, "ranges": [[0, 0]]},
        {"blocksize": 512, "ranges": [[0, 1.5]]},
        {"blocksize": True, "ranges": []},
        {"blocksize": 512},
    ):
        with pytest.raises(InvalidArguments):
            codec.decode_blocklist("b", bad)


def test_envelopes():
    assert codec.decode_request({"method": "Task.ls", "params": [{"dbg": "d"}], "id": 44}) == (
        "Task.ls",
        {"dbg": "d"},
        44,
        False,
    )
    assert codec.encode_response([], 44, False) == {"result": [], "error": None, "id": 44}
    assert codec.encode_response([], 7, True) == {"jsonrpc": "2.0", "result": [], "id": 7}
    record = codec.error_record(InvalidArguments("x"))
    v2 = codec.encode_error_response(record, 7, True)
    assert v2["error"]["code"] == -32602 and v2["error"]["data"] == record


def test_dumps_fast_path_equals_the_general_encoder(monkeypatch):
    many = [ids.new_id() for _ in range(200)]
    assert codec.dumps(many) == json.dumps(many)
    with monkeypatch.context() as m:  # a list of plain ids takes the fast path: no general encoder
        m.setattr(codec.jsontext, "dumps", None)
        assert codec.dumps(many) == json.dumps(many)
    odd = many + ['quo"te', "back\\slash", "tab\t", "é"]
    assert json.loads(codec.dumps(odd)) == odd
    assert codec.dumps([]) == "[]" and codec.dumps(None) == "null"


@pytest.mark.parametrize("blocklist, why", [
    ({"blocksize": 2 ** 64, "ranges": []}, "blocksize must be an integer from 1 to"),
    ({"blocksize": codec.MAX_BLOCKSIZE + 1, "ranges": [[0, 1]]}, "blocksize must be an integer from 1 to"),
    ({"blocksize": 512, "ranges": [[2 ** 64, 1]]}, "ends past byte offset"),
    ({"blocksize": 512, "ranges": [[0, 2 ** 63]]}, "ends past byte offset"),
    ({"blocksize": 1, "ranges": [[2 ** 63 - 1, 1]]}, "ends past byte offset"),
    ({"blocksize": 2 ** 20, "ranges": [[2 ** 43, 1]]}, "ends past byte offset"),
    ({"blocksize": 512, "ranges": [[0, 4], [-(2 ** 70), 1]]}, "start >= 0"),
])
def test_every_integer_of_a_blocklist_is_bounded(blocklist, why):
    with pytest.raises(InvalidArguments, match=why):
        codec.decode_blocklist("blocklist", blocklist)


def test_the_largest_blocklist_integers_are_accepted():
    assert codec.decode_blocklist("b", {"blocksize": codec.MAX_BLOCKSIZE, "ranges": [[0, 1]]}) == (codec.MAX_BLOCKSIZE, [(0, 1)])
    assert codec.decode_blocklist("b", {"blocksize": 1, "ranges": [[2 ** 63 - 2, 1]]}) == (1, [(2 ** 63 - 2, 1)])


def test_error_messages_about_huge_values_stay_short():
    with pytest.raises(InvalidArguments) as caught:
        codec.decode_blocklist("b", {"blocksize": 512, "ranges": [[10 ** 1000, 1]]})
    assert len(str(caught.value)) < 200


# ---------------------------------------------------------------------------
# The error tree and the boundary


def test_errors_are_the_builtin_kinds_they_naturally_are_and_carry_their_data():
    from xapi_storage_tasks.wire import errors

    missing = errors.TaskDoesNotExist("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
    assert isinstance(missing, LookupError) and missing.task_id == "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    bad = errors.InvalidArguments("parameter 'id' must be a string")
    assert isinstance(bad, ValueError) and bad.reason == "parameter 'id' must be a string"
    gone = errors.DaemonUnavailable("no daemon", path="/run/x.sock", absent=True)
    assert isinstance(gone, ConnectionError) and gone.path == "/run/x.sock" and gone.absent
    assert isinstance(errors.Unimplemented("Data.mirror"), NotImplementedError)
    corrupt = errors.TaskCorrupt("some-id", "not JSON")
    assert (corrupt.task_id, corrupt.reason) == ("some-id", "not JSON")
    # The names on the wire are unchanged by the built-in bases.
    names = [missing.params[0], bad.params[0], gone.params[0]]
    assert names == ["Task_does_not_exist", "Invalid_arguments", "Daemon_unavailable"]
    assert str(gone) == "Daemon_unavailable: no daemon"


def _raise(exc):
    try:
        raise exc
    except BaseException as e:
        return e


def test_the_boundary_keeps_plugin_errors_and_wraps_the_rest():
    from xapi_storage_tasks.wire import boundary

    known = _raise(TaskDoesNotExist("x"))
    assert boundary.as_plugin_error(known) is known
    assert boundary.failure_message(known) == "Task_does_not_exist: x"
    assert not boundary.is_unexpected(known)
    bug = _raise(KeyError("k"))
    assert boundary.is_unexpected(bug)
    assert boundary.failure_message(bug) == "KeyError: 'k'"
    assert boundary.failure_message(_raise(RuntimeError())) == "RuntimeError"
    record = boundary.error_record(bug)
    assert record["params"] == ["Internal_error", "KeyError: 'k'"]
    assert record["backtrace"]["files"] == [__file__] and len(record["backtrace"]["lines"]) == 1
    assert boundary.error_record(_raise(KeyboardInterrupt()))["params"] == ["Internal_error", "interrupted"]
    assert "raise exc" in boundary.traceback_text(bug)
    assert boundary.unexpected_text("Task.stat", bug).startswith("Task.stat failed unexpectedly:\nTraceback")
    v2 = boundary.error_response(bug, 3, True)
    assert v2["error"]["code"] == codec.SERVER_ERROR and v2["error"]["data"] == record and v2["id"] == 3
    assert boundary.error_response(known, 3, True, codec.INVALID_REQUEST)["error"]["code"] == codec.INVALID_REQUEST
    assert boundary.error_response(known, 3, False) == {"result": None, "error": boundary.error_record(known), "id": 3}
    assert boundary.one_line("a\nb\x1b") == "a\\nb\\x1b"


# ---------------------------------------------------------------------------
# jsontext: json's C accelerator without importing json


JSON_TEXTS = ['{"a": [1, 2.5, null, true, false, "\\u00e9\\n"]}', " 3 ", '"x"', "[]", "{}", "1e5", "-0", "[[[]]]",
              '{"dbg": "d", "id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"}', "12345678901234567890", "0.1"]


@pytest.mark.parametrize("text", JSON_TEXTS)
def test_jsontext_reads_and_writes_as_json_does(text):
    from xapi_storage_tasks.wire import jsontext

    assert jsontext.loads(text) == json.loads(text)
    value = json.loads(text)
    assert jsontext.dumps(value) == json.dumps(value)
    assert jsontext.dumps(value, compact=True) == json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("text", ["", " ", "NaN", "-Infinity", "1e999", "[1,]", '{"a": 1} x', "\ufeff1", "[", "01", "'x'",
                                  "[1] [2]", '{"a" 1}', '"\\x"', "tru"])
def test_jsontext_refuses_what_is_not_one_strict_value(text):
    from xapi_storage_tasks.wire import jsontext

    with pytest.raises(jsontext.JsonError):
        jsontext.loads(text)


def test_jsontext_refuses_to_write_what_json_cannot_hold():
    from xapi_storage_tasks.wire import jsontext

    with pytest.raises(ValueError):
        jsontext.dumps(float("nan"))
    with pytest.raises(TypeError):
        jsontext.dumps(object())
