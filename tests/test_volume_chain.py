"""Chains of a qcow2-file SR under the toolstack's habits and under
crashes: a nightly snapshot-and-destroy never grows a chain, and a kill
(-9) of a caller, a merging task or the storage daemon at random points
of a snapshot, clone, merge or resize leaves a valid chain and every
acknowledged write."""

import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import BIN, run_bin
from test_volume import (GUEST, MiB, call, chain_length, create_sr, holds, pytestmark, sr_dir, stray_files, valid,
                         volumes)
from mirroring import wait_for
from xapi_storage_tasks.nbd.protocol import Client

__all__ = ["pytestmark", "sr_dir", "volumes"]  # shared


def attach(uri, domain=GUEST):
    answer = run_bin("Datapath.attach", {"dbg": "t", "uri": uri, "domain": domain})
    assert answer.returncode == 0, answer.stdout
    return [i for k, i in answer.json["implementations"] if k == "Nbd"][0]["uri"]


def detach(uri, domain=GUEST):
    assert run_bin("Datapath.detach", {"dbg": "t", "uri": uri, "domain": domain}).stdout == b"null\n"


def write(nbd, offset, byte, length=4096):
    with Client.connect(nbd) as c:
        c.pwrite(bytes([byte]) * length, offset)
        c.drain()
        c.flush()


def merging(image):
    """An offline merge is under way: a qemu-img rebase of the disk's images."""
    stem = os.path.basename(os.path.realpath(image)).split(".")[0]
    return subprocess.run(["pgrep", "-f", "qemu-img rebase.*" + stem], capture_output=True).returncode == 0


def started(state_dir, task, victim, image):
    """The merging task has begun its merge (its log says so), and an
    offline one has its qemu-img running."""
    try:
        with open(state_dir / "logs" / (task + ".log")) as f:
            begun = "merging image" in f.read()
    except FileNotFoundError:
        begun = False
    return begun and (victim == "daemon" or merging(image))


def merged(sr_dir):
    """No merging task left running, nothing left to merge."""
    tasks = run_bin("Task.ls", {"dbg": "t"}).json
    pending = [t for t in tasks if run_bin("Task.stat", {"dbg": "t", "id": t}).json["state"][0] == "Pending"]
    return not pending and not stray_files(sr_dir)


@pytest.mark.parametrize("served", [True, False])
def test_nightly_snapshot_and_destroy_never_grows_the_chain(state_dir, volumes, sr_dir, served):
    sr = create_sr(sr_dir)
    disk = call("Volume.create", sr=sr, name="d", description="", size=32 * MiB, sharable=False)
    uri, image = disk["uri"][0], disk["uri"][0][len("qcow2+file://"):]
    nbd = attach(uri) if served else None
    for night in range(6):
        if nbd:
            write(nbd, night * MiB, 0x30 + night)
        else:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %d 4k" % (0x30 + night, night * MiB), image],
                           check=True, capture_output=True)
        snap = call("Volume.snapshot", sr=sr, key=disk["key"])
        call("Volume.set", sr=sr, key=snap["key"], k="is_a_snapshot", v="true")
        call("Volume.destroy", sr=sr, key=snap["key"])  # the backup is done with it
        wait_for(lambda: chain_length(image) == 1 and merged(sr_dir), timeout=60, what="night %d's merge" % night)
    for night in range(6):  # every night's write is still there
        assert holds(image, night * MiB, 4096, 0x30 + night)
    assert [v["key"] for v in call("SR.ls", sr=sr)] == [disk["key"]]
    if nbd:
        detach(uri)
    call("Volume.destroy", sr=sr, key=disk["key"])
    call("SR.destroy", sr=sr)


