"""Per-call cost of the executables, and how it scales with the store.

Figures (each beside ``python3 -c pass`` measured in the same run, same
interpreter):
- ``Task.stat`` of a Pending task (goal: at most 1.25x);
- ``Task.ls`` with 0, 10,000 and 100,000 tasks (goal at 100,000: at most 2x);
- ``Task.stat`` with 100,000 tasks in the store (should stay flat);
- ``Data.copy`` returning (request validated, task made, worker started;
  goal: at most 2x, as for any starter).
"""

import json
import os
import sys
import tempfile
import time

from harness import BIN, SRC, bench_env, row, time_command

sys.path.insert(0, SRC)

from xapi_storage_tasks.tasks import ids  # noqa: E402
from xapi_storage_tasks.tasks.state import Completed  # noqa: E402
from xapi_storage_tasks.tasks.store import Store  # noqa: E402
from xapi_storage_tasks.tasks.record import Task  # noqa: E402


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


def run(args):
    rows = []
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        env = bench_env(TASK_STATE_DIR=state)
        with Store(state) as store:
            pending = store.create("bench").id
        stat_in = json.dumps({"dbg": "b", "id": pending}).encode()
        ls_in = b'{"dbg": "b"}'
        n = args.repeat
        base = time_command([py, "-c", "pass"], env=env, repeat=n)
        rows.append(row("Task.stat (Pending task)", time_command([py, os.path.join(BIN, "Task.stat"), "--json"], stat_in, env, n),
                        baseline=base, baseline_name="python -c pass", goal="<= 1.25x"))
        src, dst = os.path.join(tmp, "src.img"), os.path.join(tmp, "dst.img")
        for path in (src, dst):
            with open(path, "wb") as f:
                f.write(b"x" * 65536)
        copy_in = json.dumps({"dbg": "b", "uri": src, "domain": "0", "remote": "file://" + dst, "blocklist": None}).encode()
        rows.append(row("Data.copy returns (task + worker started)",
                        time_command([py, os.path.join(BIN, "Data.copy"), "--json"], copy_in, env, n),
                        baseline=base, baseline_name="python -c pass", goal="<= 2x"))
        rows.append(row("Task.ls, 1 task", time_command([py, os.path.join(BIN, "Task.ls"), "--json"], ls_in, env, n),
                        baseline=base, baseline_name="python -c pass"))
        with Store(state) as store:
            have = len(store.ids())
        for count in sorted(set([min(10_000, args.tasks), args.tasks])):
            populate(state, count - have)
            have = count
            base = time_command([py, "-c", "pass"], env=env, repeat=n)
            rows.append(row("Task.ls, %d tasks" % count, time_command([py, os.path.join(BIN, "Task.ls"), "--json"], ls_in, env, n),
                            baseline=base, baseline_name="python -c pass", goal="<= 2x" if count >= 100_000 else None))
            rows.append(row("Task.stat, %d tasks" % count, time_command([py, os.path.join(BIN, "Task.stat"), "--json"], stat_in, env, n),
                            baseline=base, baseline_name="python -c pass", goal="flat"))
    return rows
