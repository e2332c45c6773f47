"""Disk full and I/O errors: every store write that fails (ENOSPC, EIO) at
any of its system calls leaves the previous state whole and is reported as
a clear error; a really full file system (a 64 KiB tmpfs) never corrupts a
task and the executables answer with the error record.

Faults are injected through the store module's own ``os`` reference
(``faults.store_os``), so nothing else in the process is affected.
"""

import errno
import fcntl
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import run_bin
from faults import (
    Counter,
    FailAt,
    Failures,
    OSProxy,
    dead_identity,
    fork_call,
    kill_live_workers,
    leftovers,
    names_errno,
    report,
    snapshot,
    stand_in_worker,
    store_os,
    task_file_problems,
)
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks import marks, worker
from xapi_storage_tasks.wire.errors import InternalError
from xapi_storage_tasks.tasks.state import Completed, Pending
from xapi_storage_tasks.tasks.store import Store

pytestmark = pytest.mark.reliability

ERRNOS = (errno.ENOSPC, errno.EIO)


def _make(store, kind):
    """A subject task for one operation, and the operation itself."""
    if kind == "create":
        return None, lambda: store.create("new")
    task = store.create(kind)
    store.transition(task.id, lambda t: Pending(0.2))
    if kind == "progress":
        return task.id, lambda: store.transition(task.id, lambda t: Pending(0.5))
    if kind == "complete":
        return task.id, lambda: store.transition(task.id, lambda t: Completed(1.0))
    if kind == "annotate":
        return task.id, lambda: store.annotate(task.id, lambda t: t.artifacts.append("/nonexistent/x"))
    if kind == "destroy":
        store.transition(task.id, lambda t: Completed(1.0))
        return task.id, lambda: store.destroy(task.id)
    raise ValueError(kind)


def _plan(store, kind):
    """The mutating system calls ``kind`` makes, by name, in order."""
    _make(store, kind)  # warm up (subdirectories exist)
    _, op = _make(store, kind)
    counter = Counter()
    store_os(OSProxy(counter))
    try:
        op()
    finally:
        store_os(os)
    return counter.calls


def _points(calls):
    """``(name, n)`` for every call: the n-th call of that name."""
    seen, out = {}, []
    for name in calls:
        seen[name] = seen.get(name, 0) + 1
        out.append((name, seen[name]))
    return out


def _inject(store, state_dir, kind, name, n, err):
    """Run ``kind`` with the n-th ``name`` call failing with ``err``.
    Returns (exception or None, files before, files after, subject id)."""
    task_id, op = _make(store, kind)
    before = snapshot(state_dir)
    ids_before = store.ids()
    hook = FailAt(name, n, err)
    store_os(OSProxy(hook))
    raised = None
    try:
        op()
    except BaseException as e:  # noqa: B902 - we classify it below
        raised = e
    finally:
        store_os(os)
    assert hook.fired, "no %s #%d in %s" % (name, n, kind)
    return raised, before, snapshot(state_dir), task_id, ids_before


def _retry(store, kind, task_id):
    if kind == "create":
        store.create("again")
    elif kind == "progress":
        assert store.transition(task_id, lambda t: Pending(0.5)).state == Pending(0.5)
    elif kind == "complete":
        assert store.transition(task_id, lambda t: Completed(1.0)).state == Completed(1.0)
    elif kind == "annotate":
        assert store.annotate(task_id, lambda t: t.artifacts.append("/x")).artifacts == ["/x"]


