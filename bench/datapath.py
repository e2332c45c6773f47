"""The datapath: per-call costs and mirror throughput, each beside a
baseline measured in the same run.

Figures:
- ``Data.stat`` of a running (ready) mirror, beside ``Task.stat`` of the
  same task (goal: at most 1x: the toolstack polls it back to back);
- mirror sync throughput (``Data.mirror`` until ``complete``) to a local
  qemu-nbd over a Unix socket, beside ``qemu-img convert`` of the same
  image to the same kind of target (goal: at most 1.25x), without and with
  a guest writing through the export all along. With a guest writing, the
  fair baseline is ``qemu-img convert`` with the same guest writing to the
  source at the same time (it competes for the same CPUs); the ratio to
  the quiet convert is printed too;
- the guest's write rate while an active (write-blocking) mirror runs,
  beside its rate with no mirror: what active mirroring costs the guest;
- ``Datapath.attach`` + ``activate`` (the daemon started and the block
  device made) and ``deactivate`` + ``detach``, beside a bare interpreter
  start (``python3 -c pass``);
- guest I/O through the volume's block device (the device attach answers,
  made as the host's kind: ``TASK_BLOCK_DEVICE``), beside the same I/O on
  an image file directly: fio, O_DIRECT, libaio, iodepth 16, 4 KiB random
  writes (goal: at least 0.5x) and 1 MiB sequential writes (goal: at least
  0.8x), interleaved runs on equally preallocated images.

``python3 bench/run.py datapath [--mirror-mib N]``
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from harness import BIN, ROOT, bench_env, row, start_server, stop_server, time_command

WRITER = os.path.join(ROOT, "tools", "guest-writer.py")


def call(method, params, env):
    proc = subprocess.run([sys.executable, os.path.join(BIN, method), "--json"], input=json.dumps(params).encode(),
                          capture_output=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError("%s failed: %s" % (method, proc.stdout.decode()[-500:]))
    return json.loads(proc.stdout)


def make_image(path, mib):
    """A raw image of ``mib`` MiB, the first half random data."""
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(mib // 2):
            f.write(chunk)
        f.truncate(mib << 20)


class Target:
    """qemu-nbd serving a fresh empty image (one connection, as the
    toolstack's proxy)."""

    def __init__(self, tmp, mib, name):
        self.image, self.sock = os.path.join(tmp, name + ".raw"), os.path.join(tmp, name + ".sock")
        with open(self.image, "wb") as f:
            f.truncate(mib << 20)
        self.proc = start_server(["qemu-nbd", "-f", "raw", "--socket", self.sock, "-x", "dst", self.image], self.sock)
        self.uri = "nbd+unix:///dst?socket=" + self.sock

    def close(self):
        stop_server(self.proc, self.image, self.sock)


class Guest:
    def __init__(self, nbd_uri, mib, tmp):
        self.count = os.path.join(tmp, "writes")
        self.proc = subprocess.Popen([sys.executable, WRITER, nbd_uri, str(mib << 20), self.count], stdout=subprocess.PIPE)

    def writes(self):
        try:
            with open(self.count) as f:
                return int(f.read() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def rate(self, seconds):
        """Acknowledged writes per second over ``seconds``."""
        while self.writes() == 0:
            time.sleep(0.01)
        n0, t0 = self.writes(), time.monotonic()
        time.sleep(seconds)
        return (self.writes() - n0) / (time.monotonic() - t0)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=60)


def sync_once(uri, tmp, mib, env, state):
    """Seconds from Data.mirror to ready (read from the task file every
    5 ms, so polling steals no CPU from the sync), then a drain."""
    target = Target(tmp, mib, "mirror")
    try:
        t0 = time.perf_counter()
        op = call("Data.mirror", {"dbg": "b", "uri": uri, "domain": "7", "remote": target.uri}, env)
        task_file = os.path.join(state, "tasks", op[1] + ".json")
        while True:
            with open(task_file) as f:
                record = json.load(f)
            if record["operation"].get("ready"):
                break
            if record["state"][0] != "Pending":
                raise RuntimeError("mirror failed: %s" % record["state"])
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        call("Datapath.deactivate", {"dbg": "b", "uri": uri, "domain": "7"}, env)
        call("Datapath.activate", {"dbg": "b", "uri": uri, "domain": "7"}, env)
        return elapsed
    finally:
        target.close()


def convert_once(src, tmp, mib, shared=False):
    """Seconds for ``qemu-img convert`` of ``src`` to a fresh qemu-nbd
    target; ``shared`` reads the image while the storage daemon holds it
    (``-U``: a guest is writing through the daemon meanwhile)."""
    target = Target(tmp, mib, "convert")
    try:
        t0 = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-n"] + (["-U"] if shared else []) + ["-f", "raw", "-O", "raw", src, target.uri],
                       check=True)
        return time.perf_counter() - t0
    finally:
        target.close()