@pytest.mark.parametrize("victim", ["task", "daemon"])
def test_merges_killed_at_random_points_leave_valid_chains_and_finish_later(state_dir, volumes, sr_dir, victim):
    sr = create_sr(sr_dir)
    disk = call("Volume.create", sr=sr, name="d", description="", size=256 * MiB, sharable=False)
    uri, image = disk["uri"][0], disk["uri"][0][len("qcow2+file://"):]
    rng = random.Random(3)
    landed = 0
    for trial in range(6):
        nbd = attach(uri) if victim == "daemon" else None
        # A snapshot with plenty of data under the live disk: its merge takes a while.
        if nbd:
            write(nbd, 0, 7 + trial, 200 * MiB)
        else:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d 0 200M" % (7 + trial), image], check=True,
                           capture_output=True)
        snap = call("Volume.snapshot", sr=sr, key=disk["key"])
        if nbd:
            write(nbd, 250 * MiB, 100 + trial)
        else:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d 250M 4k" % (100 + trial), image], check=True,
                           capture_output=True)
        call("Volume.destroy", sr=sr, key=snap["key"])
        tasks = run_bin("Task.ls", {"dbg": "t"}).json
        task = tasks[-1]
        from xapi_storage_tasks.tasks.store import Store

        with Store(str(state_dir)) as store:
            # Kill while the merge really runs: its qemu-img (offline); or,
            # live, once the task has started the merge and before it ends
            # (the daemon's QMP is the task's to poll, not the test's).
            deadline = time.monotonic() + 10
            while not started(state_dir, task, victim, image) and time.monotonic() < deadline \
                    and not store.get(task).state.terminal:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.02))
            running = not store.get(task).state.terminal and (victim == "daemon" or merging(image))
            if victim == "task" and running:
                os.kill(store.get(task).worker["pid"], signal.SIGKILL)
            elif victim == "daemon":
                (qsd,) = [json.loads(p.read_text())["identity"]["pid"] for p in volumes.glob("*.qsd")]
                os.kill(qsd, signal.SIGKILL)
        landed += running
        wait_for(lambda t=task: run_bin("Task.stat", {"dbg": "t", "id": t}).json["state"][0] != "Pending", timeout=60,
                 what="the merging task to end")
        if nbd:  # the daemon is dead: the next call reports it and forgets it
            run_bin("Datapath.detach", {"dbg": "t", "uri": uri, "domain": GUEST})
        # Valid whatever the kill hit; the next call on the SR settles the
        # merge (a daemon killed between its header change and its flush
        # leaves the child standing on nothing until then) and merges again.
        assert valid(image), trial
        call("SR.attach", configuration={"path": sr_dir})
        wait_for(lambda: chain_length(image) == 1 and merged(sr_dir), timeout=120, what="the merge to finish")
        assert holds(image, 0, 4096, 7 + trial) and holds(image, 250 * MiB, 4096, 100 + trial), trial
    assert landed >= 3, "too few kills landed while a merge ran to mean anything"
    call("Volume.destroy", sr=sr, key=disk["key"])
    call("SR.destroy", sr=sr)


@pytest.mark.parametrize("method", ["Volume.clone", "Volume.resize", "Volume.create"])
def test_calls_killed_at_random_points_leave_valid_chains(state_dir, volumes, sr_dir, method):
    sr = create_sr(sr_dir)
    disk = call("Volume.create", sr=sr, name="d", description="", size=16 * MiB, sharable=False)
    image = disk["uri"][0][len("qcow2+file://"):]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 4k", image], check=True, capture_output=True)
    rng = random.Random(11)
    landed = 0
    for trial in range(10):
        params = {"dbg": "t", "sr": sr, "key": disk["key"]}
        if method == "Volume.resize":
            params["new_size"] = (17 + trial) * MiB
        elif method == "Volume.create":
            params = {"dbg": "t", "sr": sr, "name": "n", "description": "", "size": MiB, "sharable": False}
        proc = subprocess.Popen([os.path.join(BIN, method), "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdin.write(json.dumps(params).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        landed += proc.wait() == -signal.SIGKILL
        call("SR.attach", configuration={"path": sr_dir})  # repairs
        assert stray_files(sr_dir) == [], trial
        for volume in call("SR.ls", sr=sr):
            path = volume["uri"][0][len("qcow2+file://"):]
            assert valid(path)
        assert holds(image, 0, 4096, 5), "trial %d: the disk lost its data" % trial
    assert landed >= 3, "too few kills landed midway to mean anything"
