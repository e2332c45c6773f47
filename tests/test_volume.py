"""The volume plugin (SR type qcow2-file) through its real executables,
in the toolstack's order: an SR created, volumes created, served to a
guest by the datapath, snapshotted and cloned while the guest writes,
snapshots destroyed and merged, resized online, scanned, destroyed."""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, kill_leftover_daemons, run_bin
from mirroring import Guest, wait_for
from xapi_storage_tasks.nbd.protocol import Client

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("qemu-storage-daemon", "qemu-img")),
                                reason="needs qemu-storage-daemon and qemu-img (make deps)")

MiB = 1 << 20
GUEST = "5"
MARK = 48 * MiB  # beyond the guest writer's range (its first 32 MiB)


@pytest.fixture
def sr_dir(tmp_path):
    path = tmp_path / "sr"
    path.mkdir()
    return str(path)


@pytest.fixture
def volumes(state_dir):
    yield state_dir / "volumes"
    kill_leftover_daemons(str(state_dir / "volumes"))


def call(method, **params):
    res = run_bin(method, dict(dbg="t", **params))
    assert res.returncode == 0, (method, res.stdout, res.stderr)
    return res.json


def fails(method, **params):
    res = run_bin(method, dict(dbg="t", **params))
    assert res.returncode != 0, (method, res.stdout)
    return res.error_name, res.json["params"][1]


def create_sr(sr_dir):
    """xe sr-create: Plugin.Query, SR.create, then per host SR.attach and SR.stat."""
    config = call("SR.create", uuid="0d8e6a4c-2b4f-4b0e-9c55-6f6a3e8f9d01", configuration={"path": sr_dir},
                  name="vms", description="test SR")
    sr = call("SR.attach", configuration=config)
    assert call("SR.attach", configuration=config) == sr  # idempotent
    stat = call("SR.stat", sr=sr)
    assert stat["health"] == ["Healthy", ""] and stat["name"] == "vms" and stat["total_space"] > 0
    return sr


def read(nbd_uri, offset, length):
    with Client.connect(nbd_uri) as c:
        return c.pread(length, offset)


def holds(image, offset, length, byte):
    """The image (through its chain) holds ``length`` bytes of ``byte`` at
    ``offset``, as qemu-io itself reads it (no daemon of ours)."""
    out = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P %d %d %d" % (byte, offset, length), image],
                         capture_output=True, text=True)
    assert "read %d/%d bytes" % (length, length) in out.stdout, out  # read whole; exit 1 if the pattern differs
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


def stray_files(sr_dir):
    """Files in the SR that no record names (a link counts if its record is there)."""
    records = [json.loads(p.read_text()) for p in (Path(sr_dir) / ".sr" / "volumes").glob("*.json")]
    named = {r["image"] for r in records} | {r["uuid"] + ".qcow2" for r in records if r["kind"] == "disk"}
    return sorted(set(n for n in os.listdir(sr_dir) if n != ".sr") - named)


def valid(image):
    """qemu-img check finds no corruption in the image's chain (clusters a
    killed writer leaked only waste space: exit status 3)."""
    return subprocess.run(["qemu-img", "check", "-U", image], capture_output=True).returncode in (0, 3)


def chain_length(image):
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
                                     capture_output=True, check=True).stdout)
    return len(info)


def test_plugin_query_in_the_volume_directory_names_the_sr_type(state_dir, tmp_path):
    directory = tmp_path / "org.xen.xapi.storage.qcow2-file"
    directory.mkdir()
    os.symlink(os.path.join(BIN, "dispatch"), directory / "Plugin.Query")
    res = subprocess.run([str(directory / "Plugin.Query"), "--json"], input=b'{"dbg": "x"}', capture_output=True)
    answer = json.loads(res.stdout)
    assert answer["plugin"] == "qcow2-file" and answer["required_api_version"] == "5.0"
    assert "VDI_MIRROR" in answer["features"] and "VDI_RESIZE_ONLINE" not in answer["features"]
    assert "path" in answer["configuration"]


