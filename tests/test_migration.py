"""Both ends of a storage migration on one machine, as two hosts' toolstacks
drive them: two state directories (each call names its host's through
TASK_STATE_DIR), the destination's new leaf attached and activated for
``MIR3fa9c1`` and attached again (``get_nbd_server``), the toolstack's
relay accepting once between the hosts, and a guest writing through the
SOURCE's block device with O_DIRECT all along, with a burst right before
the source's deactivate. After it, the leaf holds exactly the source's
bytes (``qemu-img compare``)."""

import mmap
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, kill_leftover_daemons, leftovers, run_bin
from mirroring import SIZE, Guest, wait_for

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-storage-daemon", "qemu-img", "nbdfuse", "losetup")),
    reason="needs qemu-storage-daemon, qemu-img, nbdfuse (libnbd-bin) and losetup (make deps)")

GUEST = "5"
MIRROR_DP = "u0_mirror_vbd_5_xvda"
LEAF = "MIR3fa9c1"
RELAY = os.path.join(ROOT, "tools", "accept-once-relay.py")
NBD_URI = re.compile(r"^nbd:unix:([^:]+):exportname=([^:]+)$")


class Host:
    """One host's plugin: its own state directory."""

    def __init__(self, state):
        self.state = state
        self.env = dict(os.environ, TASK_STATE_DIR=str(state), TASK_SYSLOG="0")

    def call(self, method, **params):
        res = run_bin(method, dict(params, dbg="migration"), env=self.env)
        assert res.returncode == 0, (method, params, res.stdout, res.stderr)
        return res.json

    def dp(self, method, uri, domain):
        return self.call("Datapath." + method, uri=uri, domain=domain)


@pytest.fixture
def hosts(tmp_path, state_dir):
    source, destination = Host(state_dir), Host(tmp_path / "dst")
    yield source, destination
    for host in (source, destination):
        kill_leftover_daemons(str(host.state / "volumes"))


