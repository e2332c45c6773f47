"""Data.stat paced for a caller that polls a running operation back to
back (xapi_storage_tasks.tasks.pacing), through the real executables.

No assertion bounds how long something may take beyond the generous hang
bound (HANG): a call that must answer at once is made with a wait setting
far longer than that bound, so a wrong wait fails the test as a hang
instead of as a slow answer."""

import json
import os
import subprocess
import time

from conftest import BIN, run_bin
from xapi_storage_tasks.tasks.state import Completed, Pending

HANG = 30  # seconds: only ever reached by a wrong wait
FOREVER = "600"  # a wait setting no test lives to see the end of


def running_copy(store, progress=0.25):
    """A Pending copy (no worker yet: it counts as starting for 30 s)."""
    task = store.create("pacing", operation={"kind": "CopyV1", "args": {}})
    store.transition(task.id, lambda t: Pending(progress))
    return task.id


def stat(task_id):
    res = run_bin("Data.stat", {"dbg": "d", "operation": ["CopyV1", task_id]}, timeout=HANG)
    assert res.returncode == 0, res.stderr
    return res.json


def start_stat(task_id):
    """A Data.stat running in the background: ``.communicate()`` its answer."""
    proc = subprocess.Popen([os.path.join(BIN, "Data.stat"), "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(json.dumps({"dbg": "d", "operation": ["CopyV1", task_id]}).encode())
    proc.stdin.close()
    return proc


def answer_of(proc):
    assert proc.wait(HANG) == 0  # first: a pacing bug fails here, not after FOREVER (the answer fits the pipe)
    return json.loads(proc.stdout.read())


def test_a_first_call_answers_at_once_and_is_remembered(store, state_dir, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    assert stat(task_id) == {"failed": False, "complete": False, "progress": 0.25}
    memory = json.loads((state_dir / "polls" / task_id).read_text())
    assert memory["state"] == ["Pending", 0.25] and memory["at"] <= time.time()


def test_a_finished_operation_answers_at_once_every_time(store, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    stat(task_id)
    store.transition(task_id, lambda t: Completed(1.0))
    for _ in range(3):
        assert stat(task_id) == {"failed": False, "complete": True, "progress": 1.0}


def test_an_isolated_call_or_a_torn_memory_answers_at_once(store, state_dir, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    stat(task_id)
    memory = state_dir / "polls" / task_id
    memory.write_text(json.dumps({"at": time.time() - 1000.0, "state": ["Pending", 0.25]}))  # long ago
    assert stat(task_id)["progress"] == 0.25
    memory.write_text('{"at": 1')  # torn
    assert stat(task_id)["progress"] == 0.25
    memory.unlink()
    assert stat(task_id)["progress"] == 0.25


def test_a_change_since_the_last_answer_is_answered_at_once(store, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    stat(task_id)
    store.transition(task_id, lambda t: Pending(0.5))  # a meaningful step
    assert stat(task_id)["progress"] == 0.5


def test_a_back_to_back_poller_is_paced_while_nothing_changes(store, monkeypatch):
    """Each answer after the first comes at least one period after the one
    before: a back-to-back poller gets at most one answer per period."""
    period = 0.2
    monkeypatch.setenv("TASK_STAT_WAIT", str(period))
    task_id = running_copy(store)
    stat(task_id)
    t0 = time.monotonic()
    for _ in range(4):
        assert stat(task_id)["progress"] == 0.25
    assert time.monotonic() - t0 >= 4 * period


def test_a_waiting_poller_sees_a_change_and_answers_the_truth(store, monkeypatch):
    """A poll that waits wakes for a change (not for a write that is no
    news), long before its bound, and answers the state as it is then."""
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    stat(task_id)
    proc = start_stat(task_id)
    time.sleep(0.3)
    store.transition(task_id, lambda t: Pending(0.26))  # written, but no news
    time.sleep(0.3)
    assert proc.poll() is None  # still waiting
    store.transition(task_id, lambda t: Completed(2.0))
    assert answer_of(proc) == {"failed": False, "complete": True, "progress": 1.0}


def test_the_answer_after_a_full_wait_is_the_truth(store, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", "0.3")
    task_id = running_copy(store)
    stat(task_id)
    store.transition(task_id, lambda t: Pending(0.27))  # less than a step: the next poll waits its period
    t0 = time.monotonic()
    assert stat(task_id)["progress"] == 0.27
    assert time.monotonic() - t0 >= 0.25  # it did wait (the period less the tick and start-up slack)


def test_no_lock_is_held_while_waiting(store, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    stat(task_id)
    proc = start_stat(task_id)
    try:
        time.sleep(0.3)
        store.annotate(task_id, lambda t: None, wait=0)  # the task's lock is free
        assert run_bin("Task.stat", {"dbg": "d", "id": task_id}, timeout=HANG).json["state"] == ["Pending", 0.25]
        assert proc.poll() is None  # the poller still waits, holding nothing
        assert run_bin("Data.cancel", {"dbg": "d", "operation": ["CopyV1", task_id]}, timeout=HANG).returncode == 0
    finally:
        store.transition(task_id, lambda t: Completed(1.0))  # the cancel waits for a worker that never comes
    assert answer_of(proc)["complete"] is True


def test_the_memory_goes_when_the_task_ends_and_with_the_task(store, state_dir, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", FOREVER)
    task_id = running_copy(store)
    stat(task_id)
    memory = state_dir / "polls" / task_id
    assert memory.exists()
    store.transition(task_id, lambda t: Completed(1.0))
    assert not memory.exists()
    memory.write_text("{}")  # a late poller's, written after the end
    assert run_bin("Data.destroy", {"dbg": "d", "operation": ["CopyV1", task_id]}).returncode == 0
    assert not memory.exists()


def test_zero_never_waits_nor_remembers(store, state_dir, monkeypatch):
    monkeypatch.setenv("TASK_STAT_WAIT", "0")
    task_id = running_copy(store)
    for _ in range(3):
        assert stat(task_id)["progress"] == 0.25
    assert not (state_dir / "polls" / task_id).exists()