def test_a_vm_lifecycle_as_the_toolstack_drives_it(state_dir, volumes, sr_dir, tmp_path):
    sr = create_sr(sr_dir)
    # vdi-create, then Volume.set vdi-type.
    disk = call("Volume.create", sr=sr, name="root", description="the root disk", size=64 * MiB + 1, sharable=False)
    assert disk["virtual_size"] == 64 * MiB + 512 and disk["read_write"] is True
    key = disk["key"]
    assert call("Volume.set", sr=sr, key=key, k="vdi-type", v="user") is None
    uri = call("Volume.stat", sr=sr, key=key)["uri"][0]
    assert uri.startswith("qcow2+file:///")
    # VM start: the datapath serves the URI Volume.stat answered.
    answer = run_bin("Datapath.attach", {"dbg": "t", "uri": uri, "domain": GUEST}).json
    nbd = [impl for kind, impl in answer["implementations"] if kind == "Nbd"][0]["uri"]
    assert run_bin("Datapath.activate", {"dbg": "t", "uri": uri, "domain": GUEST}).stdout == b"null\n"
    with Client.connect(nbd) as c:
        c.pwrite(b"A" * 4096, MARK)
        c.drain()
        c.flush()
    guest = Guest(nbd, tmp_path, report=True)
    wait_for(lambda: guest.writes() >= 20, what="the guest to write")
    # vdi-snapshot while the guest writes: no pause around it.
    snap = call("Volume.snapshot", sr=sr, key=key)
    assert snap["read_write"] is False and snap["key"] != key
    for k, v in (("is_a_snapshot", "true"), ("snapshot_of", key), ("snapshot_time", "20261205T10:00:00Z")):
        call("Volume.set", sr=sr, key=snap["key"], k=k, v=v)
    with Client.connect(nbd) as c:  # after the snapshot: the live disk only
        c.pwrite(b"B" * 4096, MARK)
        c.drain()
    assert call("Volume.stat", sr=sr, key=key)["uri"][0] == uri  # the disk's URI never changes
    snap_image = call("Volume.stat", sr=sr, key=snap["key"])["uri"][0][len("qcow2+file://"):]
    assert holds(snap_image, MARK, 4096, ord("A"))  # the content at the call
    assert read(nbd, MARK, 4096) == b"B" * 4096  # the live disk has every later write
    # vdi-clone of the snapshot: a writable volume on its content, served.
    clone = call("Volume.clone", sr=sr, key=snap["key"])
    assert clone["read_write"] is True and clone["keys"] == {}
    clone_uri = clone["uri"][0]
    clone_nbd = run_bin("Datapath.attach", {"dbg": "t", "uri": clone_uri, "domain": "6"}).json
    clone_nbd = [impl for kind, impl in clone_nbd["implementations"] if kind == "Nbd"][0]["uri"]
    assert read(clone_nbd, MARK, 4096) == b"A" * 4096
    assert run_bin("Datapath.detach", {"dbg": "t", "uri": clone_uri, "domain": "6"}).stdout == b"null\n"
    call("Volume.destroy", sr=sr, key=clone["key"])
    # The snapshot destroyed: merged into the live disk, chain back to one.
    live_image = uri[len("qcow2+file://"):]
    assert chain_length(live_image) == 2
    call("Volume.destroy", sr=sr, key=snap["key"])
    wait_for(lambda: chain_length(live_image) == 1, timeout=60, what="the snapshot to be merged")
    wait_for(lambda: not os.path.exists(snap_image), what="the merged image to go")
    assert read(nbd, MARK, 4096) == b"B" * 4096
    # No resize while served (the export's size is fixed), nothing changed.
    assert fails("Volume.resize", sr=sr, key=key, new_size=128 * MiB)[0] == "Volume_in_use"
    assert call("Volume.stat", sr=sr, key=key)["virtual_size"] == 64 * MiB + 512
    guest.stop()
    report = guest.report()
    assert report["mismatches"] == 0, report  # every acknowledged write survived snapshot, merge and resize
    # VM stop.
    assert call("SR.detach", sr=sr) is None and call("SR.attach", configuration={"path": sr_dir}) == sr
    for method in ("deactivate", "detach"):
        assert run_bin("Datapath." + method, {"dbg": "t", "uri": uri, "domain": GUEST}).stdout == b"null\n"
    # Resize offline; shrinking refused.
    call("Volume.resize", sr=sr, key=key, new_size=128 * MiB)
    assert call("Volume.stat", sr=sr, key=key)["virtual_size"] == 128 * MiB
    assert fails("Volume.resize", sr=sr, key=key, new_size=64 * MiB)[0] == "Invalid_arguments"
    assert holds(live_image, MARK, 4096, ord("B"))
    # sr-scan: every volume with its keys.
    listed = call("SR.ls", sr=sr)
    assert [v["key"] for v in listed] == [key] and listed[0]["keys"] == {"vdi-type": "user"}
    assert fails("Volume.stat", sr=sr, key=snap["key"])[0] == "Volume_does_not_exist"
    # vdi-destroy (twice: the toolstack may), sr-destroy.
    call("Volume.destroy", sr=sr, key=key)
    call("Volume.destroy", sr=sr, key=key)
    assert call("SR.ls", sr=sr) == []
    call("SR.destroy", sr=sr)
    assert os.listdir(sr_dir) == []
    assert fails("SR.stat", sr=sr)[0] == "SR_does_not_exist"