def test_write_faults_leave_previous_state_intact(store, state_dir):
    """Promise: when any system call of a task write fails before the new
    file is renamed into place (creating the temporary file, writing it,
    fsyncing it, linking it, renaming it) with ENOSPC or EIO, the call raises
    xapi_storage_tasks.wire.errors.InternalError naming the error, the task's file keeps its
    previous bytes, no temporary file is left, a failed create leaves no
    trace at all, and the same call succeeds once the fault is gone."""
    trials = 0
    failures = Failures()
    for kind in ("create", "progress", "complete", "annotate"):
        calls = _plan(store, kind)
        rename_at = len(calls) - 1 - calls[::-1].index("rename")
        write_start = rename_at - calls[rename_at::-1].index("open")  # the temporary file's open
        # Every step of the write must be there to fail, or the loop proves less.
        assert {"open", "write", "fsync", "rename"} <= set(calls[write_start:rename_at + 1]), (kind, calls)
        for name, n in _points(calls)[write_start:rename_at + 1]:
            if name not in ("open", "write", "fsync", "link", "rename"):
                continue
            for err in ERRNOS:
                raised, before, after, task_id, ids_before = _inject(store, state_dir, kind, name, n, err)
                trials += 1
                with failures.trial():
                    where = "%s: %s #%d %s" % (kind, name, n, errno.errorcode[err])
                    assert isinstance(raised, InternalError), "%s raised %r" % (where, raised)
                    assert names_errno(str(raised), err), "%s: %s" % (where, raised)
                    assert after == before, "%s changed the store" % where
                    assert leftovers(state_dir, "tmp") == []
                    assert store.ids() == ids_before
                    _retry(store, kind, task_id)  # the fault is gone: the same call works
    with failures.trial():
        assert task_file_problems(state_dir) == []
    report("write faults before rename", trials=trials, faults_injected=trials, failures=failures)


def test_every_store_io_error_is_an_internal_error(store, state_dir):
    """Promise: every failing system call of a store write (including the
    directory fsync after the rename, the lock and mark files of create,
    and destroy's unlinks and fsync) raises xapi_storage_tasks.wire.errors.InternalError
    naming the error, and every task file stays whole (old or new). The one
    exceptions are by design: what follows a durable Completed write
    (indexing it for retention, dropping its Pending mark) and the last
    step of a destroy (dropping that index entry) are best effort, and the
    call succeeds."""
    trials, wrong = 0, []
    for kind in ("create", "progress", "complete", "annotate", "destroy"):
        calls = _plan(store, kind)
        rename_at = len(calls) - 1 - calls[::-1].index("rename") if "rename" in calls else len(calls)
        for i, (name, n) in enumerate(_points(calls)):
            if name not in ("open", "write", "fsync", "rename", "unlink"):
                continue
            for err in (errno.EIO,) if name == "unlink" else ERRNOS:  # unlink never says ENOSPC
                raised, before, after, task_id, _ = _inject(store, state_dir, kind, name, n, err)
                trials += 1
                where = "%s: %s #%d (%s)" % (kind, name, n, errno.errorcode[err])
                if kind == "complete" and i > rename_at + 1:
                    # After the task is durably Completed (rename, directory
                    # fsync), its retention entry and dropping its Pending
                    # mark are best effort: the call succeeded.
                    if raised is not None or not store.get(task_id).state.terminal:
                        wrong.append("%s raised %r after a durable completion" % (where, raised))
                    continue
                if kind == "destroy" and name == "unlink" and n == calls.count("unlink"):
                    # Its last step, dropping the retention entry, is best
                    # effort too: a stale entry is dropped by a later sweep.
                    if raised is not None:
                        wrong.append("%s raised %r after the task was gone" % (where, raised))
                    continue
                if not (isinstance(raised, InternalError) and names_errno(str(raised), err)):
                    wrong.append("%s raised %s" % (where, type(raised).__name__ if raised else "nothing"))
                assert task_file_problems(state_dir) == []
    report("every store I/O error", trials=trials, faults_injected=trials, not_internal_error=len(wrong),
           failures=len(wrong))
    for line in wrong:
        print("  " + line)
    assert wrong == [], "%d of %d failing system calls escape the store as something else than InternalError" % (
        len(wrong), trials)


def _valid_error_record(record):
    return (
        set(record) == {"code", "params", "backtrace"}
        and isinstance(record["code"], str)
        and isinstance(record["params"], list) and record["params"] and all(isinstance(p, str) for p in record["params"])
        and set(record["backtrace"]) == {"error", "files", "lines"}
        and isinstance(record["backtrace"]["error"], str)
        and all(isinstance(f, str) for f in record["backtrace"]["files"])
        and all(type(n) is int for n in record["backtrace"]["lines"])
        and len(record["backtrace"]["files"]) == len(record["backtrace"]["lines"])
    )


