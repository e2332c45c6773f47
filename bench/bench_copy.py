"""Copy throughput and worker memory.

One sparse image (``--copy-gib`` GiB, half of it data in 64 MiB extents),
page cache warm. Figures, each beside the baselines measured in the same
run:
- file -> new file with ``Data.copy`` vs ``cp --sparse=always`` and
  ``qemu-img convert -n`` (goal: no slower than the faster of the two);
- file -> NBD (qemu-nbd on a Unix socket) vs ``nbdcopy`` to the same
  server (goal: no slower than nbdcopy), with one connection (qemu-nbd's
  default) and with multi-conn (``--shared=4``: both sides use four).
  ``Data.copy`` flushes the target before it reports Completed, so each
  baseline is timed with the same durability (``sync FILE``, ``nbdcopy
  --flush``); the Data.copy time runs from calling the executable to
  seeing the task Completed.
- the worker's peak RSS (goal: under 40 MiB), beside ``python3 -c pass``.

Run by ``bench/run.py`` (suite ``bench_copy``), or alone:
``python3 bench/bench_copy.py --help``. (Named so that it never shadows
the standard library's ``copy`` module.)
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from harness import BIN, SRC, bench_env, row, start_server, stop_server

sys.path.insert(0, SRC)

from xapi_storage_tasks.tasks.state import Completed  # noqa: E402
from xapi_storage_tasks.tasks.store import Store  # noqa: E402

MiB = 1 << 20


def make_image(path, size, data):
    """A sparse image of ``size`` bytes holding ``data`` bytes of
    non-zero data in 64 MiB extents spread evenly."""
    chunk = os.urandom(MiB)
    extents = max(1, data // (64 * MiB))
    stride = size // extents
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(extents):
            f.seek(i * stride)
            for _ in range(64):
                f.write(chunk)


def warm(path):
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def timed(argv, env=None):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def data_copy(uri, remote, env, state):
    """Seconds from calling Data.copy to its task being Completed, and the
    worker's peak RSS in KiB (from its log line)."""
    params = json.dumps({"dbg": "bench", "uri": uri, "domain": "0", "remote": remote, "blocklist": None})
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(BIN, "Data.copy"), "--json"], input=params.encode(),
                         capture_output=True, env=env, check=True)
    task_id = json.loads(out.stdout)[1]
    with Store(state) as store:
        while True:
            task = store.get(task_id)
            if task.state.terminal:
                break
            time.sleep(0.01)  # polling must not take the CPU from the copy it measures
    elapsed = time.perf_counter() - t0
    if not isinstance(task.state, Completed):
        raise RuntimeError("copy failed: %r" % (task.state,))
    with open(os.path.join(state, "logs", task_id + ".log")) as f:
        log = f.read()
    peak = int(re.search(r"peak RSS (\d+) KiB", log).group(1))  # logged before Completed
    return elapsed, peak


class NbdServer:
    """qemu-nbd serving one raw file on a Unix socket."""

    def __init__(self, tmp, image, shared=1):
        self.sock = os.path.join(tmp, "nbd%d.sock" % shared)
        self.proc = start_server(["qemu-nbd", "--socket=" + self.sock, "--format=raw", "--export-name=bench", "--persistent",
                                  "--cache=writeback", "--discard=unmap", "--shared=%d" % shared, image], self.sock)

    def stop(self):
        stop_server(self.proc, self.sock)