FIO_SECONDS = 5
GUEST_IO = (("4 KiB random writes", "randwrite", "4k", ">= 0.5x"), ("1 MiB sequential writes", "write", "1M", ">= 0.8x"))


def fio_mib_s(target, rw, bs, mib):
    """MiB/s of one fio run of ``rw`` in blocks of ``bs`` on ``target``."""
    proc = subprocess.run(["fio", "--name=guest", "--filename=" + target, "--rw=" + rw, "--bs=" + bs, "--direct=1",
                           "--ioengine=libaio", "--iodepth=16", "--size=%dM" % mib, "--time_based",
                           "--runtime=%d" % FIO_SECONDS, "--output-format=json"],
                          capture_output=True, check=True, timeout=FIO_SECONDS + 60)
    return json.loads(proc.stdout)["jobs"][0]["write"]["bw"] / 1024.0


def guest_io(tmp, mib, env):
    """Rows: guest writes through the block device vs on a file directly."""
    if shutil.which("fio") is None:
        print("# datapath: guest I/O skipped (needs fio: make deps)", file=sys.stderr)
        return []
    images = []
    for name in ("guest.raw", "direct.raw"):
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, mib << 20)  # both allocated alike: no first-write allocation in either
        images.append(path)
    dp = {"dbg": "b", "uri": "raw+file://" + images[0], "domain": "5"}
    device = call("Datapath.attach", dp, env)["implementations"][1][1]["path"]
    call("Datapath.activate", dp, env)
    kind = json.loads(call("Plugin.diagnostics", {"dbg": "b"}, env))["block_device"]
    rows = []
    try:
        for name, rw, bs, goal in GUEST_IO:
            through, direct = [], []
            for _ in range(3):  # interleaved, so both see the same machine
                through.append(fio_mib_s(device, rw, bs, mib))
                direct.append(fio_mib_s(images[1], rw, bs, mib))
            rows.append(row("guest %s, %s device" % (name, kind), through, unit="MiB/s", scale=1, baseline=direct,
                            baseline_name="image file, O_DIRECT", goal=goal))
    finally:
        call("Datapath.deactivate", dp, env)
        call("Datapath.detach", dp, env)
    return rows


