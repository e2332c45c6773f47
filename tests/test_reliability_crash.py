"""Crash consistency: kill -9 workers, Task.cancel / Task.destroy callers
and a process doing many Store.transition writes, at random instants and at
every store write; afterwards the store must be whole and truthful.

After every crash: every file in ``tasks/`` parses, nothing but
``<id>.json`` is in ``tasks/``, every task is terminal on the next
``Task.stat`` once its worker is gone (Pending with a dead worker turns
Failed), no artifact a Failed task recorded as created is left on disk
(one it declared but was killed before recording may remain) and
``Task.ls`` still works.

Counts: ``RELIABILITY_TRIALS`` (random worker kills, default 200),
``RELIABILITY_WRITER_TRIALS`` (default 50), ``RELIABILITY_CALLER_TRIALS``
(per method, default 16); ``RELIABILITY_SCALE`` multiplies them all and
``RELIABILITY_SEED`` repeats a run.
"""

import json
import os
import select
import signal
import time

import pytest

from conftest import BIN, run_bin
from faults import (
    CrashAt,
    Failures,
    OSProxy,
    dead_identity,
    env_int,
    fork_call,
    kill_live_workers,
    leftovers,
    pidfd_kill,
    report,
    rng,
    run_killed,
    store_os,
    task_file_problems,
    wait_pidfd,
)
from ops import write_steps
from xapi_storage_tasks.tasks import log
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks import api as task_api
from xapi_storage_tasks.tasks import worker
from xapi_storage_tasks.wire.errors import TaskDoesNotExist
from xapi_storage_tasks.tasks.state import Completed, Pending
from xapi_storage_tasks.tasks.store import Store

pytestmark = pytest.mark.reliability

REAL_OS = os


@pytest.fixture
def crash_store(state_dir, monkeypatch):
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0.3")
    with Store(str(state_dir)) as s:
        yield s
    store_os(REAL_OS)
    assert kill_live_workers(state_dir) == 0, "a worker was left running"


def _declared(state_dir, task_id):
    """The artifacts the task file declares right now (raw read): the
    declared paths and those recorded as created by the task."""
    try:
        with open(os.path.join(str(state_dir), "tasks", task_id + ".json"), "rb") as f:
            record = json.loads(f.read())
        return record["artifacts"], list(record.get("created", {}))
    except FileNotFoundError:
        return [], []


def _left_unrecorded(state_dir, task_id, out):
    """The task's log says cleanup left ``out`` because the task had not
    recorded creating it."""
    try:
        with open(os.path.join(str(state_dir), "logs", task_id + ".log")) as f:
            text = f.read()
    except FileNotFoundError:
        return False
    return "artifact %s not removed: never recorded as created" % out in text


def _stat(task_id, real):
    """Task.stat: the real executable, or the same code in-process."""
    if real:
        res = run_bin("Task.stat", {"dbg": "crash", "id": task_id})
        assert res.returncode == 0, res.stdout
        return res.json["state"]
    return task_api.stat("crash", task_id).state.to_wire()


def _check_after(state_dir, task_id, out, steps, declared, real_stat, stats):
    """The checks every trial ends with; returns the final wire state."""
    state = _stat(task_id, real_stat)
    assert state[0] != "Pending", "task %s still Pending after its worker died: %r" % (task_id, state)
    key = "Completed" if state[0] == "Completed" else state[1].split(":")[0]
    stats[key] = stats.get(key, 0) + 1
    if state[0] == "Completed":
        assert state[1]["result"] == ["UnitResult", None]
        with open(out) as f:
            assert f.read().count("step") == steps, "Completed task %s has an incomplete output" % task_id
    else:
        declared, created = declared
        for path in created:
            assert not os.path.exists(path), "created artifact %s of Failed task %s left on disk" % (path, task_id)
        if os.path.exists(out) and _left_unrecorded(state_dir, task_id, out):
            # Killed between creating the file and recording its identity:
            # cleanup cannot prove the file is the task's, so it stays.
            stats["left_unrecorded"] = stats.get("left_unrecorded", 0) + 1
        elif os.path.exists(out):
            # Only a finished output the operation had already undeclared
            # (forget_artifact) may remain; a partial one is a leaked artifact.
            with open(out) as f:
                lines = f.read().count("step")
            assert lines == steps, "Failed task %s left a partial output (%d/%d lines)" % (task_id, lines, steps)
            stats["failed_with_undeclared_output"] = stats.get("failed_with_undeclared_output", 0) + 1
    problems = task_file_problems(state_dir)
    assert problems == []
    return state


