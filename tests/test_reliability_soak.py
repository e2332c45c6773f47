"""Concurrency soak: many concurrent callers of every Task method (the real
executables, as subprocesses) against several running workers, with
cancels and destroys, while a reader parses task files continuously.

``RELIABILITY_SOAK_SECONDS`` (default 15) bounds the calling phase,
``RELIABILITY_SOAK_CALLERS`` (default 12) sets the number of concurrent
callers; ``RELIABILITY_SEED`` repeats a run.
"""

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from conftest import BIN, ROOT, run_bin
from faults import (
    OSProxy,
    SigtermOnWrite,
    env_float,
    env_int,
    kill_live_workers,
    leftovers,
    report,
    rng,
    store_os,
    task_file_problems,
)
from ops import write_steps
from xapi_storage_tasks.wire import ids
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks import api as task_api
from xapi_storage_tasks.tasks import worker
from xapi_storage_tasks.tasks.state import Completed
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.tasks.record import Task

pytestmark = pytest.mark.reliability

STARTER = os.path.join(ROOT, "tests", "start_task.py")
STATE_TAGS = ("Pending", "Completed", "Failed")


def _valid_wire_state(state):
    if not (isinstance(state, list) and len(state) == 2 and state[0] in STATE_TAGS):
        return False
    tag, value = state
    if tag == "Pending":
        return type(value) is float and 0.0 <= value <= 1.0
    if tag == "Completed":
        return isinstance(value, dict) and type(value.get("duration")) is float
    return isinstance(value, str)


def _raw_state(state_dir, task_id):
    try:
        with open(os.path.join(str(state_dir), "tasks", task_id + ".json"), "rb") as f:
            return json.loads(f.read())["state"][0]
    except (OSError, ValueError, KeyError):
        return None


