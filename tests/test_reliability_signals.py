"""Signal safety: Task.cancel (and the SIGKILL escalation of a later
Task.stat) only ever signals the task's own worker. Forged or stale worker
identities (pid reuse, another boot, another user's process, the caller,
the test runner's group, init, tampered types) must never reach a real
bystander process, each of which runs in its own session and is checked
afterwards with ``os.kill(pid, 0)`` and ``/proc/PID/stat``.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BIN, SRC, run_bin
from faults import Bystander, Failures, report
from xapi_storage_tasks.tasks import lifecycle, marks
from xapi_storage_tasks.process import identity

pytestmark = pytest.mark.reliability

OTHER_BOOT = "00000000-0000-0000-0000-000000000000"
NOBODY = 65534


@pytest.fixture
def guarded(monkeypatch):
    """Record any SIGTERM that reaches the test runner instead of dying."""
    received = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, old)


def _forge(store, ident):
    task = store.create("forged")
    store.annotate(task.id, lambda t: setattr(t, "worker", ident))
    return task.id


def _run_all(method, task_ids):
    """Run ``bin/method`` for every id at once (some calls stall 2 s)."""
    procs = [subprocess.Popen([os.path.join(BIN, method), "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) for _ in task_ids]
    for p, tid in zip(procs, task_ids):
        p.stdin.write(json.dumps({"dbg": "sig", "id": tid}).encode())
        p.stdin.close()
    out = []
    for p in procs:
        data = p.stdout.read()
        out.append((p.wait(timeout=60), data))
    return out


def test_cancel_never_signals_a_non_worker(store, state_dir, monkeypatch, guarded):
    """Promise: for every forged worker identity (pid reused = wrong start
    time; previous boot; another user's process with a wrong start time,
    or its right start time but a wrong boot id; a process that does not
    lead its group; the test runner's group; the test runner itself; init;
    tampered types and values), Task.cancel and the Task.stat after it
    (grace 0, so the SIGKILL escalation path runs) answer normally and
    never signal anyone: every bystander keeps running, the test runner
    gets no SIGTERM."""
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0")
    root_sleeper = Bystander()
    nobody_sleeper = Bystander(uid=NOBODY)
    group = Bystander(argv=("sh", "-c", "sleep 60 & wait"))  # a group with a member that is not its leader
    bystanders = [root_sleeper, nobody_sleeper, group]
    try:
        deadline = time.monotonic() + 5
        member = None
        while member is None and time.monotonic() < deadline:
            kids = open("/proc/%d/task/%d/children" % (group.pid, group.pid)).read().split()
            member = int(kids[0]) if kids else None
            time.sleep(0.01)
        assert member is not None
        member_ident = identity.identity(member)
        assert member_ident["pgid"] == group.pid != member
        r, n = root_sleeper.identity, nobody_sleeper.identity
        assert r["pid"] == r["pgid"] and n["pid"] == n["pgid"]
        with open("/proc/%d/status" % n["pid"]) as f:
            assert "Uid:\t%d" % NOBODY in f.read()
        runner_group = identity.identity(os.getpgrp())
        forged = {
            # The exact identity of a live bystander (issue 12, item 2):
            # only the kernel's word that it holds the task's mark counts.
            "exact bystander identity": r,
            "exact bystander identity, claiming its fd 0": dict(r, fd=0),
            "exact identity of another user's process": n,
            "exact group leader identity": group.identity,
            "pid reused (start+1)": dict(r, start=r["start"] + 1),
            "pid reused (start-1)": dict(r, start=r["start"] - 1),
            "previous boot": dict(r, boot_id=OTHER_BOOT),
            "other user, wrong start": dict(n, start=n["start"] + 7),
            "other user, right start, wrong boot": dict(n, boot_id=OTHER_BOOT),
            "not a group leader": member_ident,
            "bystander in the runner's group id": dict(r, pgid=os.getpgrp()),
            "test runner itself": identity.identity(),
            "init": dict(identity.identity(1), pgid=1),
            "pid 1 with its own start": {"pid": 1, "start": identity.identity(1)["start"], "pgid": 1,
                                         "boot_id": identity.boot_id()},
            "pid -1 (everyone)": dict(r, pid=-1, pgid=-1),
            "pid 0 (own group)": dict(r, pid=0, pgid=0),
            "pid as a string": dict(r, pid=str(r["pid"]), pgid=str(r["pgid"])),
            "start as a float": dict(r, start=float(r["start"])),
            "pgid as a bool": dict(r, pgid=True),
            "missing start": {"pid": r["pid"], "pgid": r["pgid"], "boot_id": r["boot_id"]},
            "boot id not a string": dict(r, boot_id=1),
            "huge pid": dict(r, pid=2 ** 62, pgid=2 ** 62),
            "empty": {},
        }
        if runner_group is not None:
            forged["test runner's group leader"] = runner_group
        names = sorted(forged)
        task_ids = [_forge(store, forged[name]) for name in names]
        task_marks = [marks.file_id(store, tid) for tid in task_ids]
        assert None not in task_marks
        t0 = time.monotonic()
        cancels = _run_all("Task.cancel", task_ids)
        stats = _run_all("Task.stat", task_ids)
        elapsed = time.monotonic() - t0
        states, failures = {}, Failures()
        for name, (c_code, c_out), (s_code, s_out) in zip(names, cancels, stats):
            with failures.trial():
                assert (c_code, c_out) == (0, b"null\n"), (name, c_code, c_out)
                assert s_code == 0, (name, s_out)
                states[name] = json.loads(s_out)["state"][0]
        exact = [name for name in names if name.startswith("exact")]
        with failures.trial():
            assert {states.get(name) for name in exact} == {"Failed"}, states  # not workers: lost, never signalled
        # A worker field that is not even an object makes the file unreadable:
        # cancel reports it and signals nobody.
        bad = store.create("tampered")
        path = os.path.join(str(state_dir), "tasks", bad.id + ".json")
        with open(path) as f:
            record = json.load(f)
        record["worker"] = [r["pid"], r["start"]]
        with open(path, "w") as f:
            json.dump(record, f)
        with failures.trial():
            assert run_bin("Task.cancel", {"dbg": "d", "id": bad.id}).error_name == "Task_corrupt"
        # The same identities straight at the signalling function.
        direct, raised = [], {}
        for name, mark in zip(names, task_marks):
            try:
                direct.append(identity.signal_worker(forged[name], signal.SIGTERM, mark))
            except Exception as e:  # no signal was sent; see test_signal_worker_on_out_of_range_pid
                direct.append(False)
                raised[name] = type(e).__name__
        time.sleep(0.2)  # let any stray signal land
        signalled = [b.pid for b in bystanders if not (b.alive() and b.state() in ("S", "R", "D"))]
        signalled += [] if identity.matches(member_ident) else [member]
        with failures.trial():
            assert signalled == [], "bystanders signalled: %s" % signalled
        with failures.trial():
            assert guarded == [], "the test runner got SIGTERM"
        with failures.trial():
            assert direct == [False] * len(names), dict(zip(names, direct))
        stuck = sorted(name for name, s in states.items() if s == "Pending")
        report("forged identities", identities_tried=len(names) + 1, cancel_calls=len(names) + 1, stat_calls=len(names),
               direct_signal_calls=len(names), direct_calls_that_raised=raised,
               bystanders=len(bystanders) + 1, bystanders_signalled=len(signalled),
               seconds=round(elapsed, 1), left_pending=stuck, failures=failures)
    finally:
        for b in bystanders:
            b.stop()


def test_cancel_from_a_caller_whose_own_identity_is_the_worker(store, state_dir, tmp_path):
    """Promise: a task file naming the Task.cancel caller itself (its pid,
    start time, and, as it runs in its own session, its own group) never
    makes the caller signal itself: the caller records its identity and
    execs the real bin/Task.cancel (same pid, same start time)."""
    task = store.create("self")
    script = (
        "import json, os, sys\n"
        "sys.path.insert(0, %r)\n"
        "from xapi_storage_tasks.process import identity\n"
        "from xapi_storage_tasks.tasks.store import Store\n"
        "with Store() as s:\n"
        "    s.annotate(%r, lambda t: setattr(t, 'worker', identity.identity()))\n"
        "os.execv(%r, [%r, '--json'])\n"
    ) % (SRC, task.id, os.path.join(BIN, "Task.cancel"), os.path.join(BIN, "Task.cancel"))
    p = subprocess.run([sys.executable, "-c", script], input=json.dumps({"dbg": "d", "id": task.id}).encode(),
                       capture_output=True, timeout=30, start_new_session=True)
    ident = store.get(task.id).worker
    report("caller's own identity", trials=1, faults_injected=1, exit=p.returncode, failures=int(p.returncode != 0))
    assert ident["pid"] == ident["pgid"] and not identity.matches(ident)  # it was the caller, now gone
    assert (p.returncode, p.stdout) == (0, b"null\n"), (p.returncode, p.stdout, p.stderr)


def test_in_process_cancel_of_own_identity(store, guarded):
    """Promise: lifecycle.request_cancel in a process whose own identity is
    recorded as the worker never signals that process (its own pid)."""
    task = store.create("own")
    store.annotate(task.id, lambda t: setattr(t, "worker", identity.identity()))
    lifecycle.request_cancel(store, task.id)
    time.sleep(0.1)
    report("own pid in-process", trials=1, faults_injected=1, sigterm_received=len(guarded), failures=len(guarded))
    assert guarded == []


def test_unsignallable_identity_does_not_keep_a_task_pending(store, monkeypatch):
    """Promise: a task whose recorded worker can never be signalled (the
    identity names a live process that is not a group leader of its own,
    here a bystander recorded with the test runner's group id) is not
    treated as a running worker: after a cancel and the grace period, a
    Task.stat answers promptly (not after a 2 s SIGKILL wait that cannot
    succeed, on every call) and the task is not left Pending forever."""
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0")
    sleeper = Bystander()
    try:
        tid = _forge(store, dict(sleeper.identity, pgid=os.getpgrp()))
        assert run_bin("Task.cancel", {"dbg": "d", "id": tid}).returncode == 0
        timings, states = [], []
        for _ in range(2):
            t0 = time.monotonic()
            res = run_bin("Task.stat", {"dbg": "d", "id": tid})
            timings.append(round(time.monotonic() - t0, 2))
            states.append(res.json["state"][0])
        assert sleeper.alive()
        report("unsignallable identity", trials=2, faults_injected=1, stat_seconds=timings, states=states,
               failures=int(states[-1] == "Pending" or max(timings) > 1.5))
        assert states[-1] != "Pending" and max(timings) < 1.5, \
            "Task.stat took %s s and the task is %s" % (timings, states[-1])
    finally:
        sleeper.stop()


def test_signal_worker_on_out_of_range_pid():
    """Promise: identity.signal_worker returns False for an identity it will
    not signal (tampered task file: a pid beyond the kernel's range), it
    does not raise."""
    ident = {"pid": 2 ** 62, "start": 1, "pgid": 2 ** 62, "boot_id": identity.boot_id()}
    try:
        outcome = identity.signal_worker(ident, signal.SIGTERM, None)
    except Exception as e:
        outcome = "%s: %s" % (type(e).__name__, e)
    report("out-of-range pid", trials=1, faults_injected=1, outcome=outcome, failures=int(outcome is not False))
    assert outcome is False