def test_a_clone_of_a_running_disk_is_its_content_at_the_call(state_dir, volumes, sr_dir):
    sr = create_sr(sr_dir)
    key = call("Volume.create", sr=sr, name="d", description="", size=16 * MiB, sharable=False)["key"]
    uri = call("Volume.stat", sr=sr, key=key)["uri"][0]
    nbd = [i for k, i in run_bin("Datapath.attach", {"dbg": "t", "uri": uri, "domain": GUEST}).json["implementations"]
           if k == "Nbd"][0]["uri"]
    with Client.connect(nbd) as c:
        c.pwrite(b"1" * 4096, 4096)
        c.drain()
    clone = call("Volume.clone", sr=sr, key=key)
    with Client.connect(nbd) as c:
        c.pwrite(b"2" * 4096, 4096)
        c.drain()
    assert holds(clone["uri"][0][len("qcow2+file://"):], 4096, 4096, ord("1"))
    assert [v["key"] for v in call("SR.ls", sr=sr)] == sorted([key, clone["key"]])  # the shared base is hidden
    assert run_bin("Datapath.detach", {"dbg": "t", "uri": uri, "domain": GUEST}).stdout == b"null\n"
    call("Volume.destroy", sr=sr, key=key)
    call("Volume.destroy", sr=sr, key=clone["key"])
    wait_for(lambda: sorted(os.listdir(sr_dir)) == [".sr"], timeout=60, what="every image to go")
    call("SR.destroy", sr=sr)