def _ls_clean(state_dir, real):
    """Task.ls works, lists every task file, and leaves no Pending mark
    on a finished task."""
    if real:
        res = run_bin("Task.ls", {"dbg": "crash"})
        assert res.returncode == 0, res.stdout
        listed = res.json
    else:
        listed = task_api.ls("crash")
    assert listed == sorted(n[:-5] for n in leftovers(state_dir, "tasks"))
    with Store(str(state_dir)) as s:
        for task_id in leftovers(state_dir, "pending"):
            assert task_id not in listed or not s.get(task_id).state.terminal, "mark left on finished %s" % task_id


def test_worker_killed_at_every_store_write(crash_store, state_dir, tmp_path):
    """Promise: a worker SIGKILLed just before or just after any one of its
    store writes (open/write/fsync/rename/unlink/mkdir) leaves whole task
    files, and the next Task.stat reports the task terminal with no
    declared artifact left."""
    trace = str(tmp_path / "trace")
    log.store_event(crash_store, "crash points: logs/ exists before the trace, as in every trial")
    store_os(OSProxy(CrashAt(0, trace=trace)))
    try:
        tid = worker.start("trace", write_steps, {"path": str(tmp_path / "trace.out"), "steps": 2, "delay": 0.01},
                           store=crash_store)
    finally:
        store_os(REAL_OS)
    assert identity.wait_gone(crash_store.get(tid).worker, 10)
    with open(trace) as f:
        points = len(f.readlines())
    assert points >= 20, "the worker made %d store writes" % points
    stats, trials, undeclared, failures = {}, 0, [], Failures()
    for n in range(1, points + 2):  # points + 1: no crash at all
        for after in (False, True):
            out = str(tmp_path / ("out-%d-%d" % (n, after)))
            store_os(OSProxy(CrashAt(n, after=after)))
            try:
                tid = worker.start("crash-%d" % n, write_steps, {"path": out, "steps": 2, "delay": 0.01}, store=crash_store)
            finally:
                store_os(REAL_OS)
            with failures.trial():
                ident = crash_store.get(tid).worker
                if ident is not None:
                    assert identity.wait_gone(ident, 10)
                declared = _declared(state_dir, tid)
                state = _check_after(state_dir, tid, out, 2, declared, real_stat=(trials % 10 == 0), stats=stats)
                if state[0] == "Failed" and os.path.exists(out):
                    undeclared.append((n, "after" if after else "before"))
            trials += 1
    with failures.trial():
        _ls_clean(state_dir, real=True)
    tmp_left = leftovers(state_dir, "tmp")
    report("worker crash points", store_writes_per_run=points, trials=trials, faults_injected=2 * points,
           outcomes=stats, failed_with_undeclared_output_at=undeclared, tmp_files_left=len(tmp_left), failures=failures)


