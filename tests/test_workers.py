"""Detached workers, progress, cancellation and lost workers: real
processes, real signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_bin
from xapi_storage_tasks.tasks import lifecycle, marks
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks import worker
from xapi_storage_tasks.tasks.state import CANCELLED, Completed, Failed
from xapi_storage_tasks.tasks.store import Store

STARTER = os.path.join(ROOT, "tests", "start_task.py")


@pytest.fixture
def workers(state_dir, monkeypatch):
    """Start test tasks through the starter executable; at teardown make
    sure no worker of this test is left alive."""
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0.5")
    started = []

    def start(path, steps=10, delay=0.05, ignore_term=False, fail_at=-1):
        out = subprocess.run(
            [sys.executable, STARTER, str(path), str(steps), str(delay), "1" if ignore_term else "0", str(fail_at)],
            capture_output=True, timeout=30, check=True,
        )
        task_id = json.loads(out.stdout)
        started.append(task_id)
        return task_id

    yield start
    with Store(str(state_dir)) as store:
        for task_id in started:
            try:
                ident = store.get(task_id).worker
            except Exception:
                continue
            if ident and identity.matches(ident):
                os.killpg(ident["pgid"], signal.SIGKILL)
                assert identity.wait_gone(ident, 5)
                pytest.fail("worker of %s was still running after the test" % task_id)


def stat(task_id):
    res = run_bin("Task.stat", {"dbg": "d", "id": task_id})
    assert res.returncode == 0, res.stdout
    return res.json


def wait_state(task_id, terminal=True, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = stat(task_id)
        if (record["state"][0] != "Pending") == terminal:
            return record
        time.sleep(0.02)
    pytest.fail("task %s did not finish: %r" % (task_id, record))


def wait_gone(ident):
    assert identity.wait_gone(ident, 10), "worker %d still alive" % ident["pid"]


def test_start_stat_complete_with_monotonic_float_progress(workers, store, tmp_path):
    out = tmp_path / "out.txt"
    task_id = workers(out, steps=10, delay=0.05)
    seen = []
    while True:
        record = stat(task_id)
        if record["state"][0] != "Pending":
            break
        assert isinstance(record["state"][1], float)
        seen.append(record["state"][1])
    assert seen == sorted(seen)
    kind, completion = record["state"]
    assert kind == "Completed" and isinstance(completion["duration"], float)
    assert 0.4 < completion["duration"] < 30
    assert completion["result"] == ["UnitResult", None]
    assert out.read_text().count("step") == 10
    task = store.get(task_id)
    assert task.artifacts == [] and store.pending_ids() == []
    wait_gone(task.worker)


def test_worker_identity_and_daemon_properties(workers, store, tmp_path):
    task_id = workers(tmp_path / "out", steps=200, delay=0.05)
    ident = store.get(task_id).worker  # recorded before the starter returned
    assert ident["pid"] == ident["pgid"] and ident["boot_id"] == identity.boot_id()
    assert identity.matches(ident)
    pid = ident["pid"]
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    status = open("/proc/%d/status" % pid).read()
    assert "Umask:\t0077" in status
    assert os.getsid(pid) != os.getsid(0)
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    run_bin("Task.cancel", {"dbg": "d", "id": task_id})
    assert wait_state(task_id)["state"] == ["Failed", CANCELLED]
    wait_gone(ident)


def test_pipes_close_as_soon_as_the_starter_exits(workers, state_dir, tmp_path):
    proc_ = subprocess.Popen(
        [sys.executable, STARTER, str(tmp_path / "out"), "600", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = proc_.communicate(timeout=20)  # EOF on both pipes, not after 60 s
    task_id = json.loads(out)
    assert proc_.returncode == 0 and err == b""
    assert stat(task_id)["state"][0] == "Pending"  # the operation is still running
    run_bin("Task.cancel", {"dbg": "d", "id": task_id})
    wait_state(task_id)


def test_exception_makes_the_task_failed_with_a_readable_message(workers, store, state_dir, tmp_path):
    out = tmp_path / "out"
    task_id = workers(out, steps=10, delay=0.01, fail_at=3)
    record = wait_state(task_id)
    assert record["state"] == ["Failed", "RuntimeError: boom at step 3"]
    assert not out.exists()
    assert "Traceback" in (state_dir / "logs" / (task_id + ".log")).read_text()


@pytest.mark.parametrize("when", [0.0, 0.3])
def test_cancel_early_and_midway_removes_the_artifact(workers, store, tmp_path, when):
    out = tmp_path / "out"
    task_id = workers(out, steps=400, delay=0.01)
    time.sleep(when)
    res = run_bin("Task.cancel", {"dbg": "d", "id": task_id})
    assert (res.returncode, res.stdout) == (0, b"null\n")
    assert wait_state(task_id)["state"] == ["Failed", CANCELLED]
    assert not out.exists()
    wait_gone(store.get(task_id).worker)


def test_cancel_after_completion_is_a_noop(workers, tmp_path):
    task_id = workers(tmp_path / "out", steps=2, delay=0.01)
    done = wait_state(task_id)
    assert done["state"][0] == "Completed"
    assert run_bin("Task.cancel", {"dbg": "d", "id": task_id}).returncode == 0
    assert stat(task_id) == done
    assert (tmp_path / "out").exists()


def _concurrently(methods, task_id):
    callers = [
        subprocess.Popen([os.path.join(ROOT, "bin", m), "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for m in methods
    ]
    for c in callers:
        c.stdin.write(json.dumps({"dbg": "d", "id": task_id}).encode())
        c.stdin.close()
    return [(c.wait(timeout=30), c.stdout.read()) for c in callers]


def test_cancel_twice_and_concurrently(workers, store, tmp_path):
    task_id = workers(tmp_path / "out", steps=400, delay=0.01)
    outputs = _concurrently(["Task.cancel"] * 6 + ["Task.stat", "Task.ls"] * 2, task_id)
    assert [code for code, _ in outputs] == [0] * 10
    assert [out for _, out in outputs[:6]] == [b"null\n"] * 6
    assert wait_state(task_id)["state"] == ["Failed", CANCELLED]
    assert run_bin("Task.cancel", {"dbg": "d", "id": task_id}).returncode == 0
    assert not (tmp_path / "out").exists()


def test_cancel_concurrent_with_destroy(workers, store, tmp_path):
    task_id = workers(tmp_path / "out", steps=400, delay=0.01)
    outputs = _concurrently(["Task.cancel", "Task.destroy"] * 4, task_id)
    for code, out in outputs:
        # destroy may come before the cancel lands (Pending) or after another
        # destroy (gone); nothing else is acceptable.
        assert code == 0 or json.loads(out)["params"][0] in ("Task_in_progress", "Task_does_not_exist")
    # A destroy can only succeed once a cancel has taken effect.
    assert (0, b"null\n") in outputs[0::2]
    if task_id in store.ids():
        assert wait_state(task_id)["state"] == ["Failed", CANCELLED]
    assert not (tmp_path / "out").exists()


def test_ignored_sigterm_gets_sigkill_after_the_grace_period(workers, store, tmp_path):
    out = tmp_path / "out"
    task_id = workers(out, steps=2000, delay=0.01, ignore_term=True)
    ident = store.get(task_id).worker
    run_bin("Task.cancel", {"dbg": "d", "id": task_id})
    time.sleep(0.2)
    assert identity.matches(ident), "the worker ignores SIGTERM, so it must still run within the grace period"
    # Nobody polls: the escalator started by cancel must do it on its own.
    wait_gone(ident)
    deadline = time.monotonic() + 10
    while store.get(task_id).state.terminal is False and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get(task_id).state == Failed(CANCELLED)
    assert not out.exists()


def test_worker_killed_from_outside_fails_on_next_stat(workers, store, tmp_path):
    out = tmp_path / "out"
    task_id = workers(out, steps=2000, delay=0.01)
    ident = store.get(task_id).worker
    os.killpg(ident["pgid"], signal.SIGKILL)
    wait_gone(ident)
    record = stat(task_id)
    assert record["state"][0] == "Failed" and record["state"][1].startswith("Worker lost")
    assert not out.exists()
    assert store.pending_ids() == []


def test_ls_reconciles_lost_workers(workers, store, tmp_path):
    task_id = workers(tmp_path / "out", steps=2000, delay=0.01)
    ident = store.get(task_id).worker
    os.killpg(ident["pgid"], signal.SIGKILL)
    wait_gone(ident)
    assert run_bin("Task.ls", {"dbg": "d"}).json == [task_id]
    assert store.get(task_id).state.terminal


def _forge_worker(store, task_id, ident):
    store.annotate(task_id, lambda t: setattr(t, "worker", ident))


def test_reused_pid_is_never_signalled(store):
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        real = identity.identity(bystander.pid)
        forged = [
            dict(real, start=real["start"] + 1),  # pid reused: start time differs
            dict(real, boot_id="00000000-0000-0000-0000-000000000000"),  # previous boot
            dict(real, pid=1, pgid=1, start=identity.identity(1)["start"]),  # init
            identity.identity(),  # the caller itself
            {"pid": "12", "start": 0},  # tampered file
        ]
        for ident in forged:
            task = store.create("forged")
            _forge_worker(store, task.id, ident)
            res = run_bin("Task.cancel", {"dbg": "d", "id": task.id})
            assert res.returncode == 0, (ident, res.stdout)
            assert bystander.poll() is None, "bystander was signalled for %r" % ident
            assert identity.signal_worker(ident, signal.SIGTERM, marks.file_id(store, task.id)) is False
        # The forged tasks are not left Pending: their "worker" is not theirs.
        for task_id in store.ids():
            if identity.identity() != store.get(task_id).worker:
                assert stat(task_id)["state"][0] == "Failed"
    finally:
        bystander.kill()
        bystander.wait()


def test_cancel_before_the_worker_starts_is_honoured(store, state_dir, tmp_path):
    from ops import write_steps

    out = tmp_path / "out"
    task = store.create("early")
    lifecycle.request_cancel(store, task.id)  # no worker identity yet
    worker.launch(store, task.id, write_steps, {"path": str(out), "steps": 100, "delay": 0.05})
    deadline = time.monotonic() + 10
    while not store.get(task.id).state.terminal and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.get(task.id).state == Failed(CANCELLED)
    assert not out.exists()
    wait_gone(store.get(task.id).worker)


def test_task_that_never_got_a_worker_fails_after_the_start_timeout(store, monkeypatch):
    task = store.create("orphan")
    monkeypatch.setattr(lifecycle, "START_TIMEOUT", 0.0)
    assert lifecycle.reconcile(store, task.id).state == Failed("Worker lost: it never started")


def test_destroy_refuses_pending_and_removes_every_trace(workers, store, state_dir, tmp_path):
    task_id = workers(tmp_path / "out", steps=300, delay=0.01)
    assert run_bin("Task.destroy", {"dbg": "d", "id": task_id}).error_name == "Task_in_progress"
    run_bin("Task.cancel", {"dbg": "d", "id": task_id})
    wait_state(task_id)
    assert (state_dir / "logs" / (task_id + ".log")).exists()
    assert run_bin("Task.destroy", {"dbg": "d", "id": task_id}).returncode == 0
    assert [p for p in state_dir.rglob("*") if task_id in p.name] == []
    assert run_bin("Task.stat", {"dbg": "d", "id": task_id}).error_name == "Task_does_not_exist"


def test_progress_writes_are_rate_limited(store, tmp_path):
    from ops import write_steps

    task_id = worker.start("fast", write_steps, {"path": str(tmp_path / "out"), "steps": 2000, "delay": 0.0005}, store=store)
    seen = set()
    while True:
        task = store.get(task_id)
        if task.state.terminal:
            break
        seen.add(task.updated)
    assert isinstance(task.state, Completed)
    # 2000 progress reports in about a second: only a handful are written.
    assert len(seen) < 40
    wait_gone(task.worker)