def test_executables_answer_write_faults_with_the_error_record(store, state_dir, monkeypatch):
    """Promise: a Task.cancel / Task.stat (reconciling a lost worker) whose
    store write fails with ENOSPC or EIO answers exit 1 with a valid
    Internal_error record naming the error, and leaves every task file as
    it was; Task.ls still lists every task (exit 0) and changes nothing."""
    monkeypatch.setenv("TASK_CANCEL_GRACE", "60")
    sleepers = []
    trials = 0
    failures = Failures()
    try:
        for method in ("Task.cancel", "Task.stat", "Task.ls"):
            for name in ("open", "write", "fsync", "rename"):
                for err in ERRNOS:
                    task = store.create("exe-fault")
                    # Task.cancel: a live "worker" (a sleeper holding the task's mark,
                    # never signalled: the write fails first); Task.stat/ls: a dead
                    # worker to reconcile.
                    if method == "Task.cancel":
                        sleeper, ident = stand_in_worker(state_dir, task.id)
                        sleepers.append(sleeper)
                    else:
                        ident = dead_identity()
                    store.annotate(task.id, lambda t, ident=ident: setattr(t, "worker", ident))
                    before = snapshot(state_dir)
                    params = {"dbg": "d"} if method == "Task.ls" else {"dbg": "d", "id": task.id}
                    status, out = fork_call(method, params, hook=lambda pid, name=name, err=err: FailAt(name, 1, err))
                    trials += 1
                    with failures.trial():
                        record = json.loads(out)
                        where = "%s with %s failing (%s)" % (method, name, errno.errorcode[err])
                        if method == "Task.cancel" and name in ("write", "rename"):
                            # A cancel writes no task file: it records its request
                            # in an empty file (open, fsync) and signals the worker.
                            assert (status, out) == (0, b"null\n"), (where, out)
                            assert store.cancel_time(task.id) is not None, where
                            assert sleeper.popen.wait(10) == -15, where
                            store.transition(task.id, lambda t: Completed(0.0))
                            continue
                        if method == "Task.ls":
                            # ls still lists what exists; the task stays as it was
                            # for a later call to reconcile.
                            assert status == 0 and task.id in record, (where, out)
                            assert snapshot(state_dir) == before, where
                            store.transition(task.id, lambda t: Completed(0.0))
                            continue
                        assert status == 1, (where, out)
                        assert _valid_error_record(record), (where, record)
                        assert record["params"][0] == "Internal_error" and names_errno(record["params"][1], err), (where, record)
                        assert snapshot(state_dir) == before, where
                        assert method != "Task.cancel" or sleeper.alive()
                        store.transition(task.id, lambda t: Completed(0.0))  # out of the way of the next Task.ls
    finally:
        for sleeper in sleepers:
            sleeper.stop()
    report("executables under write faults", trials=trials, faults_injected=trials, failures=failures)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (we are root); unmounted at teardown."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % res.stderr.decode().strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path):
    """Fill the file system holding ``path``; returns the filler's path."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        for size in (512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_real_enospc_on_a_full_tmpfs(tiny_fs, tmp_path, monkeypatch):
    """Promise: on a really full file system the executables still answer
    (reads work; calls that must write answer exit 1 with an error record
    naming ENOSPC), no existing task file changes or breaks, a worker whose
    progress writes fail does not leave a corrupt task, a failed start
    leaves no trace, and everything works again once space is freed."""
    state = tiny_fs / "state"
    monkeypatch.setenv("TASK_STATE_DIR", str(state))
    monkeypatch.setenv("TASK_SYSLOG", "0")
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0.3")
    from ops import write_steps

    sleeper = None
    answers = {}
    failures, running_state = Failures(), None
    try:
        with failures.trial():
            with Store(str(state)) as store:
                done = store.create("done")
                store.transition(done.id, lambda t: Completed(1.0))
                live = store.create("live")  # its "worker" is the sleeper: Pending while it lives
                sleeper, live_ident = stand_in_worker(state, live.id)
                store.annotate(live.id, lambda t: setattr(t, "worker", live_ident))
                lost = store.create("lost")  # its worker is gone: the next call must write
                lost_ident = dead_identity()
                store.annotate(lost.id, lambda t: setattr(t, "worker", lost_ident))
                out = tmp_path / "worker.out"  # the output is elsewhere: only store writes fail
                running = worker.start("running", write_steps, {"path": str(out), "steps": 300, "delay": 0.01}, store=store)
                running_ident = store.get(running).worker
                deadline = time.monotonic() + 10
                while str(out) not in store.get(running).created:  # its output exists and is recorded
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                # Stopped while the other calls run: its retried writes would
                # free and take pages, and the disk would not stay full.
                os.kill(running_ident["pid"], signal.SIGSTOP)
                filler = _fill(str(tiny_fs))
                before = snapshot(state, dirs=("tasks",))

                def call(method, task_id=None):
                    params = {"dbg": "d"} if task_id is None else {"dbg": "d", "id": task_id}
                    res = run_bin(method, params)
                    answers.setdefault(method, []).append(res.returncode)
                    if res.returncode == 1:
                        assert _valid_error_record(res.json), res.stdout
                    return res

                assert call("Task.stat", done.id).json["state"][0] == "Completed"
                assert call("Task.stat", live.id).json["state"] == ["Pending", 0.0]
                res = call("Task.stat", lost.id)
                assert res.returncode == 1 and res.json["params"][0] == "Internal_error"
                assert names_errno(res.json["params"][1], errno.ENOSPC), res.json
                assert call("Task.destroy", live.id).error_name == "Task_in_progress"
                res = call("Task.ls")  # still lists every task on a full disk
                assert res.returncode == 0 and set(res.json) >= {done.id, live.id, lost.id}, res.stdout
                with pytest.raises(InternalError) as failed:
                    worker.start("no-room", write_steps, {"path": str(tmp_path / "x"), "steps": 1, "delay": 0}, store=store)
                assert names_errno(str(failed.value), errno.ENOSPC)
                after = snapshot(state, dirs=("tasks",))
                # The running worker may have had a write land before the disk
                # filled up; every other task file is byte for byte the same.
                changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
                assert changed <= {"tasks/%s.json" % running}, changed
                assert task_file_problems(state) == []
                assert leftovers(state, "tmp") == []
                assert sorted(leftovers(state, "tasks")) == sorted("%s.json" % i for i in (done.id, live.id, lost.id, running))
                os.kill(running_ident["pid"], signal.SIGCONT)
                time.sleep(0.5)  # the worker's progress writes now fail
                assert task_file_problems(state) == []
                # Progress is advisory: the worker keeps copying, and records its
                # end in the space it set aside, while the disk is still full.
                assert identity.wait_gone(running_ident, 30), "the worker did not finish"
                final = store.get(running)
                assert isinstance(final.state, Completed), final.state
                assert out.read_text().count("step") == 300
                # A cancel needs no room in the task file: it is recorded, and
                # the (stand-in) worker gets its SIGTERM.
                res = call("Task.cancel", live.id)
                assert res.returncode == 0, res.stdout
                assert store.cancel_time(live.id) is not None
                assert sleeper.popen.wait(10) == -15

                os.unlink(filler)  # space again
                assert call("Task.stat", lost.id).json["state"][0] == "Failed"
                deadline = time.monotonic() + 20
                while call("Task.stat", running).json["state"][0] == "Pending" and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert call("Task.stat", live.id).json["state"] == ["Failed", "Cancelled"]
                assert call("Task.destroy", done.id).returncode == 0
                assert call("Task.ls").returncode == 0
                assert task_file_problems(state) == []
                running_state = final.state
    finally:
        if sleeper is not None:
            sleeper.stop()
        kill_live_workers(state)
    report("real ENOSPC (64 KiB tmpfs)", calls=sum(len(v) for v in answers.values()),
           exit_codes={k: v for k, v in answers.items()}, worker_running_when_full=repr(running_state), failures=failures)


def test_task_ls_still_lists_when_the_disk_is_full(tiny_fs, monkeypatch):
    """Promise: Task.ls lists every task id (README); reconciling Pending
    tasks is a side job that it skips for a task it cannot fix (as it
    already does for an unreadable one). On a full disk with one Pending
    task whose worker is gone, Task.ls must still answer the listing."""
    state = tiny_fs / "state"
    monkeypatch.setenv("TASK_STATE_DIR", str(state))
    monkeypatch.setenv("TASK_SYSLOG", "0")
    with Store(str(state)) as store:
        done = store.create("done")
        store.transition(done.id, lambda t: Completed(1.0))
        lost = store.create("lost")
        ident = dead_identity()
        store.annotate(lost.id, lambda t: setattr(t, "worker", ident))
    filler = _fill(str(tiny_fs))
    res = run_bin("Task.ls", {"dbg": "d"})
    report("Task.ls on a full disk", trials=1, faults_injected=1, exit=res.returncode,
           answer=res.stdout.decode()[:160], failures=int(res.returncode != 0))
    assert res.returncode == 0 and res.json == [done.id, lost.id], res.stdout
    os.unlink(filler)


def _lock_held(path):
    """True when some process holds an flock on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _hold_lock(path):
    """``flock PATH sleep 60`` in its own session."""
    return subprocess.Popen(["flock", path, "sleep", "60"], start_new_session=True, stdin=subprocess.DEVNULL)


