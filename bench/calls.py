"""Per-call cost of the executables, and how it scales with the store.

The executables are run as an installed host runs them: the distribution's
interpreter (``/usr/bin/python3`` when present) with the installed
interpreter line's flags (``-I -S``), each figure beside bare starts of
that same interpreter (``python3 -I -S -c pass``, and the plain ``python3 -c
pass``) measured in the same rounds (interleaved, so both see the same
machine load). When
the ``python3`` running the bench is another program (a version manager's
shim, a virtualenv), the small-store figures are also given through it,
beside its own bare start.

Figures:
- ``Task.stat`` of a finished task, ``Data.stat`` of a finished copy and
  of a running mirror (its worker's identity checked in ``/proc``), and
  ``Task.ls`` of a small store (goal: at most 1.7x a bare start with the
  executables' flags, ``python3 -I -S -c pass``; the plain ``python3 -c
  pass`` is printed beside it);
- ``Task.ls`` with 10,000 and 100,000 tasks (goal at 100,000: at most 2x);
- ``Task.stat`` with 100,000 tasks in the store (should stay flat);
- ``Data.copy`` returning (request validated, task made, worker started;
  goal: at most 2x, as for any starter), with an interpreter that has the
  worker's dependencies.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from harness import HOST_FLAGS, SRC, bench_env, executable, host_python, row, same_interpreter, time_command, time_interleaved

sys.path.insert(0, SRC)

from xapi_storage_tasks.process import identity  # noqa: E402
from xapi_storage_tasks.wire import ids  # noqa: E402
from xapi_storage_tasks.tasks.record import Task  # noqa: E402
from xapi_storage_tasks.tasks.state import Completed  # noqa: E402
from xapi_storage_tasks.tasks import marks  # noqa: E402
from xapi_storage_tasks.tasks.store import Store  # noqa: E402

SMALL = "<= 1.7x"


def populate(path, count):
    """Add ``count`` finished tasks quickly (no fsync: this is set-up, not
    the thing measured)."""
    with Store(path) as store:
        tasks, locks = store.dir_fd("tasks"), store.dir_fd("locks")
        base = time.time_ns() - count * 1000
        for i in range(count):
            task = Task(ids.new_id(base + i * 1000), "bench", (base + i * 1000) / 1e9, Completed(1.0))
            fd = os.open(task.id + ".json", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=tasks)
            os.write(fd, json.dumps(task.to_disk()).encode())
            os.close(fd)
            os.close(os.open(task.id, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=locks))


def _finished(store, operation=None):
    task = store.create("bench", operation)
    store.transition(task.id, lambda t: Completed(1.0))
    return task.id


def _running_mirror(store, task_id):
    """Make the Pending task a running mirror whose job is ready: a live
    process (leading its own group) holds the task's mark, as a worker
    does, and is recorded as its worker. Returns that process."""
    fd = marks.hold(store, task_id)
    try:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], pass_fds=[fd],
                                start_new_session=True)
    finally:
        os.close(fd)  # the child's copy keeps the mark held
    while True:  # until the child has its own group
        ident = identity.identity(proc.pid)
        if ident is not None and ident["pgid"] == proc.pid:
            break
        time.sleep(0.001)
    ident["fd"] = fd

    def mutate(task):
        task.worker = ident
        task.operation["ready"] = True

    store.annotate(task_id, mutate)
    return proc


def _has_worker_deps(python):
    return subprocess.run([python, "-c", "import daemon"], capture_output=True).returncode == 0


def run(args):
    rows = []
    host = host_python()
    here = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        # Every call answers at once, as a first or isolated poll does (the
        # last answer read and written, never waited on): the cost of one
        # answer, not the pacing of back-to-back polls (bench/polling.py).
        env = bench_env(TASK_STATE_DIR=state, TASK_STAT_WAIT="0.001")
        with Store(state) as store:
            done = _finished(store)
            copied = _finished(store, {"kind": "CopyV1", "args": {}})
            # A mirror whose job is ready stays Pending: Data.stat reads its
            # task file only (no QMP), with its worker's identity checked.
            mirror = store.create("bench", {"kind": "MirrorV1", "args": {}})
            mirror_worker = _running_mirror(store, mirror.id)
        try:
            stat_in = json.dumps({"dbg": "b", "id": done}).encode()
            data_stat_in = json.dumps({"dbg": "b", "operation": ["CopyV1", copied]}).encode()
            mirror_stat_in = json.dumps({"dbg": "b", "operation": ["MirrorV1", mirror.id]}).encode()
            ls_in = b'{"dbg": "b"}'
            n = args.repeat

            def bare(python):
                """A bare start with the executables' flags, and a plain one."""
                return {"flags": ([python, *HOST_FLAGS, "-c", "pass"], b""), "plain": ([python, "-c", "pass"], b"")}

            def small_store(python, label):
                calls = (("Task.stat (finished task)", "Task.stat", stat_in),
                         ("Data.stat (finished copy)", "Data.stat", data_stat_in),
                         ("Data.stat (running mirror, ready)", "Data.stat", mirror_stat_in),
                         ("Task.ls, 3 tasks", "Task.ls", ls_in))
                commands = bare(python)
                commands.update((name, (executable(method, python), stdin)) for name, method, stdin in calls)
                got = time_interleaved(commands, env, n)
                for name, _, _ in calls:
                    rows.append(row("%s [%s]" % (name, label), got[name], baseline=got["flags"],
                                    baseline_name="%s python3 %s -c pass" % (label, " ".join(HOST_FLAGS)),
                                    goal=SMALL if python == host else None,  # the goal is the host's
                                    also=(got["plain"], "%s python3 -c pass" % label)))
                return got

            print("# calls: executables run as %s %s; %s" % (host, " ".join(HOST_FLAGS), "the same as this bench's python3"
                  if same_interpreter(host, here) else "also as this bench's python3, %s, a different program" % here),
                  file=sys.stderr)
            base = small_store(host, "host")["plain"]
            if not same_interpreter(host, here):
                small_store(here, "bench's")

            starter = host if _has_worker_deps(host) else here
            src, dst = os.path.join(tmp, "src.img"), os.path.join(tmp, "dst.img")
            for path in (src, dst):
                with open(path, "wb") as f:
                    f.write(b"x" * 65536)
            copy_in = json.dumps({"dbg": "b", "uri": src, "domain": "0", "remote": "file://" + dst, "blocklist": None}).encode()
            copy_base = base if starter == host else time_command([starter, "-c", "pass"], env=env, repeat=n)
            rows.append(row("Data.copy returns (task + worker started)",
                            time_command(executable("Data.copy", starter), copy_in, env, n),
                            baseline=copy_base, baseline_name="%s python3 -c pass" % ("host" if starter == host else "bench's"),
                            goal="<= 2x"))

            with Store(state) as store:
                have = len(store.ids())
            for count in sorted(set([min(10_000, args.tasks), args.tasks])):
                populate(state, count - have)
                have = count
                commands = bare(host)
                commands["ls"] = (executable("Task.ls", host), ls_in)
                commands["stat"] = (executable("Task.stat", host), stat_in)
                got = time_interleaved(commands, env, n)
                flags = "host python3 %s -c pass" % " ".join(HOST_FLAGS)
                also = (got["plain"], "host python3 -c pass")
                rows.append(row("Task.ls, %d tasks" % count, got["ls"], baseline=got["flags"], baseline_name=flags,
                                goal="<= 2x" if count >= 100_000 else None, also=also))
                rows.append(row("Task.stat, %d tasks" % count, got["stat"], baseline=got["flags"], baseline_name=flags,
                                goal="flat", also=also))
        finally:
            mirror_worker.kill()
            mirror_worker.wait()
    return rows
