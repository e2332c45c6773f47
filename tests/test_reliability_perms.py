"""Permissions: the state directory and its subdirectories are 0700 and
every file in it 0600 whatever the callers' umask; an unsafe state
directory (group- or world-writable, owned by another uid, a symlink) is
refused by every method with the ``State_directory_invalid`` error record
and exit 1, and nothing in or through it is touched.
"""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import BIN, ROOT
from faults import Failures, dead_identity, kill_live_workers, report, tree
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks.state import Completed
from xapi_storage_tasks.tasks.store import Store

pytestmark = pytest.mark.reliability

STARTER = os.path.join(ROOT, "tests", "start_task.py")
NOBODY = 65534
# Every method that opens the store. Data.copy validates its source first
# and Data.mirror is unimplemented: neither gets as far as the store.
STORE_METHODS = ("Task.stat", "Task.cancel", "Task.destroy", "Task.ls", "Data.stat", "Data.cancel", "Data.destroy", "Data.ls")


def _umask0():
    os.umask(0)


def _run(method, params, env, umask0=False):
    p = subprocess.run([os.path.join(BIN, method), "--json"], input=json.dumps(params).encode(), capture_output=True,
                       env=env, timeout=60, preexec_fn=_umask0 if umask0 else None)
    return p.returncode, p.stdout, p.stderr


def test_modes_after_real_worker_runs(tmp_path, monkeypatch):
    """Promise: after real workers ran (one completed, one cancelled, one
    failed), and every Task method was called with umask 000, the state
    directory and every subdirectory are mode 0700 and every file in it
    (task, lock, mark, log, store log) is mode 0600, all owned by us."""
    state = tmp_path / "state"
    env = dict(os.environ, TASK_STATE_DIR=str(state), TASK_SYSLOG="0", TASK_CANCEL_GRACE="0.5")
    monkeypatch.setenv("TASK_STATE_DIR", str(state))
    monkeypatch.setenv("TASK_SYSLOG", "0")

    def start(name, steps, fail_at=-1):
        out = subprocess.run([sys.executable, STARTER, str(tmp_path / name), str(steps), "0.01", "0", str(fail_at)],
                             capture_output=True, env=env, timeout=60, check=True, preexec_fn=_umask0)
        return json.loads(out.stdout)

    try:
        first = _run("Task.ls", {"dbg": "d"}, env, umask0=True)  # creates the state directory
        assert first[0] == 0, first
        done, cancelled, failed = start("done", 3), start("cancelled", 500), start("failed", 5, fail_at=2)
        pending = start("pending", 500)
        assert _run("Task.cancel", {"dbg": "d", "id": cancelled}, env, umask0=True)[0] == 0
        deadline = time.monotonic() + 30
        with Store(str(state)) as store:
            while time.monotonic() < deadline and not all(store.get(t).state.terminal for t in (done, cancelled, failed)):
                time.sleep(0.05)
            corrupt = store.create("corrupt")
        with open(state / "tasks" / (corrupt.id + ".json"), "w") as f:
            f.write("{")  # makes the next stat write logs/store.log
        for method, tid in (("Task.stat", done), ("Task.stat", corrupt.id), ("Task.stat", pending), ("Task.ls", None)):
            _run(method, {"dbg": "d"} if tid is None else {"dbg": "d", "id": tid}, env, umask0=True)
        assert _run("Task.destroy", {"dbg": "d", "id": failed}, env, umask0=True)[0] == 0
        entries, wrong = 0, []
        for top, dirs, files in os.walk(str(state)):
            for name in [""] + dirs + files:
                path = os.path.join(top, name) if name else top
                if not name and top != str(state):
                    continue
                st = os.lstat(path)
                entries += 1
                want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
                if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) != want or st.st_uid != os.geteuid():
                    wrong.append("%s %o uid %d" % (os.path.relpath(path, str(state)), st.st_mode, st.st_uid))
        kinds = sorted({os.path.relpath(top, str(state)) for top, _, files in os.walk(str(state)) if files})
        report("modes", entries_checked=entries, directories_with_files=kinds, wrong=len(wrong), failures=len(wrong))
        assert wrong == []
        assert {"tasks", "locks", "pending", "logs"} <= set(kinds)
        assert (state / "logs" / "store.log").exists() and (state / "logs" / (done + ".log")).exists()
        assert _run("Task.cancel", {"dbg": "d", "id": pending}, env)[0] == 0
    finally:
        kill_live_workers(state)
        with Store(str(state)) as store:
            for tid in store.ids():
                try:
                    ident = store.get(tid).worker
                except Exception:
                    continue
                if ident:
                    identity.wait_gone(ident, 10)


