#!/usr/bin/env python3
"""One benchmark command: every figure beside its baseline, measured in the
same run on the same machine. ``python3 bench/run.py --help``."""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

SUITES = ("calls", "workers", "bench_copy", "bench_daemon", "datapath", "polling", "volume")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", default=list(SUITES), help="which of %s (default: all)" % ", ".join(SUITES))
    parser.add_argument("--repeat", type=int, default=15, help="runs per figure (default 15)")
    parser.add_argument("--tasks", type=int, default=100_000, help="largest store for Task.ls/stat scaling")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the sparse copy image in GiB (half data)")
    parser.add_argument("--mirror-mib", type=int, default=512, help="size of the mirrored image in MiB (half data)")
    parser.add_argument("--poll-gib", type=float, default=1.0, help="size of the image mirrored while polling, GiB (half data)")
    parser.add_argument("--poll-runs", type=int, default=3, help="mirrors per polling mode")
    parser.add_argument("--rate", default="400M", help="the polling bench's target rate (nbdkit's rate filter)")
    parser.add_argument("--json", default=os.path.join(harness.ROOT, "bench", "results", "latest.json"),
                        help="where to write the results")
    args = parser.parse_args()
    harness.compile_tree([harness.host_python()])
    rows = []
    for name in args.suites:
        module = __import__(name)
        t0 = time.monotonic()
        got = module.run(args)
        print("# %s: %d figures in %.1fs" % (name, len(got), time.monotonic() - t0), file=sys.stderr)
        rows.extend(got)
    harness.print_table(rows)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    harness.write_json(rows, args.json, {"python": sys.version.split()[0], "host_python": harness.host_python(),
                                         "machine": platform.machine(),
                                         "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print("results written to %s" % os.path.relpath(args.json))


if __name__ == "__main__":
    main()
