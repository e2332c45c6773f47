"""A tiny benchmark harness: repeat a measurement, report the median and
spread beside a baseline measured in the same run, as a ratio with its goal.

Every bench module exposes ``run(args) -> list of rows``; a row is a dict
``{"name", "value", "unit", "baseline", "baseline_name", "ratio", "goal",
"spread"}`` (``baseline``/``ratio``/``goal`` may be None).
"""

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "plugin")  # the source root holding the package
BIN = os.path.join(ROOT, "bin")


def bench_env(**extra):
    """The environment for measured subprocesses: bytecode caching on (as
    for an installed package), no syslog, plus ``extra``."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["TASK_SYSLOG"] = "0"
    env.update({k: str(v) for k, v in extra.items()})
    return env


# The installed executables' interpreter line (packaging/xapi-storage-tasks.spec).
HOST_PYTHON = "/usr/bin/python3"
HOST_FLAGS = ("-I", "-S")


def host_python():
    """The interpreter a host runs the executables with: the
    distribution's, when there is one; else this one."""
    return HOST_PYTHON if os.access(HOST_PYTHON, os.X_OK) else sys.executable


def same_interpreter(a, b):
    """Whether two interpreter paths are the same program (a version
    manager's shim on PATH is not)."""
    return os.path.realpath(a) == os.path.realpath(b)


def executable(method, python):
    """The argv that runs ``bin/<method>`` as an installed host runs it:
    ``python`` with the interpreter line's flags."""
    return [python, *HOST_FLAGS, os.path.join(BIN, method)]


def compile_tree(pythons=()):
    """Write .pyc files once, for every interpreter measured, so no
    measured call pays for compiling."""
    for python in {sys.executable, *pythons}:
        subprocess.run([python, "-m", "compileall", "-q", os.path.join(ROOT, "plugin")], check=True, env=bench_env())


def time_command(argv, stdin=b"", env=None, repeat=20):
    """Wall-clock seconds of each of ``repeat`` runs of a command."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        samples.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError("%s failed: %s" % (argv, proc.stderr.decode()[-500:]))
    return samples


def time_interleaved(commands, env=None, repeat=20):
    """Like :func:`time_command` for several commands ``{name: (argv,
    stdin)}``, run in turn within each round, so a figure and its baseline
    see the same machine load (other processes come and go on a shared
    host). Returns ``{name: samples}``."""
    samples = {name: [] for name in commands}
    for _ in range(repeat):
        for name, (argv, stdin) in commands.items():
            samples[name] += time_command(argv, stdin, env, 1)
    return samples


def summary(samples):
    """(median, spread) where spread is the interquartile range relative to
    the median."""
    med = statistics.median(samples)
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        spread = (q[2] - q[0]) / med if med else 0.0
    else:
        spread = (max(samples) - min(samples)) / med if med else 0.0
    return med, spread


def row(name, samples, unit="ms", scale=1e3, baseline=None, baseline_name=None, goal=None, also=None):
    """A result row; ``baseline`` is a list of samples measured alongside
    (the goal's ratio is against it). ``also`` is ``(samples, name)`` of a
    second baseline, printed beside the first (e.g. the interpreter's plain
    start beside its start with the executables' flags)."""
    value, spread = summary(samples)
    out = {"name": name, "value": value * scale, "unit": unit, "spread": spread, "goal": goal,
           "baseline": None, "baseline_name": baseline_name, "ratio": None}
    if baseline is not None:
        base, _ = summary(baseline)
        out["baseline"] = base * scale
        out["ratio"] = value / base if base else None
    if also is not None:
        base, _ = summary(also[0])
        out["also_baseline"] = base * scale
        out["also_baseline_name"] = also[1]
        out["also_ratio"] = value / base if base else None
    return out


def print_table(rows, out=sys.stdout):
    """The human table."""
    head = "%-50s %12s %8s %36s %8s  %s" % ("figure", "median", "spread", "baseline", "ratio", "goal")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        base = "-" if r["baseline"] is None else "%.2f %s %s" % (r["baseline"], r["unit"], r["baseline_name"] or "")
        ratio = "-" if r["ratio"] is None else "%.2fx" % r["ratio"]
        also = ""
        if r.get("also_ratio") is not None:
            also = "  (%.2fx %.2f %s %s)" % (r["also_ratio"], r["also_baseline"], r["unit"], r["also_baseline_name"])
        print("%-50s %9.2f %-2s %7.0f%% %36s %8s  %s%s" % (
            r["name"], r["value"], r["unit"], 100 * r["spread"], base, ratio, r["goal"] or "", also), file=out)


def write_json(rows, path, meta=None):
    """Results as JSON, for comparing versions."""
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=1)


def start_server(argv, sock, timeout=30.0):
    """Start a server process and wait (one deadline) for its Unix socket;
    RuntimeError if it exits or is not listening in time."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() >= deadline:
            stop_server(proc)
            raise RuntimeError("%s did not listen on %s" % (argv[0], sock))
        time.sleep(0.005)
    return proc


def stop_server(proc, *paths):
    """Kill a server started by :func:`start_server` and remove its files."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
