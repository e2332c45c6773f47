"""The volume plugin (a qcow2-file SR), beside baselines measured in the
same run:

- a live snapshot of an active 1 GiB volume while a guest writes through
  its export: the guest's longest write across the snapshot, beside its
  longest write over a window of the same length with no snapshot;
- merging a destroyed snapshot holding half the volume into the disk
  above it, offline (a safe ``qemu-img rebase``) and live (``block-stream``
  in the storage daemon), beside ``qemu-img commit`` of the same chain.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from datapath import call
from harness import ROOT, bench_env, row

WRITER = os.path.join(ROOT, "tools", "guest-writer.py")
SIZE_MIB = 1024
MERGE_LIMIT = 600  # seconds: a bound on a hang, not a figure


def fill(image, mib):
    """Half of ``mib`` MiB of data into the image (no daemon has it open)."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 %dM" % (mib // 2), image], check=True,
                   capture_output=True)


def guest_window(nbd, tmp, seconds, during=None):
    """A guest writing through ``nbd`` for ``seconds``; ``during()`` runs
    in the middle. The guest's longest write, in seconds."""
    report = os.path.join(tmp, "guest.json")
    guest = subprocess.Popen([sys.executable, WRITER, nbd, str(SIZE_MIB << 20), os.path.join(tmp, "count"), report],
                             stdout=subprocess.DEVNULL)
    time.sleep(seconds / 2)
    os.kill(guest.pid, signal.SIGUSR1)  # measure from here: the start-up is not the window
    if during is not None:
        during()
    time.sleep(seconds / 2)
    guest.send_signal(signal.SIGTERM)
    guest.wait(timeout=120)
    with open(report) as f:
        return json.load(f)["max_latency"]


def merge_time(sr, key, env, image):
    """Seconds from Volume.destroy of the snapshot ``key`` to the disk's
    chain being one image again."""
    t0 = time.monotonic()
    call("Volume.destroy", {"dbg": "b", "sr": sr, "key": key}, env)
    while time.monotonic() - t0 < MERGE_LIMIT:
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", image], capture_output=True, check=True)
        if "backing-filename" not in json.loads(info.stdout):
            return time.monotonic() - t0
        time.sleep(0.01)
    raise RuntimeError("the merge of %s did not finish within %ds" % (key, MERGE_LIMIT))


def run(args):
    if any(shutil.which(t) is None for t in ("qemu-storage-daemon", "qemu-img", "qemu-io")):
        print("# volume: skipped (needs qemu-storage-daemon, qemu-img, qemu-io: make deps)", file=sys.stderr)
        return []
    repeat = max(3, min(getattr(args, "repeat", 5), 5))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = bench_env(TASK_STATE_DIR=os.path.join(tmp, "state"))
        path = os.path.join(tmp, "sr")
        os.mkdir(path)
        config = call("SR.create", {"dbg": "b", "uuid": "0d8e6a4c-2b4f-4b0e-9c55-6f6a3e8f9dbe",
                                    "configuration": {"path": path}, "name": "bench", "description": ""}, env)
        sr = call("SR.attach", {"dbg": "b", "configuration": config}, env)
        disk = call("Volume.create", {"dbg": "b", "sr": sr, "name": "d", "description": "", "size": SIZE_MIB << 20,
                                      "sharable": False}, env)
        uri, image = disk["uri"][0], disk["uri"][0][len("qcow2+file://"):]
        fill(image, SIZE_MIB)
        dp = {"dbg": "b", "uri": uri, "domain": "5"}
        nbd = [i for k, i in call("Datapath.attach", dp, env)["implementations"] if k == "Nbd"][0]["uri"]
        call("Datapath.activate", dp, env)
        quiet, snapped, snaps = [], [], []
        try:
            for _ in range(repeat):
                quiet.append(guest_window(nbd, tmp, 2.0))
                snaps.append(None)

                def snapshot():
                    snaps[-1] = call("Volume.snapshot", {"dbg": "b", "sr": sr, "key": disk["key"]}, env)["key"]

                snapped.append(guest_window(nbd, tmp, 2.0, snapshot))
                merge_time(sr, snaps[-1], env, image)  # live: keeps the chain short between rounds
            live = []
            for _ in range(repeat):
                fill_key = call("Volume.snapshot", {"dbg": "b", "sr": sr, "key": disk["key"]}, env)["key"]
                live.append(merge_time(sr, fill_key, env, image))
        finally:
            call("Datapath.deactivate", dp, env)
            call("Datapath.detach", dp, env)
        rows.append(row("guest's longest write across a live snapshot", snapped, baseline=quiet,
                        baseline_name="same window, no snapshot"))
        # Offline merges and their baseline, interleaved: a fresh chain each
        # time (a base holding half the disk under an empty top).
        offline, commit = [], []
        for _ in range(repeat):
            snap = call("Volume.snapshot", {"dbg": "b", "sr": sr, "key": disk["key"]}, env)["key"]
            with open(os.path.join(path, ".sr", "volumes", snap + ".json")) as f:
                base = os.path.join(path, json.load(f)["image"])
            # The baseline moves the same data: a copy of the snapshot's image
            # committed into an empty image under it.
            copy_base, copy_top = os.path.join(tmp, "b.qcow2"), os.path.join(tmp, "t.qcow2")
            shutil.copyfile(base, copy_top)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", copy_base, str(SIZE_MIB << 20)], check=True)
            subprocess.run(["qemu-img", "rebase", "-q", "-u", "-b", copy_base, "-F", "qcow2", copy_top], check=True)
            offline.append(merge_time(sr, snap, env, image))
            t0 = time.monotonic()
            subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", copy_top], check=True)
            commit.append(time.monotonic() - t0)
            os.unlink(copy_base)
            os.unlink(copy_top)
        data = "%d MiB" % (SIZE_MIB // 2)
        rows.append(row("merge a destroyed snapshot (%s), offline" % data, offline, unit="s", scale=1,
                        baseline=commit, baseline_name="qemu-img commit"))
        rows.append(row("merge the live disk's last snapshot, live (block-stream)", live, unit="s", scale=1,
                        baseline=commit, baseline_name="qemu-img commit"))
        call("Volume.destroy", {"dbg": "b", "sr": sr, "key": disk["key"]}, env)
    return rows
