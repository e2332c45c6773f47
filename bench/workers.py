"""Starting and cancelling workers.

Figures:
- the starter executable's run time (start a task, return its id) vs
  ``python3 -c pass`` (goal: at most 2x);
- cancel latency: ``Task.cancel`` returned -> task Failed ``Cancelled`` with
  its artifact removed, for a worker that honours SIGTERM (goal: median
  under 100 ms);
- the cost of one progress write (atomic, fsynced), and what that costs a
  worker at the maximum rate of 4 writes per second;
- retention: ``Task.stat`` and ``Task.ls`` with ``--tasks`` (default
  100,000) expired tasks waiting to be destroyed (each call destroys at
  most 4), against the same call on a small store, and ``Task.ls`` against
  the same big store with retention off (what the sweep adds).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from harness import BIN, ROOT, bench_env, executable, host_python, row, time_command

sys.path[:0] = [os.path.join(ROOT, "plugin"), os.path.join(ROOT, "tests")]

from ops import write_steps  # noqa: E402
from xapi_storage_tasks.process import identity  # noqa: E402
from xapi_storage_tasks.tasks import index, worker  # noqa: E402
from xapi_storage_tasks.tasks.record import Task  # noqa: E402
from xapi_storage_tasks.tasks.state import Completed, Pending  # noqa: E402
from xapi_storage_tasks.tasks.store import Store  # noqa: E402
from xapi_storage_tasks.wire import ids  # noqa: E402

STARTER = os.path.join(ROOT, "tests", "start_task.py")


def _cancel_latency(state, tmp, env, repeat):
    samples = []
    with Store(state) as store:
        for i in range(repeat):
            out = os.path.join(tmp, "out%d" % i)
            task_id = worker.start("bench", write_steps, {"path": out, "steps": 100000, "delay": 0.001}, store=store)
            time.sleep(0.05)
            subprocess.run([sys.executable, os.path.join(BIN, "Task.cancel"), "--json"], check=True, env=env,
                           input=json.dumps({"dbg": "b", "id": task_id}).encode(), stdout=subprocess.DEVNULL)
            t0 = time.perf_counter()
            while not (store.get(task_id).state.terminal and not os.path.exists(out)):
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("cancel did not take effect")
                time.sleep(0.0005)
            samples.append(time.perf_counter() - t0)
            assert store.get(task_id).state.message == "Cancelled"
            identity.wait_gone(store.get(task_id).worker, 10)
    return samples


def _progress_cost(state, count=200):
    with Store(state) as store:
        task = store.create("bench")
        t0 = time.perf_counter()
        for i in range(count):
            store.transition(task.id, lambda t, i=i: Pending(i / count))
        each = (time.perf_counter() - t0) / count
    return each


def _populate_expired(path, count, ended_ago=7200.0, minutes=100):
    """``count`` finished tasks that ended ``ended_ago`` seconds ago (spread
    over ``minutes`` minutes), written as the store writes them (task file,
    lock, retention entry) but without fsync: set-up, not measured."""
    with Store(path) as store:
        tasks, locks, ended = store.dir_fd("tasks"), store.dir_fd("locks"), store.dir_fd("ended")
        start = time.time() - ended_ago - 60 * minutes
        for i in range(count):
            end = start + 60 * minutes * i / count
            task = Task(ids.new_id(int((end - 1) * 1e9)), "bench", end - 1, Completed(1.0), updated=end)
            fd = os.open(task.id + ".json", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=tasks)
            os.write(fd, json.dumps(task.to_disk()).encode())
            os.close(fd)
            os.close(os.open(task.id, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=locks))
            bucket = str(int(end // index.WIDTH))
            try:
                os.mkdir(bucket, 0o700, dir_fd=ended)
            except FileExistsError:
                pass
            os.close(os.open("%s/%s" % (bucket, task.id), os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=ended))
    os.sync()  # the measured calls must not pay for writing back the set-up


def _small_store(path):
    """Ten recently finished tasks and one Pending; returns a finished id."""
    with Store(path) as store:
        for _ in range(10):
            task = store.create("bench")
            store.transition(task.id, lambda t: Completed(0.1))
        store.create("bench")
        return task.id


def _retention(args, tmp, n):
    small, big = os.path.join(tmp, "small"), os.path.join(tmp, "big")
    small_id = _small_store(small)
    big_id = _small_store(big)
    _populate_expired(big, args.tasks)
    host = host_python()  # as a host runs the executables
    stat, ls = executable("Task.stat", host) + ["--json"], executable("Task.ls", host) + ["--json"]
    keep = {"TASK_RETENTION": 3600}
    rows = []
    for name, argv, params in (("Task.stat", stat, "id"), ("Task.ls", ls, None)):
        small_in = json.dumps({"dbg": "b", "id": small_id} if params else {"dbg": "b"}).encode()
        big_in = json.dumps({"dbg": "b", "id": big_id} if params else {"dbg": "b"}).encode()
        # Interleaved, so both see the same machine state.
        base, waiting, off = [], [], []
        for _ in range(n):
            base += time_command(argv, small_in, bench_env(TASK_STATE_DIR=small, **keep), 1)
            waiting += time_command(argv, big_in, bench_env(TASK_STATE_DIR=big, **keep), 1)
            if name == "Task.ls":
                off += time_command(argv, big_in, bench_env(TASK_STATE_DIR=big, TASK_RETENTION=0), 1)
        label = "%s, %d expired tasks waiting" % (name, args.tasks)
        rows.append(row(label, waiting, baseline=base, baseline_name="11 tasks", goal="flat" if params else None))
        if off:
            rows.append(row(label + " (the sweep)", waiting, baseline=off, baseline_name="retention off", goal="flat"))
    with Store(big) as store:
        left = len(store.ids())
    print("# retention: %d of %d expired tasks left after %d calls (at most 4 per call)"
          % (left - 11, args.tasks, (3 * n)), file=sys.stderr)
    return rows


def run(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        env = bench_env(TASK_STATE_DIR=state)
        os.environ["TASK_STATE_DIR"] = state
        os.environ["TASK_SYSLOG"] = "0"
        n = args.repeat
        base = time_command([sys.executable, "-c", "pass"], env=env, repeat=n)
        starts = time_command([sys.executable, STARTER, os.path.join(tmp, "s"), "1", "0"], env=env, repeat=n)
        rows.append(row("starter returns (task + worker started)", starts, baseline=base,
                        baseline_name="python -c pass", goal="<= 2x"))
        rows.append(row("cancel returned -> Failed Cancelled, artifact gone", _cancel_latency(state, tmp, env, n),
                        goal="median < 100 ms"))
        each = [_progress_cost(state) for _ in range(3)]
        rows.append(row("one progress write (atomic, fsynced)", each, goal=None))
        share = [4 * e for e in each]
        rows.append(row("progress overhead at 4 writes/s", share, unit="%", scale=100, goal="small"))
        rows.extend(_retention(args, tmp, n))
    return rows
