"""The Data interface's executables: the same tasks seen as operations."""

import pytest

from conftest import run_bin
from xapi_storage_tasks.tasks.state import Completed, Failed, Pending


def copy_task(store, state=None):
    task = store.create("copy", operation={"kind": "CopyV1", "args": {}})
    if state is not None:
        store.transition(task.id, lambda t: state)
    return task.id


@pytest.mark.parametrize(
    "state, status",
    [
        (Pending(0.25), {"failed": False, "complete": False, "progress": 0.25}),
        (Completed(2), {"failed": False, "complete": True, "progress": 1.0}),
        (Failed("Cancelled"), {"failed": True, "complete": False}),  # progress omitted, never null
    ],
)
def test_stat_status_is_typed_and_never_complete_when_failed(store, state, status):
    task_id = copy_task(store, state)
    res = run_bin("Data.stat", {"dbg": "d", "operation": ["CopyV1", task_id]})
    assert res.returncode == 0 and res.json == status
    if "progress" in status:
        assert b'"progress": ' in res.stdout and isinstance(res.json["progress"], float)
    else:
        assert b'progress' not in res.stdout


def test_operation_tags_are_case_insensitive(store):
    task_id = copy_task(store, Completed(1))
    assert run_bin("Data.stat", {"dbg": "d", "operation": ["copyv1", task_id]}).json["complete"] is True


def test_ls_lists_only_operations_as_tagged_pairs(store):
    plain = store.create("plain").id
    first, second = copy_task(store), copy_task(store, Completed(1))
    assert run_bin("Data.ls", {"dbg": "d"}).json == [["CopyV1", first], ["CopyV1", second]]
    assert run_bin("Task.ls", {"dbg": "d"}).json == [plain, first, second]


def test_stat_of_a_plain_task_as_an_operation_is_unknown(store):
    plain = store.create("plain").id
    assert run_bin("Data.stat", {"dbg": "d", "operation": ["CopyV1", plain]}).error_name == "Task_does_not_exist"
    assert run_bin("Data.stat", {"dbg": "d", "operation": ["MirrorV1", copy_task(store)]}).error_name == "Task_does_not_exist"


def test_cancel_and_destroy_behave_as_their_task_twins(store):
    done = copy_task(store, Completed(1))
    assert run_bin("Data.cancel", {"dbg": "d", "operation": ["CopyV1", done]}).stdout == b"null\n"
    assert store.get(done).state == Completed(1)
    pending = copy_task(store)
    assert run_bin("Data.cancel", {"dbg": "d", "operation": ["CopyV1", pending]}).stdout == b"null\n"
    assert store.get(pending).cancel is not None  # recorded durably for its worker
    assert run_bin("Data.destroy", {"dbg": "d", "operation": ["CopyV1", pending]}).error_name == "Task_in_progress"
    assert run_bin("Data.destroy", {"dbg": "d", "operation": ["CopyV1", done]}).stdout == b"null\n"
    assert run_bin("Task.stat", {"dbg": "d", "id": done}).error_name == "Task_does_not_exist"


def test_mirror_of_a_uri_no_datapath_serves_is_invalid(state_dir):
    res = run_bin("Data.mirror", {"dbg": "d", "uri": "file:///x", "domain": "0", "remote": "nbd://h/e"})
    assert res.error_name == "Invalid_arguments" and "not served here" in res.json["params"][1]


@pytest.mark.parametrize(
    "operation", [None, "CopyV1", ["CopyV1"], ["Other", "x"], ["CopyV1", "../etc"], ["CopyV1", 5]]
)
def test_malformed_operations_are_invalid(state_dir, operation):
    assert run_bin("Data.stat", {"dbg": "d", "operation": operation}).error_name == "Invalid_arguments"


@pytest.mark.parametrize(
    "blocklist",
    [
        {"blocksize": 512, "ranges": [[0, 4], [2, 4]]},
        {"blocksize": 512, "ranges": [[-1, 1]]},
        {"blocksize": -1, "ranges": []},
        {"blocksize": 512, "ranges": "all"},
        [512],
    ],
)
def test_bad_blocklists_make_no_task(store, tmp_path, blocklist):
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 4096)
    params = {"dbg": "d", "uri": str(src), "domain": "0", "remote": "file://" + str(tmp_path / "dst"), "blocklist": blocklist}
    assert run_bin("Data.copy", params).error_name == "Invalid_arguments"
    assert store.ids() == []
    assert not (tmp_path / "dst").exists()


def test_destroy_removes_an_unreadable_operation_as_task_destroy_does(store, state_dir):
    task_id = copy_task(store, Completed(1))
    (state_dir / "tasks" / (task_id + ".json")).write_bytes(b"{torn")
    assert run_bin("Data.stat", {"dbg": "d", "operation": ["CopyV1", task_id]}).error_name == "Task_corrupt"
    assert run_bin("Data.destroy", {"dbg": "d", "operation": ["CopyV1", task_id]}).returncode == 0
    assert run_bin("Task.ls", {"dbg": "d"}).json == []