def burst(device, count=64):
    """O_DIRECT writes through the block device as fast as it takes them."""
    buf = mmap.mmap(-1, 65536)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(count):
            buf[:] = os.urandom(65536)
            assert os.pwrite(fd, buf, (i * 7919 % (SIZE // 65536)) * 65536) == 65536
    finally:
        os.close(fd)


@pytest.mark.parametrize("leaf_format", ["qcow2", "raw"])
def test_both_ends_of_a_storage_migration_leave_the_leaf_identical_to_the_source(hosts, tmp_path, leaf_format):
    source, destination = hosts
    image = tmp_path / "source.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(SIZE // 2))
        f.truncate(SIZE)
    uri = "raw+file://%s" % image
    leaf = tmp_path / ("leaf." + leaf_format)
    subprocess.run(["qemu-img", "create", "-q", "-f", leaf_format, str(leaf), str(SIZE)], check=True)
    leaf_uri = "%s+file://%s" % (leaf_format, leaf)

    report = migrate(source, destination, tmp_path, uri, leaf_uri)
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", leaf_format, str(image), str(leaf)],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    finish(source, destination, uri)
    print("\nmigration (%s leaf): %d guest writes through the block device, then a burst of 64"
          % (leaf_format, report["writes"]))


def test_a_volume_of_a_qcow2_file_sr_migrates_live_into_a_volume_of_another(hosts, tmp_path):
    """Source and destination are both SRs of this plugin (one per host):
    the source volume has a snapshot under it (a chain of two) and the
    guest writes on; the destination is a new volume, as SXM creates it."""
    source, destination = hosts
    (tmp_path / "sr1").mkdir()
    (tmp_path / "sr2").mkdir()
    srs = []
    for host, name in ((source, "sr1"), (destination, "sr2")):
        config = host.call("SR.create", uuid="0d8e6a4c-2b4f-4b0e-9c55-6f6a3e8f9d0" + name[-1],
                           configuration={"path": str(tmp_path / name)}, name=name, description="")
        srs.append(host.call("SR.attach", configuration=config))
    disk = source.call("Volume.create", sr=srs[0], name="root", description="", size=SIZE, sharable=False)
    uri = disk["uri"][0]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 8M", uri[len("qcow2+file://"):]], check=True,
                   capture_output=True)
    source.call("Volume.snapshot", sr=srs[0], key=disk["key"])  # a chain of two under the disk
    leaf = destination.call("Volume.create", sr=srs[1], name="root", description="", size=SIZE, sharable=False)
    destination.call("Volume.set", sr=srs[1], key=leaf["key"], k="_sm_config_base_mirror", v="x")
    leaf_uri = destination.call("Volume.stat", sr=srs[1], key=leaf["key"])["uri"][0]
    report = migrate(source, destination, tmp_path, uri, leaf_uri)
    compare = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", uri[len("qcow2+file://"):],
                              leaf_uri[len("qcow2+file://"):]], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    destination.call("Volume.unset", sr=srs[1], key=leaf["key"], k="_sm_config_base_mirror")
    finish(source, destination, uri)
    print("\nmigration between two qcow2-file SRs: %d guest writes, then a burst of 64" % report["writes"])


def migrate(source, destination, tmp_path, uri, leaf_uri):
    """Both ends of a storage migration of ``uri`` into ``leaf_uri``, as the
    toolstacks drive them; the guest's report."""
    # The destination: the leaf attached and activated for MIRxxxxxx, then
    # attached again by get_nbd_server (the same answer), whose Nbd the
    # toolstack parses by splitting on ':'.
    answer = destination.dp("attach", leaf_uri, LEAF)
    destination.dp("activate", leaf_uri, LEAF)
    assert destination.dp("attach", leaf_uri, LEAF) == answer
    sock, export = NBD_URI.match(answer["implementations"][-1][1]["uri"]).groups()
    relay_sock = tmp_path / "relay.sock"
    relay = subprocess.Popen([sys.executable, RELAY, str(relay_sock), sock])
    try:
        wait_for(relay_sock.exists, what="the relay to listen")

        # The source: the guest's VBD plugged (blkback on the block device),
        # the guest writing through it all along.
        device = source.dp("attach", uri, GUEST)["implementations"][1][1]["path"]
        source.dp("activate", uri, GUEST)
        guest = Guest(device, tmp_path, report=True)
        wait_for(lambda: guest.writes() >= 20, what="the guest to write")
        source.dp("attach", uri, MIRROR_DP)  # the dom0 mirror dp: attached, never activated
        op = source.call("Data.mirror", uri=uri, domain=GUEST, remote="nbd+unix:///%s?socket=%s" % (export, relay_sock))
        began = time.monotonic()
        while not source.call("Data.stat", operation=op)["complete"]:  # mirror_wait: no sleep
            assert not source.call("Data.stat", operation=op)["failed"]
            assert time.monotonic() - began < 120, "the mirror neither completed nor failed"
        writes = guest.writes()
        wait_for(lambda: guest.writes() >= writes + 50, what="more guest writes")
        source.dp("deactivate", uri, MIRROR_DP)
        source.dp("detach", uri, MIRROR_DP)
        assert source.call("Data.stat", operation=op) == {"failed": False, "complete": True, "progress": 1.0}
        wait_for(lambda: guest.writes() >= writes + 100, what="more guest writes")
        guest.stop()
        report = guest.report()
        assert report["mismatches"] == 0, report
        burst(device)  # the guest's last writes, just before it is suspended

        # The guest suspended: VBD.deactivate drains the mirror; DP.destroy
        # deactivates again, then detaches.
        assert source.dp("deactivate", uri, GUEST) is None
        assert source.dp("deactivate", uri, GUEST) is None
        assert source.call("Task.stat", id=op[1])["state"][0] == "Completed"
        relay.wait(timeout=30)  # the mirror's one connection is gone: the relay ends
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()

    # The destination tears the leaf down, then the source detaches.
    assert destination.dp("deactivate", leaf_uri, LEAF) is None
    assert destination.dp("detach", leaf_uri, LEAF) is None
    return report


def finish(source, destination, uri):
    """The source detaches; nothing of either host is left."""
    assert source.dp("detach", uri, GUEST) is None
    for host in (source, destination):
        assert leftovers(host.state) == {"loops": [], "mounts": [], "processes": []}
