"""The Task executables as the toolstack and operators call them."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import BIN, SRC, run_bin
from xapi_storage_tasks.tasks.state import Completed, Failed


def finish(store, task_id, state):
    store.transition(task_id, lambda t: state)


def test_stat_json_mode_returns_the_bare_wire_record(store):
    task = store.create("dbg-1")
    res = run_bin("Task.stat", json.dumps({"dbg": "d", "id": task.id}))  # no trailing newline
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(b"\n") == 1
    record = res.json
    assert record == {"id": task.id, "debug_info": "dbg-1", "ctime": task.ctime, "state": ["Pending", 0.0]}
    assert b'"ctime": ' in res.stdout and isinstance(record["ctime"], float)
    assert res.stdout.endswith(b'"state": ["Pending", 0.0]}\n')


def test_every_field_is_a_float_on_the_wire(store):
    done = store.create("a")
    finish(store, done.id, Completed(3))
    out = run_bin("Task.stat", {"dbg": "d", "id": done.id})
    assert b'["Completed", {"duration": 3.0}]' in out.stdout
    failed = store.create("b")
    finish(store, failed.id, Failed("Cancelled"))
    assert run_bin("Task.stat", {"dbg": "d", "id": failed.id}).json["state"] == ["Failed", "Cancelled"]


def test_cancel_and_destroy_print_null(store):
    task = store.create("a")
    finish(store, task.id, Completed(1))
    assert run_bin("Task.cancel", {"dbg": "d", "id": task.id}).stdout == b"null\n"
    res = run_bin("Task.destroy", {"dbg": "d", "id": task.id})
    assert (res.returncode, res.stdout) == (0, b"null\n")
    assert run_bin("Task.stat", {"dbg": "d", "id": task.id}).error_name == "Task_does_not_exist"


def test_ls_lists_oldest_first_including_finished(store):
    made = [store.create("t%d" % i).id for i in range(5)]
    finish(store, made[1], Completed(1))
    assert run_bin("Task.ls", {"dbg": "d"}).json == made


def test_envelope_mode_echoes_the_id(store):
    task = store.create("a")
    req = {"method": "Task.stat", "params": [{"dbg": "d", "id": task.id}], "id": 41}
    res = run_bin("Task.stat", req, args=())
    assert res.returncode == 0
    assert res.json["id"] == 41 and res.json["error"] is None
    assert res.json["result"]["id"] == task.id
    v2 = run_bin("Task.ls", {"jsonrpc": "2.0", "method": "Task.ls", "params": [{"dbg": "d"}], "id": "x"}, args=())
    assert v2.json == {"jsonrpc": "2.0", "result": [task.id], "id": "x"}


def test_envelope_errors_keep_the_record_and_exit_1(state_dir):
    req = {"method": "Task.stat", "params": [{"dbg": "d", "id": "0" * 8 + "-0000-7000-8000-" + "0" * 12}], "id": 9}
    res = run_bin("Task.stat", req, args=())
    assert res.returncode == 1
    assert res.json["id"] == 9 and res.json["result"] is None
    assert res.json["error"]["params"][0] == "Task_does_not_exist"


def test_envelope_method_must_match_the_executable(state_dir):
    res = run_bin("Task.ls", {"method": "Task.stat", "params": [{"dbg": "d"}], "id": 1}, args=())
    assert res.returncode == 1 and res.json["error"]["params"][0] == "Invalid_arguments"


def test_bare_params_without_json_flag(store):
    assert run_bin("Task.ls", {"dbg": "d"}, args=()).json == []


def test_positional_mode_and_help(store):
    task = store.create("a")
    assert run_bin("Task.stat", args=("d", task.id)).json["id"] == task.id
    helped = run_bin("Task.stat", args=("--help",))
    assert helped.returncode == 0 and b"dbg" in helped.stdout and b"id" in helped.stdout
    assert run_bin("Task.stat", args=("only-one",)).error_name == "Invalid_arguments"


def test_case_insensitive_executable_name(store, tmp_path):
    link = tmp_path / "task.LS"
    link.symlink_to(os.path.join(os.path.dirname(__file__), "..", "bin", "dispatch"))
    import subprocess

    out = subprocess.run([str(link), "--json"], input=b'{"dbg":"d"}', capture_output=True)
    assert (out.returncode, out.stdout) == (0, b"[]\n")


@pytest.mark.parametrize(
    "stdin",
    [b"", b"not json", b"[]", b'"x"', b"{}", b'{"dbg": 1}', b'{"dbg": "d"}', b'{"dbg": "d", "id": 5}',
     b'{"dbg": "d", "id": NaN}', b"\xff\xfe{}"],
)
def test_bad_input_is_invalid_arguments(state_dir, stdin):
    res = run_bin("Task.stat", stdin)
    assert res.error_name == "Invalid_arguments"
    assert res.stderr.decode().count("\n") == 1 and "Invalid_arguments" in res.stderr.decode()
    record = res.json
    assert set(record) == {"code", "params", "backtrace"}
    assert all(isinstance(p, str) for p in record["params"])
    bt = record["backtrace"]
    assert isinstance(bt["error"], str) and len(bt["files"]) == len(bt["lines"])
    assert all(isinstance(n, int) for n in bt["lines"])


@pytest.mark.parametrize("bad_id", ["../../victim", "../x", "", "a/b", "x\u0000y", "../../etc/passwd", "/etc/passwd"])
def test_ids_that_try_to_escape_are_refused(store, state_dir, tmp_path, bad_id):
    # A finished task's file where "tasks/../../victim.json" points: a
    # destroy that escaped the directory would remove it.
    done = store.create("victim")
    store.transition(done.id, lambda t: Completed(1))
    victim = tmp_path / "victim.json"
    victim.write_bytes((state_dir / "tasks" / (done.id + ".json")).read_bytes())
    before = victim.read_bytes()
    for method in ("Task.stat", "Task.cancel", "Task.destroy"):
        assert run_bin(method, {"dbg": "d", "id": bad_id}).error_name == "Invalid_arguments"
    assert victim.read_bytes() == before


def test_oversized_input_is_refused(state_dir):
    big = b'{"dbg": "' + b"x" * (1 << 20) + b'"}'
    res = run_bin("Task.ls", big)
    assert res.error_name == "Invalid_arguments" and "larger" in res.json["params"][1]


def test_unknown_keys_are_ignored(store):
    assert run_bin("Task.ls", {"dbg": "d", "extra": [1, 2]}).json == []


def test_unknown_id_and_destroy_of_pending(store):
    missing = "01a222d6-2dae-7d19-96ed-88b4b83c3579"
    for method in ("Task.stat", "Task.cancel", "Task.destroy"):
        assert run_bin(method, {"dbg": "d", "id": missing}).error_name == "Task_does_not_exist"
    task = store.create("a")
    assert run_bin("Task.destroy", {"dbg": "d", "id": task.id}).error_name == "Task_in_progress"
    assert store.get(task.id).state.terminal is False


def test_unregistered_method_is_unimplemented(tmp_path, state_dir):
    link = tmp_path / "Task.frobnicate"
    link.symlink_to(os.path.join(os.path.dirname(__file__), "..", "bin", "dispatch"))
    import subprocess

    out = subprocess.run([str(link), "--json"], input=b'{"dbg":"d"}', capture_output=True)
    assert out.returncode == 1
    assert json.loads(out.stdout)["params"] == ["Unimplemented", "Task.frobnicate"]
    # An envelope gets its answer as an envelope, even from an unknown name.
    req = b'{"method": "Task.ls", "params": [{"dbg": "d"}], "id": 7}'
    out = subprocess.run([str(link)], input=req, capture_output=True)
    answer = json.loads(out.stdout)
    assert out.returncode == 1 and answer["id"] == 7 and answer["result"] is None
    assert answer["error"]["params"] == ["Unimplemented", "Task.frobnicate"]


def test_corrupt_file_beside_good_ones(store, state_dir):
    good = store.create("good")
    bad = store.create("bad")
    (state_dir / "tasks" / (bad.id + ".json")).write_bytes(b'{"version": 1, "id": ')
    assert run_bin("Task.ls", {"dbg": "d"}).json == [good.id, bad.id]
    res = run_bin("Task.stat", {"dbg": "d", "id": bad.id})
    assert res.error_name == "Task_corrupt" and bad.id in res.json["params"][1]
    assert run_bin("Task.stat", {"dbg": "d", "id": good.id}).json["debug_info"] == "good"
    assert "corrupt" in (state_dir / "logs" / "store.log").read_text()
    assert run_bin("Task.destroy", {"dbg": "d", "id": bad.id}).returncode == 0
    assert run_bin("Task.ls", {"dbg": "d"}).json == [good.id]


def test_unsafe_state_directory_is_refused(tmp_path, monkeypatch):
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir(mode=0o777)
    unsafe.chmod(0o777)
    monkeypatch.setenv("TASK_STATE_DIR", str(unsafe))
    res = run_bin("Task.ls", {"dbg": "d"})
    assert res.error_name == "State_directory_invalid" and "writable" in res.json["params"][2]
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    monkeypatch.setenv("TASK_STATE_DIR", str(link))
    assert run_bin("Task.ls", {"dbg": "d"}).error_name == "State_directory_invalid"


@pytest.mark.parametrize("blocklist", [
    {"blocksize": 2 ** 64, "ranges": [[0, 1]]},
    {"blocksize": 512, "ranges": [[2 ** 64, 1]]},
    {"blocksize": 512, "ranges": [[0, 2 ** 62]]},
    {"blocksize": -(2 ** 64), "ranges": []},
])
def test_data_copy_refuses_integers_out_of_bounds_and_makes_no_task(state_dir, tmp_path, blocklist):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    params = {"dbg": "d", "uri": str(src), "domain": "0", "remote": "file://%s" % (tmp_path / "dst"), "blocklist": blocklist}
    res = run_bin("Data.copy", params)
    assert res.error_name == "Invalid_arguments" and "blocklist" in res.json["params"][1]
    assert run_bin("Task.ls", {"dbg": "d"}).json == []
    assert not (tmp_path / "dst").exists()


def test_executables_run_with_the_installed_interpreter_flags(store):
    """The installed interpreter line is ``python3 -I -S``: no PYTHON*
    variable, user site or site start-up. The checkout's executables work
    so too, and the JSON is the same as without the flags."""
    done = store.create("flags")
    store.transition(done.id, lambda t: Completed(1))
    params = json.dumps({"dbg": "d", "id": done.id}).encode()
    env = dict(os.environ, PYTHONPATH="/nonexistent", PYTHONSTARTUP="/nonexistent")
    isolated = subprocess.run([sys.executable, "-I", "-S", os.path.join(BIN, "Task.stat"), "--json"], input=params,
                              capture_output=True, env=env, timeout=30)
    assert isolated.returncode == 0, isolated.stderr
    assert isolated.stdout == run_bin("Task.stat", params).stdout


@pytest.mark.parametrize("torn", [b"{torn", b'{"id": }', b"[1,"])
def test_a_torn_task_file_is_reported_corrupt_by_a_fresh_process(store, state_dir, torn):
    """The store parses task files without the json module: a file torn
    inside a value is still Task_corrupt, not an internal error (before
    Python 3.12 the C parser reports such errors only through an imported
    json.decoder)."""
    task = store.create("torn")
    (state_dir / "tasks" / (task.id + ".json")).write_bytes(torn)
    assert run_bin("Task.stat", {"dbg": "d", "id": task.id}).error_name == "Task_corrupt"


HEAVY = {
    "argparse", "traceback", "xapi_storage_tasks.wire.boundary",  # usage and failures only
    "typing", "types", "collections", "functools", "contextlib",  # annotations and helpers: never at run time
    "json", "re", "enum", "signal",  # the store uses wire.jsontext; signal only where one is sent
    "xapi_storage_tasks.tasks.worker", "xapi_storage_tasks.data.copy",
}


@pytest.mark.parametrize("call", ["Task.ls", "Task.stat", "Data.stat of a copy", "Data.stat of a running mirror",
                                  "Data.stat of a running mirror, waiting"])
def test_a_successful_call_loads_no_error_formatting_argument_parser_or_typing(store, state_dir, tmp_path, call):
    """The polled calls stay light: the error boundary and traceback are
    imported by failures only, argparse by positional calls only, typing
    never at run time (annotations are for the type checker: ``import
    typing`` alone costs most of a bare interpreter start), and neither
    json, contextlib nor signal (which imports enum) on the read path."""
    done = store.create("light")
    store.transition(done.id, lambda t: Completed(1))
    copy = store.create("light", {"kind": "CopyV1", "args": {}})
    store.transition(copy.id, lambda t: Completed(1))
    mirror = store.create("light", {"kind": "MirrorV1", "args": {}, "ready": True})  # Pending, synchronised
    if call.endswith("waiting"):  # answered just now: this poll waits for news (the setting's time)
        (state_dir / "polls").mkdir(mode=0o700, exist_ok=True)
        (state_dir / "polls" / mirror.id).write_text(json.dumps({"at": time.time(), "state": ["Completed", None]}))
    method, params, expected = {
        "Task.ls": ("Task.ls", {"dbg": "d"}, [done.id, copy.id, mirror.id]),
        "Task.stat": ("Task.stat", {"dbg": "d", "id": done.id}, None),
        "Data.stat of a copy": ("Data.stat", {"dbg": "d", "operation": ["CopyV1", copy.id]},
                                {"failed": False, "complete": True, "progress": 1.0}),
        "Data.stat of a running mirror": ("Data.stat", {"dbg": "d", "operation": ["MirrorV1", mirror.id]},
                                          {"failed": False, "complete": True, "progress": 1.0}),
    }[call.replace(", waiting", "")]
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\n"
                     "sys.path.insert(0, %r)\n"
                     "from xapi_storage_tasks.entry import main\n"
                     "status = main([%r, '--json'])\n"
                     "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
                     "sys.exit(status)\n" % (SRC, os.path.join(BIN, method)))
    res = subprocess.run([sys.executable, "-I", "-S", str(probe)], input=json.dumps(params).encode(),
                         capture_output=True, timeout=30, env=dict(os.environ, TASK_STAT_WAIT="0.2"))
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == expected if expected is not None else got["id"] == done.id
    loaded = set(res.stderr.decode().split())
    assert {"xapi_storage_tasks.entry", "xapi_storage_tasks.tasks.store"} <= loaded  # the probe sees the call's imports
    assert not loaded & HEAVY
