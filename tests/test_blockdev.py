"""The volume's kernel block device through the real executables, with the
domain strings the toolstack really sends: what attach answers, who may
write, and that nothing of it outlives the last detach, also when callers
or the storage daemon are killed (real qemu-storage-daemon, nbdfuse, loop
devices, signals)."""

import errno
import json
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import time

import pytest

from conftest import BIN, leftovers, run_bin
from test_datapath import image, uri, volumes
from xapi_storage_tasks.process import identity

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-storage-daemon", "nbdfuse", "losetup")) or not os.path.exists("/dev/fuse"),
    reason="needs qemu-storage-daemon, nbdfuse (libnbd-bin), losetup and /dev/fuse (make deps)")

GUEST = "5"
MIRROR_DP = "u0_mirror_vbd_5_xvda"  # the dom0 mirror dp: attached, never activated
DOM0_USER = "u0_vbd_0_xvdb"  # xapi's loopback VBD
DESTINATION = "MIR3fa9c1"  # the leaf on a migration's destination
NOTHING = {"loops": [], "mounts": [], "processes": []}
__all__ = ["image", "uri", "volumes"]  # fixtures, shared with test_datapath


def dp(method, uri, domain):
    return run_bin("Datapath." + method, {"dbg": "test", "uri": uri, "domain": domain})


def device_of(answer):
    """The block device of an attach answer (XenDisk and BlockDevice name it)."""
    xendisk, block, _nbd = answer["implementations"]
    assert xendisk == ["XenDisk", {"backend_type": "vbd", "params": block[1]["path"], "extra": {}}]
    return block[1]["path"]