def _populate(path):
    """A real store: a finished task, a copy task, and a Pending task whose
    worker is gone (any call that reached it would rewrite it)."""
    with Store(str(path)) as store:
        done = store.create("done")
        store.transition(done.id, lambda t: Completed(1.0))
        copy = store.create("copy", operation={"kind": "CopyV1", "args": {}})
        store.transition(copy.id, lambda t: Completed(2.0))
        lost = store.create("lost")
        ident = dead_identity()
        store.annotate(lost.id, lambda t: setattr(t, "worker", ident))
        return [done.id, copy.id, lost.id]


CASES = {
    "world-writable": lambda d, tmp: os.chmod(d, 0o777),
    "world-writable sticky": lambda d, tmp: os.chmod(d, 0o1777),
    "other-writable only": lambda d, tmp: os.chmod(d, 0o702),
    "group-writable": lambda d, tmp: os.chmod(d, 0o770),
    "owned by uid 65534": lambda d, tmp: os.chown(d, NOBODY, NOBODY),
    "tasks/ group-writable": lambda d, tmp: os.chmod(os.path.join(d, "tasks"), 0o720),
    "tasks/ owned by uid 65534": lambda d, tmp: os.chown(os.path.join(d, "tasks"), NOBODY, NOBODY),
}


@pytest.mark.parametrize("case", sorted(CASES) + ["symlink", "parent is a symlink", "tasks/ is a symlink", "not a directory"])
def test_unsafe_state_directory_is_refused(tmp_path, case):
    """Promise: with an unsafe state directory (group- or world-writable,
    owned by another uid, a symlink or below one, not a directory; or such a tasks/
    subdirectory) every method that uses the store answers exit 1 with a
    valid State_directory_invalid record naming the reason, and nothing
    in the directory (or behind the symlink) changes, logs included."""
    real = tmp_path / "real"
    task_ids = _populate(real)
    target = real
    if case == "symlink":
        target = tmp_path / "link"
        target.symlink_to(real)
    elif case == "parent is a symlink":  # issue 12, item 7: the whole path is checked
        (tmp_path / "up").symlink_to(tmp_path)
        target = tmp_path / "up" / "real"
    elif case == "tasks/ is a symlink":
        os.rename(real / "tasks", tmp_path / "elsewhere")
        (real / "tasks").symlink_to(tmp_path / "elsewhere")
    elif case == "not a directory":
        target = tmp_path / "file"
        target.write_text("x")
    else:
        CASES[case](str(real), tmp_path)
    before = tree(tmp_path)
    env = dict(os.environ, TASK_STATE_DIR=str(target), TASK_SYSLOG="0")
    done, copy, lost = task_ids
    calls = []
    for method in STORE_METHODS:  # each once, all at the same time
        if method.endswith(".ls"):
            params = {"dbg": "d"}
        elif method.startswith("Data."):
            params = {"dbg": "d", "operation": ["CopyV1", copy]}
        else:
            params = {"dbg": "d", "id": lost if method != "Task.destroy" else done}
        p = subprocess.Popen([os.path.join(BIN, method), "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
        p.stdin.write(json.dumps(params).encode())
        p.stdin.close()
        calls.append((method, p))
    reasons, refused, failures = set(), 0, Failures()
    for method, p in calls:
        out, err = p.stdout.read(), p.stderr.read()
        code = p.wait(timeout=60)
        with failures.trial():
            record = json.loads(out)
            assert code == 1, (method, out)
            assert set(record) == {"code", "params", "backtrace"}, (method, record)
            assert record["params"][0] == "State_directory_invalid", (method, record)
            assert all(isinstance(x, str) for x in record["params"]) and len(record["params"]) == 3
            assert err.decode().count("\n") == 1
            reasons.add(record["params"][2])
            refused += 1
    after = tree(tmp_path)
    changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
    with failures.trial():
        assert changed == [], "changed: %s" % changed
    report("unsafe state directory: %s" % case, calls=len(calls), refused=refused, reasons=sorted(reasons),
           entries_compared=len(before), changed=len(changed), failures=failures)


def test_symlinked_state_directory_is_reported_as_a_symlink(tmp_path):
    """Promise (README error table): a state directory that is a symlink
    is refused as such: the record's detail says it is a symlink (not the
    misleading "Not a directory" for a link to a directory)."""
    real = tmp_path / "real"
    Store(str(real)).close()
    link = tmp_path / "link"
    link.symlink_to(real)
    code, out, _ = _run("Task.ls", {"dbg": "d"}, dict(os.environ, TASK_STATE_DIR=str(link), TASK_SYSLOG="0"))
    record = json.loads(out)
    report("symlink reason", trials=1, faults_injected=1, reason=record["params"][2:],
           failures=int("symlink" not in record["params"][2]))
    assert code == 1 and record["params"][0] == "State_directory_invalid"
    assert "symlink" in record["params"][2], record["params"]
