"""Per-call cost of the executables, and how it scales with the store.

The executables are run as an installed host runs them: the distribution's
interpreter (``/usr/bin/python3`` when present) with the installed
interpreter line's flags (``-I -S``), each figure beside a bare start of
that same interpreter (``python3 -c pass``) measured in the same run. When
the ``python3`` running the bench is another program (a version manager's
shim, a virtualenv), the small-store figures are also given through it,
beside its own bare start.

Figures:
- ``Task.stat`` of a finished task, ``Data.stat`` of a finished copy and
  ``Task.ls`` of a small store (goal: at most 1.7x a bare start);
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

from harness import HOST_FLAGS, SRC, bench_env, executable, host_python, row, same_interpreter, time_command

sys.path.insert(0, SRC)

from xapi_storage_tasks.tasks import ids  # noqa: E402
from xapi_storage_tasks.tasks.record import Task  # noqa: E402
from xapi_storage_tasks.tasks.state import Completed  # noqa: E402
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


def _has_worker_deps(python):
    return subprocess.run([python, "-c", "import daemon"], capture_output=True).returncode == 0


def run(args):
    rows = []
    host = host_python()
    here = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        env = bench_env(TASK_STATE_DIR=state)
        with Store(state) as store:
            done = _finished(store)
            copied = _finished(store, {"kind": "CopyV1", "args": {}})
        stat_in = json.dumps({"dbg": "b", "id": done}).encode()
        data_stat_in = json.dumps({"dbg": "b", "operation": ["CopyV1", copied]}).encode()
        ls_in = b'{"dbg": "b"}'
        n = args.repeat

        def small_store(python, label):
            base = time_command([python, "-c", "pass"], env=env, repeat=n)
            bare = "%s python3 -c pass" % label
            for name, method, stdin in (("Task.stat (finished task)", "Task.stat", stat_in),
                                        ("Data.stat (finished copy)", "Data.stat", data_stat_in),
                                        ("Task.ls, 2 tasks", "Task.ls", ls_in)):
                rows.append(row("%s [%s]" % (name, label), time_command(executable(method, python), stdin, env, n),
                                baseline=base, baseline_name=bare, goal=SMALL))
            return base

        print("# calls: executables run as %s %s; %s" % (host, " ".join(HOST_FLAGS), "the same as this bench's python3"
              if same_interpreter(host, here) else "also as this bench's python3, %s, a different program" % here),
              file=sys.stderr)
        base = small_store(host, "host")
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
            base = time_command([host, "-c", "pass"], env=env, repeat=n)
            bare = "host python3 -c pass"
            rows.append(row("Task.ls, %d tasks" % count, time_command(executable("Task.ls", host), ls_in, env, n),
                            baseline=base, baseline_name=bare, goal="<= 2x" if count >= 100_000 else None))
            rows.append(row("Task.stat, %d tasks" % count, time_command(executable("Task.stat", host), stat_in, env, n),
                            baseline=base, baseline_name=bare, goal="flat"))
    return rows