def _wait_held(path, p):
    deadline = time.monotonic() + 10
    while not _lock_held(path):
        assert p.poll() is None and time.monotonic() < deadline, "the lock holder did not take the lock"
        time.sleep(0.01)


def test_cancel_and_destroy_return_while_another_process_holds_the_lock(store, state_dir, tmp_path, monkeypatch):
    """Promise (issue 12, item 3): with a task's lock held by another
    process (``flock locks/<id> sleep 60``), Task.cancel still returns,
    records the request and signals the worker; Task.stat answers; a
    destroy answers Task_busy (retryable) instead of waiting; once the
    holder is gone the cancel completes and the destroy works."""
    from ops import write_steps

    monkeypatch.setenv("TASK_LOCK_WAIT", "0.2")
    out = tmp_path / "out"
    tid = worker.start("held", write_steps, {"path": str(out), "steps": 2000, "delay": 0.01}, store=store)
    ident = store.get(tid).worker
    done = store.create("done")
    store.transition(done.id, lambda t: Completed(0.1))
    holders = []
    failures = Failures()
    try:
        with failures.trial():
            for task_id in (tid, done.id):
                lock = os.path.join(str(state_dir), "locks", task_id)
                holders.append(_hold_lock(lock))
                _wait_held(lock, holders[-1])
            res = run_bin("Task.cancel", {"dbg": "d", "id": tid}, timeout=30)
            assert (res.returncode, res.json) == (0, None), res.stdout
            assert store.cancel_time(tid) is not None
            res = run_bin("Task.stat", {"dbg": "d", "id": tid}, timeout=30)
            assert res.returncode == 0 and res.json["state"][0] == "Pending", res.stdout
            res = run_bin("Task.destroy", {"dbg": "d", "id": done.id}, timeout=30)
            assert res.error_name == "Task_busy", res.stdout
            assert store.get(done.id).state == Completed(0.1)
            # The worker got its SIGTERM and waits for the lock to record its end.
            for h in holders:
                os.killpg(h.pid, signal.SIGKILL)
                h.wait()
            assert identity.wait_gone(ident, 30)
            assert run_bin("Task.stat", {"dbg": "d", "id": tid}).json["state"] == ["Failed", "Cancelled"]
            assert not out.exists()
            assert run_bin("Task.destroy", {"dbg": "d", "id": done.id}).returncode == 0
    finally:
        for h in holders:
            if h.poll() is None:
                os.killpg(h.pid, signal.SIGKILL)
                h.wait()
    report("lock held by another process", trials=1, faults_injected=2, failures=failures)