def test_concurrent_callers_soak(state_dir, monkeypatch, tmp_path):
    """Promise: under dozens of concurrent Task.stat/cancel/destroy/ls
    calls against running workers, every answer is a valid result or an
    allowed error (Task_in_progress for destroying a Pending task,
    Task_does_not_exist after a destroy), no reader ever sees a torn task
    file, and once the workers end every remaining task is terminal,
    Completed ones have their whole output and Cancelled/Failed ones no
    artifact."""
    monkeypatch.setenv("TASK_CANCEL_GRACE", "1.0")
    r = rng()
    seconds = env_float("RELIABILITY_SOAK_SECONDS", 15.0)
    n_callers = env_int("RELIABILITY_SOAK_CALLERS", 12)
    max_running = 6
    lock = threading.Lock()
    tasks = {}  # id -> {"out", "steps", "started"}
    destroy_requested = set()
    seen_final = {}  # id -> terminal state seen by a Task.stat caller
    cancelled_while_pending = set()  # a cancel was issued while the file said Pending
    calls = Counter()
    answers = Counter()
    unexpected = []
    reads = Counter()
    torn = []
    stop = threading.Event()
    with Store(str(state_dir)) as s:
        s.dir_fd("tasks")  # create it before the reader starts

    def execute(method, params):
        p = subprocess.run([os.path.join(BIN, method), "--json"], input=json.dumps(params).encode(),
                           capture_output=True, timeout=120)
        with lock:
            calls[method] += 1
        try:
            body = json.loads(p.stdout)
        except ValueError:
            body = None
        return p.returncode, p.stdout, body

    def problem(what):
        with lock:
            unexpected.append(what)

    def start():
        steps = r.randint(10, 50)
        out = str(tmp_path / ("out-%s" % os.urandom(6).hex()))
        ignore = r.random() < 0.15  # a stuck worker: cancel must escalate to SIGKILL
        p = subprocess.run([sys.executable, STARTER, out, str(steps), "0.08", "1" if ignore else "0"],
                           capture_output=True, timeout=120)
        with lock:
            calls["start"] += 1
        if p.returncode != 0:
            problem(("start", p.returncode, p.stderr[-300:]))
            return
        tid = json.loads(p.stdout)
        with lock:
            tasks[tid] = {"out": out, "steps": steps, "started": time.monotonic()}

    def running_estimate():
        now = time.monotonic()
        with lock:
            return sum(1 for t in tasks.values() if now - t["started"] < 1.5)

    def pick():
        """Mostly a task started lately (likely running), else any task."""
        now = time.monotonic()
        with lock:
            known = list(tasks)
            recent = [t for t in known if now - tasks[t]["started"] < 3.0]
        if recent and r.random() < 0.7:
            return r.choice(recent)
        return r.choice(known) if known else None

    def one_call():
        action = r.choices(["start", "stat", "cancel", "destroy", "ls"], weights=[3, 5, 2, 2, 2])[0]
        if action == "start" or pick() is None:
            if running_estimate() < max_running:
                start()
                return
            action = "ls"
        if action == "ls":
            code, raw, body = execute("Task.ls", {"dbg": "soak"})
            ok = code == 0 and isinstance(body, list) and all(ids.is_valid(i) for i in body) and body == sorted(body)
            answers["ls ok" if ok else "ls BAD"] += 1
            if not ok:
                problem(("Task.ls", code, raw[:300]))
            return
        tid = pick()
        if action == "destroy":
            with lock:
                destroy_requested.add(tid)
        method = {"stat": "Task.stat", "cancel": "Task.cancel", "destroy": "Task.destroy"}[action]
        if method == "Task.cancel" and _raw_state(state_dir, tid) == "Pending":
            with lock:
                cancelled_while_pending.add(tid)
        code, raw, body = execute(method, {"dbg": "soak", "id": tid})
        if code == 0:
            if method == "Task.stat":
                ok = isinstance(body, dict) and body.get("id") == tid and _valid_wire_state(body.get("state")) \
                    and type(body.get("ctime")) is float and body.get("debug_info") == "test-dbg"
            else:
                ok = raw == b"null\n"
            answers["%s ok" % method if ok else "%s BAD" % method] += 1
            if not ok:
                problem((method, tid, raw[:300]))
            elif method == "Task.stat" and body["state"][0] != "Pending":
                with lock:
                    seen_final[tid] = body["state"][0] if body["state"][0] == "Completed" else body["state"][1].split(":")[0]
            return
        name = body.get("params", [None])[0] if isinstance(body, dict) else None
        with lock:
            destroyed = tid in destroy_requested
        allowed = (name == "Task_does_not_exist" and destroyed) or (name == "Task_in_progress" and method == "Task.destroy")
        answers["%s %s" % (method, name)] += 1
        if not allowed:
            problem((method, tid, code, raw[:300]))

    def caller():
        while not stop.is_set():
            try:
                one_call()
            except Exception as e:  # a timeout or a crash of the harness itself
                problem(("caller", repr(e)))

    def reader():
        try:
            read_loop()
        except Exception as e:
            problem(("reader", repr(e)))

    def read_loop():
        tasks_dir = os.path.join(str(state_dir), "tasks")
        while not stop.is_set():
            for name in os.listdir(tasks_dir):
                try:
                    with open(os.path.join(tasks_dir, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    reads["vanished"] += 1
                    continue
                reads["files"] += 1
                try:
                    Task.from_disk(json.loads(data))
                except ValueError as e:
                    torn.append((name, str(e), data[:200]))

    threads = [threading.Thread(target=reader, daemon=True)]
    threads += [threading.Thread(target=caller, daemon=True) for _ in range(n_callers)]
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    calling_time = time.monotonic() - t0

    # Let every worker end (stuck ones are killed by their escalator or by
    # the stat after the grace period), then check the final state.
    deadline = time.monotonic() + 30
    with Store(str(state_dir)) as store:
        remaining = store.ids()
        for tid in remaining:
            while time.monotonic() < deadline and not task_api.stat("settle", tid).state.terminal:
                time.sleep(0.05)
            ident = store.get(tid).worker
            if ident is not None:
                assert identity.wait_gone(ident, max(1.0, deadline - time.monotonic())), "worker of %s still runs" % tid
        res = run_bin("Task.ls", {"dbg": "final"})
        assert res.returncode == 0 and res.json == remaining
        finals = Counter()
        undeclared = []
        for tid in remaining:
            task = store.get(tid)
            info = tasks.get(tid)
            assert task.state.terminal, "task %s still %r" % (tid, task.state)
            assert task.artifacts == [], "finished task %s still declares %r" % (tid, task.artifacts)
            if info is None:
                continue  # started by a starter whose answer we never parsed
            exists = os.path.exists(info["out"])
            if isinstance(task.state, Completed):
                finals["Completed"] += 1
                with open(info["out"]) as f:
                    assert f.read().count("step") == info["steps"], "Completed task %s has an incomplete output" % tid
            else:
                finals[task.state.message.split(":")[0]] += 1
                if exists:
                    with open(info["out"]) as f:
                        lines = f.read().count("step")
                    assert lines == info["steps"], "Failed task %s left a partial artifact (%d lines)" % (tid, lines)
                    undeclared.append(tid)  # see test_cancel_landing_during_forget_artifact
    problems = task_file_problems(state_dir)
    live = kill_live_workers(state_dir)
    report("soak", seconds=round(calling_time, 1), callers=n_callers, calls=dict(calls), total_calls=sum(calls.values()),
           answers=dict(answers), tasks_started=len(tasks), tasks_remaining=len(remaining), final_states=dict(finals),
           terminal_states_seen_by_callers=dict(Counter(seen_final.values())),
           failed_with_finished_output=len(undeclared),
           cancels_issued_on_pending=len(cancelled_while_pending),
           their_final_states=dict(Counter(_raw_state(state_dir, t) or "destroyed" for t in cancelled_while_pending)),
           file_reads=reads["files"], vanished_reads=reads["vanished"],
           torn_reads=len(torn), unexpected_errors=len(unexpected),
           failures=len(unexpected) + len(torn) + len(problems) + live)
    assert unexpected == []
    assert torn == []
    assert problems == []
    assert live == 0
    assert leftovers(state_dir, "tmp") == [] and leftovers(state_dir, "pending") == []
    assert sum(calls.values()) >= 50 and len(tasks) >= 5 and reads["files"] > 0, "the soak did too little to mean anything"


def test_cancel_landing_while_the_task_is_marked_completed(state_dir, store, tmp_path):
    """Promise: a task ends Completed with its output, or Failed with no
    artifact left. Here the cancel's SIGTERM lands at the one instant where
    both are at stake: while the worker writes the record that marks the
    task Completed and drops its artifacts. The write must finish (it is
    not interruptible) and the task stays Completed with its output."""
    out = tmp_path / "out"
    proof = tmp_path / "sigterm-sent"

    def completing(record, previous):
        return record.get("state", [None])[0] == "Completed"

    hook = SigtermOnWrite(completing, proof=str(proof))
    store_os(OSProxy(hook))
    try:
        tid = worker.start("complete-race", write_steps, {"path": str(out), "steps": 3, "delay": 0.01}, store=store)
    finally:
        store_os(os)
    assert identity.wait_gone(store.get(tid).worker, 10)
    state = store.get(tid).state
    report("cancel while marking Completed", trials=1, faults_injected=int(proof.exists()), final_state=state,
           output_left=out.exists(), failures=int(not (isinstance(state, Completed) and out.exists())))
    assert proof.exists(), "the SIGTERM was never sent: the test proved nothing"
    assert isinstance(state, Completed) and out.exists(), (state, out.exists())
    assert store.get(tid).artifacts == []