def run(args):
    if not all(shutil.which(t) for t in ("qemu-img", "qemu-nbd", "nbdcopy")):
        print("# copy: qemu-img, qemu-nbd and nbdcopy are needed (make deps)", file=sys.stderr)
        return []
    size = int(args.copy_gib * (1 << 30))
    nbd_only = getattr(args, "nbd_only", False)
    repeat = args.repeat if nbd_only else max(3, args.repeat // 5)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        state = os.path.join(tmp, "state")
        env = bench_env(TASK_STATE_DIR=state)
        src = os.path.join(tmp, "src.img")
        make_image(src, size, size // 2)
        warm(src)
        dst = os.path.join(tmp, "dst.img")
        peaks = []
        if not nbd_only:
            rows.extend(file_copies(args, env, state, src, dst, size, repeat, peaks))
        rows.extend(nbd_copies(env, state, tmp, src, size, repeat, peaks))
        base_rss = []
        probe = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, check=True)
            base_rss.append(int(out.stdout))
        rows.append(row("worker peak RSS during copies", peaks, unit="MiB", scale=1 / 1024, baseline=base_rss,
                        baseline_name="python -c", goal="< 40 MiB"))
    return rows


def file_copies(args, env, state, src, dst, size, repeat, peaks):
    """file -> new file, beside cp and qemu-img (each with a final sync)."""
    rows = []

    def fresh(path=dst):
        if os.path.exists(path):
            os.unlink(path)

    ours, cp, qemu = [], [], []
    for _ in range(repeat):
        fresh()
        secs, peak = data_copy("file://" + src, "file://" + dst, env, state)
        ours.append(secs)
        peaks.append(peak)
        fresh()
        # The baselines get the same durability as Data.copy: fsync at the end.
        cp.append(timed(["sh", "-c", 'cp --sparse=always "$0" "$1" && sync "$1"', src, dst]))
        fresh()
        subprocess.run(["truncate", "-s", str(size), dst], check=True)
        qemu.append(timed(["sh", "-c", 'qemu-img convert -n -f raw -O raw "$0" "$1" && sync "$1"', src, dst]))
    fastest = cp if sorted(cp)[len(cp) // 2] <= sorted(qemu)[len(qemu) // 2] else qemu
    name = "cp+sync" if fastest is cp else "qemu-img+sync"
    rows.append(row("copy file -> file, %.1f GiB sparse" % args.copy_gib, ours, unit="s", scale=1,
                    baseline=fastest, baseline_name=name, goal="<= 1x"))
    rows.append(row("  cp --sparse=always && sync", cp, unit="s", scale=1))
    rows.append(row("  qemu-img convert -n && sync", qemu, unit="s", scale=1))
    fresh()
    return rows


def nbd_copies(env, state, tmp, src, size, repeat, peaks):
    """file -> qemu-nbd over a Unix socket, beside nbdcopy --flush, in
    alternation so that both see the same machine load: one connection
    (qemu-nbd's default), then a server allowing four (multi-conn)."""
    rows = []
    target = os.path.join(tmp, "nbd-target.img")
    subprocess.run(["truncate", "-s", str(size), target], check=True)
    for shared, name in ((1, "copy file -> NBD (qemu-nbd, unix socket)"),
                         (4, "copy file -> NBD, multi-conn (--shared=4)")):
        server = NbdServer(tmp, target, shared)
        try:
            uri = "nbd+unix:///bench?socket=" + server.sock
            nbd_ours, nbd_base = [], []
            # Untimed first: the first writes allocate the target file's blocks,
            # a cost only the first copy would pay.
            timed(["nbdcopy", "--flush", src, uri])
            for i in range(repeat):
                # Alternate who goes first, so neither always follows the other's
                # writeback.
                if i % 2:
                    nbd_base.append(timed(["nbdcopy", "--flush", src, uri]))
                secs, peak = data_copy("file://" + src, uri, env, state)
                nbd_ours.append(secs)
                peaks.append(peak)
                if not i % 2:
                    nbd_base.append(timed(["nbdcopy", "--flush", src, uri]))
        finally:
            server.stop()
        rows.append(row(name, nbd_ours, unit="s", scale=1, baseline=nbd_base, baseline_name="nbdcopy --flush",
                        goal="<= 1x"))
    return rows


def main():
    from harness import compile_tree, print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="runs per figure (file copies: a fifth of it, at least 3)")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the sparse image in GiB (half data)")
    parser.add_argument("--nbd-only", action="store_true", help="only file -> NBD, --repeat times")
    args = parser.parse_args()
    compile_tree()
    print_table(run(args))


if __name__ == "__main__":
    main()