def test_worker_killed_at_random_times(crash_store, state_dir, tmp_path):
    """Promise: a worker SIGKILLed at any instant of its life leaves whole
    task files; once it is gone the next Task.stat is terminal (Failed
    ``Worker lost`` unless it had completed), the declared artifact is
    gone and Task.ls works."""
    r = rng()
    trials = env_int("RELIABILITY_TRIALS", 200)
    batch, steps, delay, window = 8, 10, 0.02, 0.35
    stats, done, killed_running, already_done, mid_operation, failures = {}, 0, 0, 0, 0, Failures()
    t_begin = time.monotonic()
    while done < trials:
        running = []

        def kill_due(force=False, running=running):
            nonlocal killed_running, already_done
            now = time.monotonic()
            for item in running:
                if item["pidfd"] is not None and not item["killed"] and (force or item["due"] <= now):
                    if force:
                        time.sleep(max(0.0, item["due"] - time.monotonic()))
                    item["killed"] = True
                    # Workers that exited stay zombies where init does not reap:
                    # count as a fault only a kill of a process still running.
                    if identity.matches(item["ident"]) and pidfd_kill(item["pidfd"]):
                        killed_running += 1
                        item["hit"] = True
                    else:
                        pidfd_kill(item["pidfd"])
                        already_done += 1

        for i in range(min(batch, trials - done)):
            out = str(tmp_path / ("r%d-%d" % (done, i)))
            tid = worker.start("random", write_steps, {"path": out, "steps": steps, "delay": delay}, store=crash_store)
            ident = crash_store.get(tid).worker
            pidfd = None
            try:
                pidfd = os.pidfd_open(ident["pid"])
                if not identity.matches(ident):  # exited (and the pid maybe reused) already
                    os.close(pidfd)
                    pidfd = None
            except ProcessLookupError:
                pass
            running.append({"id": tid, "out": out, "pidfd": pidfd, "killed": pidfd is None, "ident": ident,
                            "due": time.monotonic() + r.uniform(0, window), "hit": False})
            kill_due()
        for item in sorted(running, key=lambda x: x["due"]):
            if not item["killed"]:
                time.sleep(max(0.0, item["due"] - time.monotonic()))
                kill_due()
        kill_due(force=True)
        for item in running:
            with failures.trial():
                if item["pidfd"] is not None:
                    assert wait_pidfd(item["pidfd"], 10), "worker did not die"
                    os.close(item["pidfd"])
                declared = _declared(state_dir, item["id"])
                state = _check_after(state_dir, item["id"], item["out"], steps, declared, real_stat=(done % 25 == 0),
                                     stats=stats)
                # Killed alive, and it had not completed: the kill cut its operation short.
                mid_operation += item["hit"] and state[0] == "Failed"
            done += 1
        with failures.trial():
            _ls_clean(state_dir, real=False)
    with failures.trial():
        _ls_clean(state_dir, real=True)
    with failures.trial():
        assert mid_operation >= done // 4, "only %d of %d kills cut a live worker's operation short" % (mid_operation, done)
    report("worker random kills", trials=done, faults_injected=killed_running, mid_operation=mid_operation,
           kills_after_exit=already_done, outcomes=stats, tmp_files_left=len(leftovers(state_dir, "tmp")),
           seconds=round(time.monotonic() - t_begin, 1), failures=failures)


def _writer(path, ids, arts, complete_at, ack_fd):
    """The child: record itself as the tasks' worker, declare one artifact
    each, then transition them forward as fast as it can, acknowledging
    each write on ``ack_fd``. Task 0 completes at iteration complete_at."""
    os.setpgid(0, 0)
    with Store(path) as s:
        me = identity.identity()
        for tid, art in zip(ids, arts):
            def adopt(t, art=art):
                t.worker = me
                t.artifacts.append(art)
                st = os.stat(art)
                t.created[art] = [st.st_dev, st.st_ino]
            s.annotate(tid, adopt)
        os.write(ack_fd, b"R\n")
        done = set()
        i = 0
        while True:
            i += 1
            for k, tid in enumerate(ids):
                if k in done:
                    continue
                if k == 0 and i == complete_at:
                    def complete(t, i=i):
                        t.artifacts = []
                        return Completed(i / 1000.0, ["UnitResult", None])
                    s.transition(tid, complete)
                    done.add(k)
                else:
                    s.transition(tid, lambda t, i=i: Pending(i / 100000.0))
                os.write(ack_fd, b"%d %d\n" % (k, i))