def test_cancel_of_a_worker_stopped_while_holding_the_lock(store, state_dir, monkeypatch):
    """Promise (issue 12, item 3): a worker stopped inside a store write
    (here a stand-in holding both the task's mark and its lock, as a
    SIGSTOPped worker would) does not block Task.cancel, and the grace
    timer runs: after the grace the worker is SIGKILLed and the task ends
    Failed Cancelled."""
    monkeypatch.setenv("TASK_LOCK_WAIT", "0.2")
    monkeypatch.setenv("TASK_CANCEL_GRACE", "0.5")
    task = store.create("stopped-writer")
    mark = os.path.join(str(state_dir), "pending", task.id)
    lock = os.path.join(str(state_dir), "locks", task.id)
    p = subprocess.Popen(["sh", "-c", 'read go; exec flock "$1" sleep 60 7<"$0"', mark, lock],
                         start_new_session=True, stdin=subprocess.PIPE)
    failures = Failures()
    try:
        with failures.trial():
            deadline = time.monotonic() + 10
            while identity.identity(p.pid) is None or open("/proc/%d/comm" % p.pid).read().strip() != "sh":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            ident = dict(identity.identity(p.pid), fd=7)
            store.annotate(task.id, lambda t: setattr(t, "worker", ident))
            p.stdin.write(b"go\n")
            p.stdin.flush()
            _wait_held(lock, p)
            os.kill(p.pid, signal.SIGSTOP)
            assert identity.matches(ident) and identity.holds(ident, marks.file_id(store, task.id))
            res = run_bin("Task.cancel", {"dbg": "d", "id": task.id}, timeout=30)
            assert (res.returncode, res.json) == (0, None), res.stdout
            assert p.wait(30) == -signal.SIGKILL  # by the watchdog, without the lock
            deadline = time.monotonic() + 20
            while (state := run_bin("Task.stat", {"dbg": "d", "id": task.id}).json["state"])[0] == "Pending":
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
            assert state == ["Failed", "Cancelled"]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    report("stopped lock holder", trials=1, faults_injected=1, failures=failures)