def test_bad_input_gets_named_errors_and_changes_nothing(state_dir, volumes, sr_dir, tmp_path):
    missing = str(tmp_path / "missing")
    assert fails("SR.create", uuid="u", configuration={"path": missing}, name="", description="")[0] == "Invalid_arguments"
    assert fails("SR.create", uuid="u", configuration={"path": "relative"}, name="", description="")[0] == "Invalid_arguments"
    sr = create_sr(sr_dir)
    name, why = fails("SR.create", uuid="u", configuration={"path": sr_dir}, name="", description="")
    assert name == "Invalid_arguments" and "already an SR" in why
    assert fails("SR.attach", configuration={"path": missing})[0] == "SR_does_not_exist"
    assert call("SR.detach", sr=missing) is None  # a PBD unplug goes through, whatever became of the directory
    for size in (0, -1, (1 << 63) - 1, 1 << 62, True):
        assert fails("Volume.create", sr=sr, name="x", description="", size=size, sharable=False)[0] == "Invalid_arguments"
    for key in ("nope", "../../etc/passwd", "0d8e6a4c-2b4f-4b0e-9c55-6f6a3e8f9d99"):
        assert fails("Volume.stat", sr=sr, key=key)[0] == "Volume_does_not_exist"
        assert fails("Volume.set", sr=sr, key=key, k="a", v="b")[0] == "Volume_does_not_exist"
        assert call("Volume.destroy", sr=sr, key=key) is None  # idempotent
    weird = "\u00e9\u4e2d\U0001f600 \"quoted\" \\ name"
    key = call("Volume.create", sr=sr, name=weird, description=weird, size=MiB, sharable=True)["key"]
    assert call("Volume.stat", sr=sr, key=key)["name"] == weird
    assert call("Volume.unset", sr=sr, key=key, k="never-set") is None
    uri = call("Volume.stat", sr=sr, key=key)["uri"][0]
    assert run_bin("Datapath.attach", {"dbg": "t", "uri": uri, "domain": GUEST}).returncode == 0
    name, why = fails("Volume.destroy", sr=sr, key=key)
    assert name == "Volume_in_use" and os.path.exists(uri[len("qcow2+file://"):])  # refused, nothing lost
    assert fails("SR.destroy", sr=sr)[0] == "Volume_in_use"
    assert run_bin("Datapath.detach", {"dbg": "t", "uri": uri, "domain": GUEST}).stdout == b"null\n"
    call("Volume.destroy", sr=sr, key=key)
    call("SR.destroy", sr=sr)
    assert os.listdir(sr_dir) == [] and os.listdir(tmp_path / "sr") == []


@pytest.mark.parametrize("served", [False, True])
def test_a_snapshot_killed_at_random_points_leaves_a_valid_chain_and_no_lost_data(state_dir, volumes, sr_dir, served):
    sr = create_sr(sr_dir)
    key = call("Volume.create", sr=sr, name="d", description="", size=16 * MiB, sharable=False)["key"]
    uri = call("Volume.stat", sr=sr, key=key)["uri"][0]
    image = uri[len("qcow2+file://"):]
    nbd = None
    if served:
        nbd = [i for k, i in run_bin("Datapath.attach", {"dbg": "t", "uri": uri, "domain": GUEST}).json["implementations"]
               if k == "Nbd"][0]["uri"]
    rng = random.Random(7)
    landed = 0
    for trial in range(12):
        data = bytes([65 + trial]) * 4096
        if nbd:
            with Client.connect(nbd) as c:
                c.pwrite(data, 0)
                c.drain()
                c.flush()
        else:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d 0 4k" % (65 + trial), image], check=True,
                           capture_output=True)
        proc = subprocess.Popen([os.path.join(BIN, "Volume.snapshot"), "--json"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(json.dumps({"dbg": "t", "sr": sr, "key": key}).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        landed += proc.wait() == -signal.SIGKILL
        # The next call repairs: the disk reads as before, its chain is valid.
        listed = call("SR.ls", sr=sr)
        assert key in [v["key"] for v in listed]
        call("SR.attach", configuration={"path": sr_dir})
        assert valid(image)
        now = read(nbd, 0, 4096) == data if nbd else holds(image, 0, 4096, 65 + trial)
        assert now, "trial %d: the disk lost an acknowledged write" % trial
        for v in call("SR.ls", sr=sr):  # every snapshot that exists holds some earlier write, whole
            if v["key"] != key:
                assert any(holds(v["uri"][0][len("qcow2+file://"):], 0, 4096, 65 + t) for t in range(trial + 1))
        assert stray_files(sr_dir) == []  # nothing half-made left
    assert landed >= 3, "too few kills landed mid-snapshot to mean anything"
    if nbd:
        assert run_bin("Datapath.detach", {"dbg": "t", "uri": uri, "domain": GUEST}).stdout == b"null\n"
