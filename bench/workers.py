"""Starting and cancelling workers.

Figures:
- the starter executable's run time (start a task, return its id) vs
  ``python3 -c pass`` (goal: at most 2x);
- cancel latency: ``Task.cancel`` returned -> task Failed ``Cancelled`` with
  its artifact removed, for a worker that honours SIGTERM (goal: median
  under 100 ms);
- the cost of one progress write (atomic, fsynced), and what that costs a
  worker at the maximum rate of 4 writes per second.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from harness import BIN, ROOT, bench_env, row, time_command

sys.path[:0] = [os.path.join(ROOT, "plugin"), os.path.join(ROOT, "tests")]

from ops import write_steps  # noqa: E402
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks import worker  # noqa: E402
from xapi_storage_tasks.tasks.state import Pending  # noqa: E402
from xapi_storage_tasks.tasks.store import Store  # noqa: E402

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
    return rows
