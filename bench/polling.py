"""What the toolstack's polling of a migration costs the host: ``Data.stat``
called back to back with no sleep (xapi's ``mirror_wait``) during a
mirror into a rate-limited target, each poll run as installed
(``/usr/bin/python3 -I -S bin/Data.stat``).

Figures, side by side in the same run (the modes interleaved):
- the CPU the polls burned, as a share of one core over the sync: paced
  (the default ``TASK_STAT_WAIT``) beside the same loop with pacing off
  (``TASK_STAT_WAIT=0``, as before pacing; goal: at most 5 % of a core);
- the sync time (``Data.mirror`` to the poll that says ``complete``), paced
  and unpaced, beside polling once a second (goal: no worse);
- the number of polls per sync;
- the latency from the job becoming ready to the poll that says
  ``complete`` (from the worker's write of ``ready`` in the task file
  becoming visible: nothing writes it again until the drain), and from
  the mirror failing (its worker's write of ``Failed``) to the poll that
  says ``failed``, with the target killed mid-sync; the latter also from
  the kill itself, which includes QEMU's and the worker's reaction
  (goal: median at most 20 ms).

The target is nbdkit's memory plugin behind its rate filter (``--rate``,
default 400M: the issue's 400 MB/s).

``python3 bench/run.py polling [--poll-gib G] [--poll-runs N]``
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from datapath import call, make_image
from harness import bench_env, executable, host_python, row, start_server, stop_server


class RateTarget:
    """nbdkit serving ``size`` bytes of memory at ``rate`` (one export)."""

    def __init__(self, tmp, size, rate):
        self.sock = os.path.join(tmp, "target.sock")
        self.proc = start_server(["nbdkit", "-f", "-U", self.sock, "--filter=rate", "memory", str(size), "rate=" + rate],
                                 self.sock)
        self.uri = "nbd+unix:///dst?socket=" + self.sock

    def kill(self):
        stop_server(self.proc, self.sock)


def _cpu_of_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def poll(op, env, interval=0.0, kill_after=None, target=None):
    """Data.stat until complete or failed, as the toolstack does (with
    ``interval`` seconds between polls). Returns (answer, wall time of the
    answer, polls, CPU seconds of the polls, wall time of the kill)."""
    argv = executable("Data.stat", host_python())
    stdin = json.dumps({"dbg": "bench", "operation": op}).encode()
    cpu0, polls, killed, t0 = _cpu_of_children(), 0, None, time.monotonic()
    while True:
        proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120)
        at = time.time()
        polls += 1
        if proc.returncode != 0:
            raise RuntimeError("Data.stat failed: %s" % proc.stdout.decode()[-500:])
        answer = json.loads(proc.stdout)
        if answer["complete"] or answer["failed"]:
            return answer, at, polls, _cpu_of_children() - cpu0, killed
        if kill_after is not None and killed is None and time.monotonic() - t0 >= kill_after:
            killed = time.time()
            target.kill()  # reaping it adds its CPU to the children's: no CPU figure from such a run
        if interval:
            time.sleep(interval)


def _written(state, op):
    """When the task file's last write became visible: its inode's change
    time, set when the write is linked and renamed into place (its mtime is
    older by the write's fsync)."""
    return os.stat(os.path.join(state, "tasks", op[1] + ".json")).st_ctime


def run(args):
    if any(shutil.which(t) is None for t in ("qemu-storage-daemon", "nbdkit")):
        print("# polling: skipped (needs qemu-storage-daemon, nbdkit: make deps)", file=sys.stderr)
        return []
    gib, runs, rate = getattr(args, "poll_gib", 1.0), getattr(args, "poll_runs", 3), getattr(args, "rate", "400M")
    mib = int(gib * 1024)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        paced = bench_env(TASK_STATE_DIR=state)
        paced.pop("TASK_STAT_WAIT", None)  # the default
        modes = {"paced": (paced, 0.0), "unpaced": (dict(paced, TASK_STAT_WAIT="0"), 0.0),
                 "1 s": (paced, 1.0)}
        src = os.path.join(tmp, "disk.raw")
        make_image(src, mib)
        uri = "raw+file://" + src
        dp = {"dbg": "b", "uri": uri, "domain": "7"}
        call("Datapath.attach", dp, paced)
        call("Datapath.activate", dp, paced)
        got = {m: {"sync": [], "cpu": [], "share": [], "polls": []} for m in modes}
        ready, failing, from_kill = [], [], []

        def mirror(env, rate=rate):
            target = RateTarget(tmp, mib << 20, rate)
            t0 = time.time()
            return target, t0, call("Data.mirror", {"dbg": "b", "uri": uri, "domain": "7", "remote": target.uri}, env)

        def end(target):
            call("Datapath.deactivate", dp, paced)  # drains a ready mirror, forgets a failed one
            call("Datapath.activate", dp, paced)
            target.kill()

        try:
            for _ in range(runs):
                for name, (env, interval) in modes.items():
                    target, t0, op = mirror(env)
                    try:
                        answer, at, polls, cpu, _ = poll(op, env, interval)
                        if not answer["complete"]:
                            raise RuntimeError("mirror failed: %s" % answer)
                        sync = at - t0
                        got[name]["sync"].append(sync)
                        got[name]["share"].append(100 * cpu / sync)
                        got[name]["polls"].append(polls)
                        if name == "paced":
                            ready.append(at - _written(state, op))
                    finally:
                        end(target)
                # More of the latency: a paced mirror into a target without a rate limit.
                target, t0, op = mirror(paced, "100G")
                try:
                    answer, at, _, _, _ = poll(op, paced)
                    ready.append(at - _written(state, op))
                finally:
                    end(target)
                # A mirror failing mid-sync: its target killed a second in.
                target, t0, op = mirror(paced)
                try:
                    answer, at, _, _, killed = poll(op, paced, kill_after=1.0, target=target)
                    if not answer["failed"] or killed is None:
                        raise RuntimeError("the mirror did not fail as expected: %s" % answer)
                    failing.append(at - _written(state, op))
                    from_kill.append(at - killed)
                finally:
                    end(target)
        finally:
            call("Datapath.deactivate", dp, paced)
            call("Datapath.detach", dp, paced)
    size = "%g GiB at %s/s" % (gib, rate)
    rows.append(row("Data.stat loop CPU, paced, %s" % size, got["paced"]["share"], unit="%", scale=1,
                    baseline=got["unpaced"]["share"], baseline_name="unpaced (TASK_STAT_WAIT=0)", goal="<= 5 %"))
    rows.append(row("Data.stat loop CPU, 1 s polling", got["1 s"]["share"], unit="%", scale=1))
    for name in ("paced", "unpaced"):
        rows.append(row("mirror sync, %s back-to-back polls" % name, got[name]["sync"], unit="s", scale=1,
                        baseline=got["1 s"]["sync"], baseline_name="1 s polling", goal="<= 1x" if name == "paced" else None))
    rows.append(row("polls per sync, paced", got["paced"]["polls"], unit="n", scale=1, baseline=got["unpaced"]["polls"],
                    baseline_name="unpaced"))
    rows.append(row("ready written -> poll says complete", ready, goal="<= 20 ms"))
    rows.append(row("Failed written -> poll says failed", failing, goal="<= 20 ms"))
    rows.append(row("target killed -> poll says failed", from_kill))
    return rows


if __name__ == "__main__":
    import argparse

    from harness import compile_tree, print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poll-gib", type=float, default=1.0)
    parser.add_argument("--poll-runs", type=int, default=3)
    parser.add_argument("--rate", default="400M")
    compile_tree([host_python()])
    print_table(run(parser.parse_args()))