def test_transition_writer_killed_at_random_times(crash_store, state_dir, tmp_path):
    """Promise: a process SIGKILLed in the middle of many Store.transition
    writes never leaves a torn or lost file: each task shows the last
    acknowledged state or the one being written, and the next Task.stat
    turns the orphaned Pending tasks Failed and removes their artifacts."""
    r = rng()
    trials = env_int("RELIABILITY_WRITER_TRIALS", 50)
    acked_writes, outcomes, failures = 0, {}, Failures()
    for trial in range(trials):
        ids, arts = [], []
        for k in range(3):
            ids.append(crash_store.create("writer-%d-%d" % (trial, k)).id)
            art = tmp_path / ("art-%d-%d" % (trial, k))
            art.write_text("partial")
            arts.append(str(art))
        complete_at = r.randint(1, 20)
        ack_r, ack_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ack_r)
                _writer(str(state_dir), ids, arts, complete_at, ack_w)
            finally:
                os._exit(0)
        os.close(ack_w)
        buf = b""
        while b"R\n" not in buf:
            chunk = os.read(ack_r, 65536)
            assert chunk, "writer died before it was ready"
            buf += chunk
        deadline = time.monotonic() + r.uniform(0, 0.15)
        while True:  # drain acknowledgements until the kill instant
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if select.select([ack_r], [], [], left)[0]:
                buf += os.read(ack_r, 65536)
        os.kill(pid, signal.SIGKILL)  # our own unreaped child: the pid cannot be reused
        os.waitpid(pid, 0)
        while True:
            chunk = os.read(ack_r, 65536)
            if not chunk:
                break
            buf += chunk
        os.close(ack_r)
        last = [0, 0, 0]
        for line in buf.split(b"\n")[1:]:
            parts = line.split()
            if len(parts) == 2:
                last[int(parts[0])] = max(last[int(parts[0])], int(parts[1]))
                acked_writes += 1
        with failures.trial():
            assert task_file_problems(state_dir) == []
            for k, tid in enumerate(ids):
                task = crash_store.get(tid)
                if k == 0 and last[0] >= complete_at:
                    assert isinstance(task.state, Completed), "acknowledged completion lost: %r" % task.state
                elif isinstance(task.state, Completed):
                    assert k == 0 and last[0] + 1 == complete_at, "unexpected completion %r" % task.state
                else:
                    p = task.state.progress
                    assert last[k] / 100000.0 - 1e-12 <= p <= (last[k] + 1) / 100000.0 + 1e-12, \
                        "task %d shows progress %r after acknowledged %d" % (k, p, last[k])
                state = _stat(tid, real=(trial % 5 == 0 and k == 1))
                outcomes[state[0]] = outcomes.get(state[0], 0) + 1
                if state[0] == "Completed":
                    assert os.path.exists(arts[k])
                else:
                    assert state[1].startswith("Worker lost"), state
                    assert not os.path.exists(arts[k]), "artifact %s left behind" % arts[k]
            _ls_clean(state_dir, real=False)
    with failures.trial():
        _ls_clean(state_dir, real=True)
    report("transition writer kills", trials=trials, faults_injected=trials, acknowledged_writes=acked_writes,
           outcomes=outcomes, tmp_files_left=len(leftovers(state_dir, "tmp")), failures=failures)