def run(args):
    if any(shutil.which(t) is None for t in ("qemu-storage-daemon", "qemu-nbd", "qemu-img")):
        print("# datapath: skipped (needs qemu-storage-daemon, qemu-nbd, qemu-img: make deps)", file=sys.stderr)
        return []
    rows = []
    py = sys.executable
    n = args.repeat
    mib = getattr(args, "mirror_mib", 512)
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        env = bench_env(TASK_STATE_DIR=state)
        src = os.path.join(tmp, "disk.raw")
        make_image(src, mib)
        uri = "raw+file://" + src
        dp = {"dbg": "b", "uri": uri, "domain": "7"}
        base = time_command([py, "-c", "pass"], env=env, repeat=n)

        # Attach + activate, deactivate + detach: a daemon started and stopped each time.
        up, down = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            call("Datapath.attach", dp, env)
            call("Datapath.activate", dp, env)
            up.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            call("Datapath.deactivate", dp, env)
            call("Datapath.detach", dp, env)
            down.append(time.perf_counter() - t0)
        two = [2 * b for b in base]
        rows.append(row("Datapath.attach + activate (daemon, device)", up, baseline=two,
                        baseline_name="2x python -c pass"))
        rows.append(row("Datapath.deactivate + detach", down, baseline=two, baseline_name="2x python -c pass"))

        rows += guest_io(tmp, 256, env)

        # Sync throughput, without and with a guest writing (the baseline
        # first: the storage daemon holds the image's lock).
        converts = [convert_once(src, tmp, mib) for _ in range(3)]
        answer = call("Datapath.attach", dp, env)
        call("Datapath.activate", dp, env)
        nbd_uri = answer["implementations"][-1][1]["uri"]
        syncs = [sync_once(uri, tmp, mib, env, state) for _ in range(3)]
        rows.append(row("mirror sync %d MiB (half data)" % mib, syncs, unit="s", scale=1, baseline=converts,
                        baseline_name="qemu-img convert", goal="<= 1.25x"))
        guest = None
        try:
            guest = Guest(nbd_uri, mib, tmp)
            alone = [guest.rate(1.0) for _ in range(3)]
            busy, busy_converts = [], []
            for _ in range(3):  # interleaved, so both see the same machine and the same guest
                busy_converts.append(convert_once(src, tmp, mib, shared=True))
                busy.append(sync_once(uri, tmp, mib, env, state))
            rows.append(row("mirror sync, guest writing", busy, unit="s", scale=1, baseline=busy_converts,
                            baseline_name="convert, guest writing", goal="<= 1.25x"))
            rows.append(row("mirror sync, guest writing", busy, unit="s", scale=1, baseline=converts,
                            baseline_name="quiet qemu-img convert"))
            target = Target(tmp, mib, "ready")
            try:
                op = call("Data.mirror", {"dbg": "b", "uri": uri, "domain": "7", "remote": target.uri}, env)
                while not call("Data.stat", {"dbg": "b", "operation": op}, env)["complete"]:
                    pass
                mirrored = [guest.rate(1.0) for _ in range(3)]
                rows.append(row("guest writes/s, active mirror ready", mirrored, unit="w/s", scale=1, baseline=alone,
                                baseline_name="no mirror"))
                guest.stop()
                guest = None
                # Data.stat of the running (ready) mirror vs Task.stat of its task.
                stat_in = json.dumps({"dbg": "b", "operation": op}).encode()
                env = dict(env, TASK_STAT_WAIT="0.001")  # each answer at once, as an isolated poll's (bench/polling.py paces)
                task_in = json.dumps({"dbg": "b", "id": op[1]}).encode()
                task_stat, data_stat = [], []
                for _ in range(n):  # interleaved, so both see the same machine
                    task_stat += time_command([py, os.path.join(BIN, "Task.stat"), "--json"], task_in, env, 1)
                    data_stat += time_command([py, os.path.join(BIN, "Data.stat"), "--json"], stat_in, env, 1)
                rows.append(row("Data.stat (running mirror)", data_stat, baseline=task_stat, baseline_name="Task.stat",
                                goal="<= 1x"))
                rows.append(row("Task.stat (running mirror)", task_stat, baseline=base, baseline_name="python -c pass"))
                call("Datapath.deactivate", dp, env)
            finally:
                target.close()
        finally:
            if guest is not None:
                guest.stop()
            call("Datapath.detach", dp, env)
    return rows


if __name__ == "__main__":
    import argparse

    from harness import compile_tree, print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--mirror-mib", type=int, default=512)
    compile_tree()
    print_table(run(parser.parse_args()))