def _damage(state_dir, task_id, kind, victim):
    """Put ``kind`` of damage at ``locks/<id>``."""
    lock = os.path.join(str(state_dir), "locks", task_id)
    os.unlink(lock)
    if kind == "symlink to a file":
        os.symlink(victim, lock)
    elif kind == "symlink loop":
        os.symlink(lock, lock)
    elif kind == "dangling symlink":
        os.symlink(victim + ".nowhere", lock)
    elif kind == "directory":
        os.mkdir(lock)
        open(os.path.join(lock, "inside"), "w").close()
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "missing":
        pass


DAMAGE = ("symlink to a file", "symlink loop", "dangling symlink", "directory", "fifo", "missing")


def test_destroy_works_on_a_task_with_a_damaged_lock(store, state_dir, tmp_path):
    """Promise (issue 12, item 6): whatever sits at ``locks/<id>`` (a
    symlink, a loop, a directory, a FIFO, nothing), Task.destroy removes a
    finished task, Task.stat reconciles a lost one, and nothing outside the
    store is touched (the symlink's target keeps its content)."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    trials = 0
    failures = Failures()
    for kind in DAMAGE:
        done = store.create("damaged-" + kind)
        store.transition(done.id, lambda t: Completed(0.1))
        _damage(state_dir, done.id, kind, str(victim))
        with failures.trial():
            res = run_bin("Task.destroy", {"dbg": "d", "id": done.id})
            assert (res.returncode, res.json) == (0, None), (kind, res.stdout)
            assert run_bin("Task.stat", {"dbg": "d", "id": done.id}).error_name == "Task_does_not_exist", kind
            lost = store.create("lost-" + kind)
            ident = dead_identity()
            store.annotate(lost.id, lambda t, ident=ident: setattr(t, "worker", ident))
            _damage(state_dir, lost.id, kind, str(victim))
            res = run_bin("Task.stat", {"dbg": "d", "id": lost.id})
            assert res.returncode == 0 and res.json["state"][0] == "Failed", (kind, res.stdout)
            assert run_bin("Task.destroy", {"dbg": "d", "id": lost.id}).returncode == 0, kind
            assert victim.read_text() == "keep me\n", kind
        trials += 2
    with failures.trial():
        assert store.ids() == []
        assert task_file_problems(state_dir) == []
    report("damaged lock files", trials=trials, faults_injected=trials, kinds=len(DAMAGE), failures=failures)


def test_worker_on_a_full_state_directory_records_why_it_stopped(tiny_fs, tmp_path, monkeypatch):
    """Promise (issue 12, item 5): workers that meet a full state directory
    (here stopped just after they start, then let go once it is full) each
    end Completed (progress is advisory) or Failed saying there was no
    space for the task file; never ``Worker lost``."""
    state = tiny_fs / "state"
    monkeypatch.setenv("TASK_STATE_DIR", str(state))
    monkeypatch.setenv("TASK_SYSLOG", "0")
    from ops import write_steps

    outcomes, failures = {}, Failures()
    with Store(str(state)) as store:
        for n in range(3):
            out = tmp_path / ("out%d" % n)
            tid = worker.start("full-%d" % n, write_steps, {"path": str(out), "steps": 20, "delay": 0.01}, store=store)
            ident = store.get(tid).worker
            os.kill(ident["pid"], signal.SIGSTOP)
            filler = _fill(str(tiny_fs))
            os.kill(ident["pid"], signal.SIGCONT)
            with failures.trial():
                try:
                    assert identity.wait_gone(ident, 30)
                    final = store.get(tid).state  # recorded while the disk is still full
                finally:
                    os.unlink(filler)
                if isinstance(final, Completed):
                    outcomes["Completed"] = outcomes.get("Completed", 0) + 1
                    assert out.read_text().count("step") == 20
                else:
                    assert "No space left on device" in final.message and "Worker lost" not in final.message, final
                    assert not out.exists()
                    outcomes["Failed, no space"] = outcomes.get("Failed, no space", 0) + 1
                store.destroy(tid)
    report("workers meeting a full state directory", trials=3, faults_injected=3, outcomes=outcomes, failures=failures)


def test_destroy_works_on_any_damaged_task(store, state_dir, tmp_path):
    """Promise (issue 12, item 6): Task.destroy is the operator's way out
    of any damaged task: its file a symlink (to a file outside the store,
    left untouched), a directory, torn JSON; its Pending mark or cancel
    request a directory. Each is destroyed and nothing of it remains."""
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    root = str(state_dir)

    def task_file_symlink(tid):
        path = os.path.join(root, "tasks", tid + ".json")
        os.unlink(path)
        os.symlink(str(victim), path)

    def task_file_directory(tid):
        path = os.path.join(root, "tasks", tid + ".json")
        os.unlink(path)
        os.mkdir(path)

    def task_file_torn(tid):
        with open(os.path.join(root, "tasks", tid + ".json"), "w") as f:
            f.write('{"version": 1, "id": ')

    def mark_directory(tid):
        os.mkdir(os.path.join(root, "pending", tid))

    def cancel_directory(tid):
        os.makedirs(os.path.join(root, "cancels", tid))

    damages = (task_file_symlink, task_file_directory, task_file_torn, mark_directory, cancel_directory)
    failures = Failures()
    for damage in damages:
        task = store.create(damage.__name__)
        store.transition(task.id, lambda t: Completed(0.1))
        damage(task.id)
        with failures.trial():
            res = run_bin("Task.destroy", {"dbg": "d", "id": task.id})
            assert (res.returncode, res.json) == (0, None), (damage.__name__, res.stdout)
            assert run_bin("Task.stat", {"dbg": "d", "id": task.id}).error_name == "Task_does_not_exist", damage.__name__
            left = [os.path.join(d, n) for d in ("tasks", "locks", "pending", "cancels", "logs")
                    for n in _listdir(os.path.join(root, d)) if n.startswith(task.id)]
            assert left == [], (damage.__name__, left)
    with failures.trial():
        assert victim.read_text() == "keep me\n"
    report("damaged tasks destroyed", trials=len(damages), faults_injected=len(damages), failures=failures)


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