def write_direct(device, data, offset):
    """One O_DIRECT write (as blkback's), returning once acknowledged."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)


def read_direct(device, length, offset):
    buf = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf)


def readonly(device):
    with open("/sys/block/%s/ro" % os.path.basename(device)) as f:
        return f.read().strip() == "1"


def daemon_of(volumes):
    (path,) = volumes.glob("*.qsd")
    return json.loads(path.read_text())


def test_every_domain_gets_the_same_block_device_served_by_the_daemon(state_dir, volumes, image, uri):
    answer = dp("attach", uri, GUEST)
    assert answer.returncode == 0, answer.stdout
    device = device_of(answer.json)
    assert stat.S_ISBLK(os.stat(device).st_mode)
    # The same answer for a repeated attach and for every other domain.
    for domain in (GUEST, MIRROR_DP, DOM0_USER):
        assert dp("attach", uri, domain).json == answer.json
    # Its I/O is the daemon's: the loop device's backing file is the
    # daemon's export, mounted in the volume's directory.
    backing = open("/sys/block/%s/loop/backing_file" % os.path.basename(device)).read().strip()
    assert backing.startswith(str(volumes) + "/")
    assert daemon_of(volumes)["device"] == device
    assert read_direct(device, 4096, 0) == b"\xa5" * 4096
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    write_direct(device, b"guest!!!" * 8192, 1 << 20)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"guest!!!" * 8192
    for domain in (DOM0_USER, MIRROR_DP, GUEST):
        assert dp("detach", uri, domain).stdout == b"null\n"
    assert leftovers(state_dir) == NOTHING
    assert os.listdir(volumes) == []


def test_the_device_is_read_only_unless_a_domain_has_it_active_read_write(state_dir, volumes, uri):
    device = device_of(dp("attach", uri, DOM0_USER).json)
    assert readonly(device)  # attached only
    assert dp("activate_readonly", uri, DOM0_USER).stdout == b"null\n"
    assert readonly(device)
    with pytest.raises(OSError) as refused:
        write_direct(device, b"x" * 4096, 0)
    assert refused.value.errno == errno.EPERM
    assert dp("attach", uri, GUEST).returncode == 0
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    assert not readonly(device)
    write_direct(device, b"x" * 4096, 0)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert readonly(device)
    for domain in (GUEST, DOM0_USER):
        assert dp("detach", uri, domain).stdout == b"null\n"
    assert not readonly(device)  # whoever gets the loop device next gets it writable
    assert leftovers(state_dir) == NOTHING


def test_deactivate_twice_and_calls_for_a_domain_never_attached_answer_null(state_dir, volumes, uri):
    # Nothing attached at all: xapi's DP.destroy after a failed attach.
    for method in ("deactivate", "detach"):
        assert dp(method, uri, DESTINATION).stdout == b"null\n"
    assert dp("attach", uri, GUEST).returncode == 0
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    for method in ("deactivate", "detach"):  # attached, but not for that domain
        assert dp(method, uri, MIRROR_DP).stdout == b"null\n"
    # An unplug: VBD.deactivate, then DP.destroy's deactivate and detach.
    for method in ("deactivate", "deactivate", "detach"):
        assert dp(method, uri, GUEST).stdout == b"null\n"
    assert leftovers(state_dir) == NOTHING


def test_a_killed_daemon_makes_the_device_fail_and_the_next_call_releases_it(state_dir, volumes, uri):
    device = device_of(dp("attach", uri, GUEST).json)
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    daemon = daemon_of(volumes)["identity"]
    os.kill(daemon["pid"], signal.SIGKILL)
    assert identity.wait_gone(daemon, 10)
    with pytest.raises(OSError) as failed:
        read_direct(device, 4096, 1 << 20)
    assert failed.value.errno == errno.EIO
    res = dp("activate", uri, GUEST)
    assert res.error_name == "Storage_daemon_lost"
    assert leftovers(state_dir) == NOTHING  # the device went with the daemon
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert os.listdir(volumes) == []


def call_in_background(method, uri, domain):
    proc = subprocess.Popen([os.path.join(BIN, "Datapath." + method), "--json"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.stdin.write(json.dumps({"dbg": "t", "uri": uri, "domain": domain}).encode())
    proc.stdin.close()
    return proc


@pytest.mark.parametrize("victim", ["caller", "daemon"])
def test_kills_at_random_points_leave_nothing_after_the_last_detach(state_dir, volumes, uri, victim):
    """kill -9 of a caller (attach, activate, deactivate or detach) or of
    the storage daemon at a random instant of a call; then the volume
    serves again through its device and the last detach leaves no loop
    device, mount or process."""
    rng = random.Random(os.environ.get("RELIABILITY_SEED", "blockdev-" + victim))
    for trial in range(12):
        method = rng.choice(["attach", "activate", "deactivate", "detach"])
        if method != "attach":
            assert dp("attach", uri, GUEST).returncode == 0
        if method == "deactivate":
            dp("activate", uri, GUEST)
        proc = call_in_background(method, uri, GUEST)
        time.sleep(rng.uniform(0, 0.25))
        if victim == "caller":
            proc.kill()
        else:
            for path in volumes.glob("*.qsd"):
                try:
                    os.kill(json.loads(path.read_text())["identity"]["pid"], signal.SIGKILL)
                except (OSError, ValueError):
                    pass  # gone, or its record half-written: nothing to kill
        proc.wait(30)
        # Whatever was left: the volume serves through its device again...
        res = dp("attach", uri, GUEST)
        if res.returncode != 0:  # a daemon killed after serving is reported once
            assert res.error_name == "Storage_daemon_lost", (trial, method, res.stdout)
            res = dp("attach", uri, GUEST)
        assert res.returncode == 0, (trial, method, res.stdout)
        assert read_direct(device_of(res.json), 4096, 0) == b"\xa5" * 4096
        # ... and the last detach leaves nothing.
        assert dp("detach", uri, GUEST).stdout == b"null\n"
        assert leftovers(state_dir) == NOTHING, (trial, method)
        assert os.listdir(volumes) == []


@pytest.mark.skipif(not os.path.exists("/dev/nbd0") or shutil.which("nbd-client") is None,
                    reason="the kernel NBD client path needs /dev/nbd0 (modprobe nbd) and nbd-client: "
                           "a Xen dom0 has them, this machine does not")
def test_the_kernel_nbd_client_path(state_dir, volumes, uri, monkeypatch):
    monkeypatch.setenv("TASK_BLOCK_DEVICE", "nbd")
    device = device_of(dp("attach", uri, GUEST).json)
    assert device.startswith("/dev/nbd")
    assert dp("activate", uri, GUEST).stdout == b"null\n"
    assert read_direct(device, 4096, 0) == b"\xa5" * 4096
    write_direct(device, b"n" * 4096, 4096)
    assert dp("deactivate", uri, GUEST).stdout == b"null\n"
    assert dp("detach", uri, GUEST).stdout == b"null\n"
    assert not open("/sys/block/%s/pid" % os.path.basename(device)).read().strip() if os.path.exists(
        "/sys/block/%s/pid" % os.path.basename(device)) else True
    assert leftovers(state_dir) == NOTHING
