#!/usr/bin/env python3
"""``Task.stat`` through the socket daemon vs one executable per call.

Side by side, in one run, on one store holding one Pending task:

- the daemon (``python3 -m xapi_storage_tasks.daemon.server --processes N``,
  one serving process per CPU unless ``--processes`` says), called through
  :mod:`xapi_storage_tasks.client.connection` by 1 and by 16 concurrent client processes, each
  holding one keep-alive connection and calling in a closed loop for
  ``--duration`` seconds: requests per second, p50 and p99 latency;
- ``bin/Task.stat --json`` executed once per call, ``--exec-calls`` times
  in a row (what the toolstack pays per call without a daemon).

Goals: the daemon's rate at least 50x the exec-per-call rate, and p99 under
5 ms with 16 clients. Prints a table and the ratios; ``--json-out PATH``
writes the numbers as JSON. The defaults finish in well under a minute::

    python3 bench/bench_daemon.py --json-out bench/results/daemon.json

Also a suite of ``bench/run.py`` (:func:`run`).
"""

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "plugin")]

import harness  # noqa: E402
from xapi_storage_tasks.tasks.store import Store  # noqa: E402

GOAL_RATIO = 50.0
GOAL_P99_MS = 5.0


def percentile(sorted_samples, q):
    """The ``q``-th percentile (0-100) of sorted samples, nearest rank."""
    if not sorted_samples:
        return float("nan")
    rank = max(0, min(len(sorted_samples) - 1, int(round(q / 100.0 * len(sorted_samples) + 0.5)) - 1))
    return sorted_samples[rank]