def _calibrate(method, params, runs=3):
    """Median wall time of one executable call on this machine."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        run_bin(method, params)
        times.append(time.monotonic() - t0)
    return sorted(times)[len(times) // 2]


def _wait_worker_end(ident, timeout=15):
    if ident is not None:
        assert identity.wait_gone(ident, timeout), "worker %d still running" % ident["pid"]


def _settle(state_dir, task_id, ident, out, steps, stats, real):
    """After a cancel caller died: the worker ends on its own or by the
    escalation of a later stat; then the task is terminal and a Failed one
    kept no artifact."""
    deadline = time.monotonic() + 15
    while identity.matches(ident) and time.monotonic() < deadline:
        task_api.stat("settle", task_id)  # after the grace this SIGKILLs a cancelled worker
        time.sleep(0.05)
    _wait_worker_end(ident)
    return _check_after(state_dir, task_id, out, steps, ([], []), real_stat=real, stats=stats)


def test_cancel_caller_killed_at_random_points(crash_store, state_dir, tmp_path):
    """Promise: a Task.cancel caller SIGKILLed at any instant (random
    instants of the real executable, then just before/after each of its
    store writes) leaves whole task files, and the task still ends: the
    worker completes, or is cancelled (by SIGTERM or, after the grace, by
    the next stat), never left Pending once its worker is gone, never a
    Failed task with its artifact on disk."""
    r = rng()
    trials = env_int("RELIABILITY_CALLER_TRIALS", 16)
    steps, delay = 15, 0.02
    times = []
    for i in range(3):  # how long a full cancel of a running worker takes here
        args = {"path": str(tmp_path / ("cal%d" % i)), "steps": steps, "delay": delay}
        tid = worker.start("calibrate", write_steps, args, store=crash_store)
        t0 = time.monotonic()
        assert run_bin("Task.cancel", {"dbg": "d", "id": tid}).returncode == 0
        times.append(time.monotonic() - t0)
        _wait_worker_end(crash_store.get(tid).worker)
    median = sorted(times)[1]
    stats, killed, finished, failures = {}, 0, 0, Failures()
    for trial in range(trials):
        out = str(tmp_path / ("c%d" % trial))
        ignore = trial % 4 == 3  # a stuck worker: only SIGKILL ends it early
        args = {"path": out, "steps": steps, "delay": delay, "ignore_term": ignore}
        tid = worker.start("cancel-crash", write_steps, args, store=crash_store)
        ident = crash_store.get(tid).worker
        code, stdout, was_killed = run_killed([os.path.join(BIN, "Task.cancel"), "--json"],
                                              json.dumps({"dbg": "d", "id": tid}).encode(), r.uniform(0.5, 1.5) * median)
        killed += was_killed
        finished += not was_killed
        with failures.trial():
            assert was_killed or (code, stdout) == (0, b"null\n")
            assert task_file_problems(state_dir) == []
            _settle(state_dir, tid, ident, out, steps, stats, real=(trial % 4 == 0))
    # Exact instants: just before / after each store write of the cancel.
    trace = str(tmp_path / "cancel.trace")
    args = {"path": str(tmp_path / "ct"), "steps": steps, "delay": delay}
    tid = worker.start("cancel-trace", write_steps, args, store=crash_store)
    ident = crash_store.get(tid).worker
    assert fork_call("Task.cancel", {"dbg": "d", "id": tid}, hook=lambda pid: CrashAt(0, where="self", trace=trace))[0] == 0
    _wait_worker_end(ident)
    with open(trace) as f:
        points = len(f.readlines())
    exact = 0
    for n in range(1, points + 1):
        for after in (False, True):
            out = str(tmp_path / ("ce%d-%d" % (n, after)))
            tid = worker.start("cancel-exact", write_steps, {"path": out, "steps": steps, "delay": delay}, store=crash_store)
            ident = crash_store.get(tid).worker
            status, _ = fork_call("Task.cancel", {"dbg": "d", "id": tid},
                                  hook=lambda pid, n=n, after=after: CrashAt(n, after=after, where="self"))
            exact += 1
            with failures.trial():
                assert status == -signal.SIGKILL, "the caller was not killed at write %d (status %r)" % (n, status)
                assert task_file_problems(state_dir) == []
                _settle(state_dir, tid, ident, out, steps, stats, real=False)
    with failures.trial():
        _ls_clean(state_dir, real=True)
    report("cancel caller kills", random_trials=trials, callers_killed=killed, callers_finished_first=finished,
           exact_points=points, exact_trials=exact, faults_injected=killed + exact, outcomes=stats,
           caller_median_s=round(median, 3), failures=failures)


def _destroy_subject(store, tmp_path, label, pending):
    """A finished task with a log file, or a Pending task whose worker is
    dead and which declares an existing artifact."""
    task = store.create(label)
    art = str(tmp_path / (label + ".art"))
    if pending:
        with open(art, "w") as f:
            f.write("partial")
        ident = dead_identity()

        def adopt(t):
            t.worker = ident
            t.artifacts.append(art)
            st = os.stat(art)
            t.created[art] = [st.st_dev, st.st_ino]

        store.annotate(task.id, adopt)
    else:
        store.transition(task.id, lambda t: Completed(0.5))
    log.task_event(store, store.get(task.id), "subject of a destroy crash test")
    return task.id, art


def _check_destroyed_or_whole(state_dir, task_id, art, pending, stats):
    res = run_bin("Task.stat", {"dbg": "d", "id": task_id}) if stats.get("_n", 0) % 4 == 0 else None
    stats["_n"] = stats.get("_n", 0) + 1
    try:
        state = task_api.stat("d", task_id).state
    except TaskDoesNotExist:
        if res is not None:
            assert res.error_name == "Task_does_not_exist"
        stats["destroyed"] = stats.get("destroyed", 0) + 1
        assert not os.path.exists(art), "artifact of a destroyed task left"
        return
    if res is not None:
        assert res.returncode == 0 and res.json["state"][0] != "Pending"
    assert state.terminal
    stats["kept"] = stats.get("kept", 0) + 1
    if pending:
        assert not os.path.exists(art)
    # The operator can finish the job.
    assert run_bin("Task.destroy", {"dbg": "d", "id": task_id}).returncode == 0


def _orphans(state_dir, task_id):
    return [os.path.join(top, n) for top, _, names in os.walk(str(state_dir)) for n in names if task_id in n]


def test_destroy_caller_killed_at_random_points(crash_store, state_dir, tmp_path):
    """Promise: a Task.destroy caller SIGKILLed at any instant (random
    instants of the real executable, then just before/after each of its
    store writes) leaves the task either whole and terminal (and
    destroyable) or gone, never corrupt; a reconciled Pending task's
    artifact is removed either way; Task.ls works."""
    r = rng()
    trials = env_int("RELIABILITY_CALLER_TRIALS", 16)
    sample, _ = _destroy_subject(crash_store, tmp_path, "calibrate", pending=False)
    median = _calibrate("Task.stat", {"dbg": "d", "id": sample})
    stats, killed, orphan_files, failures = {}, 0, 0, Failures()
    for trial in range(trials):
        pending = trial % 2 == 1
        tid, art = _destroy_subject(crash_store, tmp_path, "d%d" % trial, pending)
        code, stdout, was_killed = run_killed([os.path.join(BIN, "Task.destroy"), "--json"],
                                              json.dumps({"dbg": "d", "id": tid}).encode(), r.uniform(0.5, 1.5) * median)
        killed += was_killed
        with failures.trial():
            assert was_killed or (code, stdout) == (0, b"null\n")
            assert task_file_problems(state_dir) == []
            _check_destroyed_or_whole(state_dir, tid, art, pending, stats)
        orphan_files += len(_orphans(state_dir, tid))
    exact = 0
    for pending in (False, True):
        tid, art = _destroy_subject(crash_store, tmp_path, "trace-%d" % pending, pending)
        trace = str(tmp_path / ("destroy-%d.trace" % pending))
        assert fork_call("Task.destroy", {"dbg": "d", "id": tid},
                         hook=lambda pid, trace=trace: CrashAt(0, where="self", trace=trace))[0] == 0
        with open(trace) as f:
            points = len(f.readlines())
        for n in range(1, points + 1):
            for after in (False, True):
                tid, art = _destroy_subject(crash_store, tmp_path, "e%d-%d-%d" % (pending, n, after), pending)
                status, _ = fork_call("Task.destroy", {"dbg": "d", "id": tid},
                                      hook=lambda pid, n=n, after=after: CrashAt(n, after=after, where="self"))
                exact += 1
                with failures.trial():
                    assert status == -signal.SIGKILL, "the caller was not killed at write %d (status %r)" % (n, status)
                    assert task_file_problems(state_dir) == []
                    _check_destroyed_or_whole(state_dir, tid, art, pending, stats)
                orphan_files += len(_orphans(state_dir, tid))
    with failures.trial():
        _ls_clean(state_dir, real=True)
    stats.pop("_n", None)
    report("destroy caller kills", random_trials=trials, callers_killed=killed, exact_trials=exact,
           faults_injected=killed + exact, outcomes=stats, orphan_files_after_destroy=orphan_files,
           caller_median_s=round(median, 3), failures=failures)


@pytest.mark.parametrize("where", ["worker-write", "destroy-early", "destroy-committed"])
def test_crash_then_destroy_leaves_no_trace(crash_store, state_dir, tmp_path, where):
    """Promise (README, Task.destroy): destroying a task removes every
    trace of it, also after a crash. Here: a worker killed just after it
    created its temporary file (the task is then reconciled and
    destroyed), or a destroy killed before or just after its commit point
    (renaming the task file away). After the next Task.ls, nothing named
    after the task may remain in the state directory."""
    if where == "worker-write":
        out = str(tmp_path / "out")
        # Just after creating the temporary file of its 2nd record (declare_artifact).
        store_os(OSProxy(CrashAt(2, after=True, name="open")))
        try:
            tid = worker.start("leak", write_steps, {"path": out, "steps": 2, "delay": 0.01}, store=crash_store)
        finally:
            store_os(REAL_OS)
        _wait_worker_end(crash_store.get(tid).worker)
        assert run_bin("Task.stat", {"dbg": "d", "id": tid}).json["state"][0] == "Failed"
        assert run_bin("Task.destroy", {"dbg": "d", "id": tid}).returncode == 0
    else:
        tid, _ = _destroy_subject(crash_store, tmp_path, "leak", pending=False)
        # destroy-early: killed after its first unlink (the log), before the
        # commit point, so the task still exists and a second destroy ends it.
        # destroy-committed: killed right after renaming the task file away.
        point = "unlink" if where == "destroy-early" else "rename"
        status, _ = fork_call("Task.destroy", {"dbg": "d", "id": tid},
                              hook=lambda pid: CrashAt(1, after=True, where="self", name=point))
        assert status == -signal.SIGKILL
        if where == "destroy-early":
            assert run_bin("Task.stat", {"dbg": "d", "id": tid}).json["id"] == tid
            assert run_bin("Task.destroy", {"dbg": "d", "id": tid}).returncode == 0
    assert run_bin("Task.stat", {"dbg": "d", "id": tid}).error_name == "Task_does_not_exist"
    assert run_bin("Task.ls", {"dbg": "d"}).returncode == 0
    left = [os.path.relpath(p, str(state_dir)) for p in _orphans(state_dir, tid)]
    report("crash then destroy (%s)" % where, trials=1, faults_injected=1, files_left=left, failures=int(bool(left)))
    assert left == [], "destroyed task %s left %s behind" % (tid, left)


def _stopped_copy(src, target):
    """Start a real Data.copy of ``src`` to a new file ``target`` and
    SIGSTOP its worker while the task is still Pending; returns (task id,
    worker identity), or None if the copy finished first."""
    res = run_bin("Data.copy", {"dbg": "d", "uri": src, "domain": "0", "remote": "file://" + target, "blocklist": None})
    assert res.returncode == 0, res.stdout
    task_id = res.json[1]
    with Store() as s:
        ident = s.get(task_id).worker
        os.kill(ident["pid"], signal.SIGSTOP)
        if s.get(task_id).state.terminal:
            os.kill(ident["pid"], signal.SIGCONT)
            return None
    return task_id, ident


def test_dead_copy_worker_never_removes_a_file_put_at_its_target(crash_store, tmp_path):
    """Promise (issue 12, item 1): a copy worker killed mid-copy while
    another process put its own file at the target name: the next
    Task.stat fails the task, removes the copy's own temporary file and
    leaves the other file alone (it was never the task's to remove)."""
    src = tmp_path / "src"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "d"
    out.mkdir()
    trials = env_int("RELIABILITY_FOREIGN_TRIALS", 5)
    done = lost = unrecorded = 0
    for n in range(trials):
        target = str(out / ("img%d" % n))
        started = _stopped_copy(str(src), target)
        if started is None:
            continue
        task_id, ident = started
        with open(target + ".w", "w") as f:
            f.write("precious\n")
        os.rename(target + ".w", target)
        os.killpg(ident["pgid"], signal.SIGKILL)  # stopped, so still ours
        assert identity.wait_gone(ident, 10)
        res = run_bin("Task.stat", {"dbg": "d", "id": task_id})
        assert res.json["state"][0] == "Failed", res.json
        with open(target) as f:
            lost += f.read() != "precious\n"
        for name in os.listdir(out):
            if name.endswith(".part"):  # stopped before it recorded creating it: not provably ours
                assert _left_unrecorded(os.environ["TASK_STATE_DIR"], task_id, str(out / name)), "temporary %s left" % name
                unrecorded += 1
                os.unlink(out / name)
        done += 1
    report("foreign file at the target name", trials=done, faults_injected=done, foreign_files_lost=lost,
           temporaries_left_unrecorded=unrecorded, failures=lost)
    assert done > 0, "every copy finished before its worker could be stopped"
    assert lost == 0
