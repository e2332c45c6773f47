"""The wire codec against the calling convention's exact JSON."""

import json

import pytest

from xapi_storage_tasks.wire import codec
from xapi_storage_tasks.tasks import ids
from xapi_storage_tasks.wire.errors import InvalidArguments, TaskDoesNotExist
from xapi_storage_tasks.tasks.state import Completed, Failed, Pending
from xapi_storage_tasks.tasks.record import Task


def test_states_encode_with_floats_and_tags():
    assert json.dumps(codec.encode_state(Pending(0))) == '["Pending", 0.0]'
    assert json.dumps(codec.encode_state(Completed(12))) == '["Completed", {"duration": 12.0}]'
    assert codec.encode_state(Completed(1.5, codec.UNIT_RESULT)) == [
        "Completed",
        {"duration": 1.5, "result": ["UnitResult", None]},
    ]
    assert codec.encode_state(Failed("Cancelled")) == ["Failed", "Cancelled"]


def test_state_decoding_is_case_insensitive_and_strict():
    assert codec.decode_state(["pending", 0.5]) == Pending(0.5)
    assert codec.decode_state(["COMPLETED", {"duration": 2}]) == Completed(2.0)
    for bad in (["Pending"], ["Running", 1.0], ["Failed", 3], "Pending", ["Completed", {}]):
        with pytest.raises(ValueError):
            codec.decode_state(bad)


def test_task_record_ctime_is_float():
    task = Task(ids.new_id(), "d", 1764340000, Pending(0.42))
    text = json.dumps(codec.encode_task(task))
    assert '"ctime": 1764340000.0' in text
    assert json.loads(text)["state"] == ["Pending", 0.42]


def test_status_never_complete_and_failed():
    assert codec.encode_status(Failed("x")) == {"failed": True, "complete": False, "progress": 0.0}
    assert codec.encode_status(Completed(1)) == {"failed": False, "complete": True, "progress": 1.0}
    assert isinstance(codec.encode_status(Pending(0))["progress"], float)


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


def test_dumps_fast_path_equals_the_general_encoder():
    many = [ids.new_id() for _ in range(200)]
    assert codec.dumps(many) == json.dumps(many)
    odd = many + ['quo"te', "back\\slash", "tab\t", "é"]
    assert json.loads(codec.dumps(odd)) == odd
    assert codec.dumps([]) == "[]" and codec.dumps(None) == "null"