def start_daemon(sock, env, processes=1, timeout=20.0):
    """Start the daemon; return its Popen once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "xapi_storage_tasks.daemon.server", "--socket", sock,
                             "--max-connections", "256", "--processes", str(processes)],
                            env=env, cwd=harness.ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("daemon exited: %s" % proc.stderr.read().decode()[-500:])
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(sock)
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("daemon did not start within %gs" % timeout)


def cpu_seconds(pid):
    """User + system CPU seconds used so far by process ``pid`` and its
    serving processes (its children that are still running; workers are
    detached, so not among them)."""
    pids = [pid]
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    total = 0
    for one in pids:
        try:
            with open("/proc/%d/stat" % one) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _client_loop(sock, task_id, barrier, duration, warmup, out):
    """One client process: a keep-alive connection, calls in a closed loop."""
    from xapi_storage_tasks.client import connection as client

    c = client.connect(socket=sock)
    stat = c.Task.stat
    params = {"dbg": "bench", "id": task_id}
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        stat(params)
    barrier.wait()
    samples = array("d")
    began = time.perf_counter()
    end = began + duration
    while True:
        t0 = time.perf_counter()
        stat(params)
        t1 = time.perf_counter()
        samples.append(t1 - t0)
        if t1 >= end:
            break
    out.send((samples.tobytes(), t1 - began, c.transport.connections_made))
    out.close()


def measure_daemon(sock, task_id, clients, duration, warmup, daemon_pid):
    """Run ``clients`` client processes at once; return the figures."""
    ctx = multiprocessing.get_context("fork")  # this process has no threads: fork is safe
    barrier = ctx.Barrier(clients + 1)  # and this process: the window starts for everyone at once
    pipes, procs = [], []
    for _ in range(clients):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_loop, args=(sock, task_id, barrier, duration, warmup, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    samples, rate, connections = [], 0.0, 0
    barrier.wait(60)
    cpu_before = cpu_seconds(daemon_pid)
    for parent in pipes:
        raw, elapsed, made = parent.recv()
        got = array("d")
        got.frombytes(raw)
        samples.extend(got)
        rate += len(got) / elapsed
        connections += made
    cpu_used = cpu_seconds(daemon_pid) - cpu_before
    for p in procs:
        p.join(30)
    samples.sort()
    return {
        "mode": "daemon", "clients": clients, "calls": len(samples), "rate": rate,
        "p50_ms": 1e3 * percentile(samples, 50), "p99_ms": 1e3 * percentile(samples, 99),
        "mean_ms": 1e3 * statistics.fmean(samples), "connections": connections,
        "daemon_cpu_us_per_call": 1e6 * cpu_used / len(samples),
    }


def measure_exec(task_id, env, calls):
    """``bin/Task.stat --json`` once per call, ``calls`` times in a row."""
    exe = os.path.join(harness.BIN, "Task.stat")
    data = json.dumps({"dbg": "bench", "id": task_id}).encode()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        proc = subprocess.run([exe, "--json"], input=data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        samples.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError("Task.stat failed: %s" % proc.stderr.decode()[-300:])
    total = sum(samples)
    samples.sort()
    return {
        "mode": "exec", "clients": 1, "calls": calls, "rate": calls / total,
        "p50_ms": 1e3 * percentile(samples, 50), "p99_ms": 1e3 * percentile(samples, 99),
        "mean_ms": 1e3 * total / calls, "connections": 0,
    }


def measure(duration=3.0, clients=(1, 16), exec_calls=40, warmup=0.3, processes=None):
    """Everything, in one run. Returns the result dict."""
    harness.compile_tree()  # no measured call pays for compiling
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        state = os.path.join(tmp, "state")
        env = harness.bench_env(TASK_STATE_DIR=state, PYTHONPATH=harness.SRC)
        os.environ.update(TASK_STATE_DIR=state, TASK_SYSLOG="0")
        with Store(state) as store:
            task_id = store.create("bench").id
        sock = os.path.join(tmp, "d.sock")
        processes = processes or os.cpu_count() or 1
        daemon = start_daemon(sock, env, processes)
        try:
            runs = [measure_daemon(sock, task_id, n, duration, warmup, daemon.pid) for n in clients]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        runs.append(measure_exec(task_id, env, exec_calls))
    exec_rate = runs[-1]["rate"]
    by_clients = {r["clients"]: r for r in runs if r["mode"] == "daemon"}
    most = by_clients[max(by_clients)]
    ratios = {str(n): r["rate"] / exec_rate for n, r in sorted(by_clients.items())}
    goals = {
        "rate_ratio": {"goal": ">= %gx exec-per-call rate" % GOAL_RATIO,
                       "value": min(ratios.values()), "met": min(ratios.values()) >= GOAL_RATIO},
        "p99_ms_at_%d_clients" % most["clients"]: {"goal": "< %g ms" % GOAL_P99_MS,
                                                    "value": most["p99_ms"], "met": most["p99_ms"] < GOAL_P99_MS},
    }
    return {
        "meta": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "processes": processes, "duration_s": duration,
                 "exec_calls": exec_calls, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "runs": runs,
        "ratio_to_exec": ratios,
        "goals": goals,
    }


def print_report(result, out=sys.stdout):
    """The human table, ratios and goals."""
    head = "%-8s %8s %10s %12s %9s %9s %9s %14s" % ("mode", "clients", "calls", "req/s", "p50 ms", "p99 ms", "mean ms",
                                                  "daemon cpu/call")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in result["runs"]:
        cpu = "%11.0f us" % r["daemon_cpu_us_per_call"] if "daemon_cpu_us_per_call" in r else "%14s" % "-"
        print("%-8s %8d %10d %12.1f %9.3f %9.3f %9.3f %s" % (r["mode"], r["clients"], r["calls"], r["rate"],
                                                            r["p50_ms"], r["p99_ms"], r["mean_ms"], cpu), file=out)
    print(file=out)
    for n, ratio in result["ratio_to_exec"].items():
        print("daemon with %s client(s) / exec per call: %.1fx" % (n, ratio), file=out)
    for name, g in result["goals"].items():
        print("goal %-22s %-28s %10.3f  %s" % (name, g["goal"], g["value"], "met" if g["met"] else "NOT MET"), file=out)


def run(args):
    """A suite of bench/run.py: rows in harness's format."""
    result = measure(duration=getattr(args, "duration", 3.0), exec_calls=getattr(args, "repeat", 40))
    rows = []
    exec_run = result["runs"][-1]
    for r in result["runs"][:-1]:
        rows.append({"name": "Task.stat via daemon, %d client(s): req/s" % r["clients"], "value": r["rate"], "unit": "/s",
                     "spread": 0.0, "goal": ">= %gx" % GOAL_RATIO, "baseline": exec_run["rate"],
                     "baseline_name": "exec per call", "ratio": r["rate"] / exec_run["rate"]})
        rows.append({"name": "Task.stat via daemon, %d client(s): p99" % r["clients"], "value": r["p99_ms"], "unit": "ms",
                     "spread": 0.0, "goal": "< %g ms" % GOAL_P99_MS if r["clients"] >= 16 else None,
                     "baseline": None, "baseline_name": None, "ratio": None})
    return rows


def main(argv=None):
    """Command line: run, print, optionally write JSON; exit 0 (goals are
    reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds each daemon measurement lasts (default 3)")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--exec-calls", type=int, default=40, help="executable runs for the baseline (default 40)")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds each client calls before measuring (default 0.3)")
    parser.add_argument("--processes", type=int, help="the daemon's --processes (default: one per CPU)")
    parser.add_argument("--json-out", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    clients = tuple(int(n) for n in args.clients.split(",") if n.strip())
    result = measure(args.duration, clients, args.exec_calls, args.warmup, args.processes)
    print_report(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
        print("results written to %s" % args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
