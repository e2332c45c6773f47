"""The volume's kernel block device (``DEV``): what a guest's blkback, and
every other user of ``XenDisk``/``BlockDevice``, reads and writes. Every
I/O on it is served by the volume's storage daemon, through its NBD
export, so a mirror sees it.

Two ways to make it, chosen by :func:`kind` (``TASK_BLOCK_DEVICE``):

``nbd``        the kernel NBD client (``nbd-client -unix``) on the daemon's
               NBD export, as xapi itself connects ``/dev/nbdN``; where the
               ``nbd`` module is loaded (a Xen dom0).
``fuse-loop``  the daemon's NBD export as a file in a FUSE mount
               (libnbd's ``nbdfuse``, on the directory ``K.fuse``) plus a
               loop device on ``K.fuse/nbd`` with direct I/O (util-linux
               ``losetup --direct-io=on``): no page cache between the guest
               and the daemon. (qemu-storage-daemon 7.2's own FUSE export
               cannot sit beside its NBD export: a writable FUSE export
               takes the ``resize`` permission the NBD export unshares.)
               nbdfuse lives as long as its mount: unmounting it ends it.

What was made is found again from the kernel, never from our files alone:
a loop device is ours only if its backing file is exactly our
``K.fuse/nbd`` (``/sys/block/loopN/loop/backing_file``), a mount only if
its mount point is ``K.fuse``, an nbd device only if the ``nbd-client``
serving it names our socket. So a caller killed between making a device
and recording it leaves nothing the next call cannot find, and nothing of
anyone else is touched. Every tool runs with a bounded timeout.
"""

import fcntl
import os
import shutil
import struct
import subprocess
import time
import urllib.parse
from typing import List, Optional

from xapi_storage_tasks import settings
from xapi_storage_tasks.process.spawn import Readiness, spawn
from xapi_storage_tasks.wire.errors import StorageDaemonFailed

NBD = "nbd"
FUSE_LOOP = "fuse-loop"
KINDS = (NBD, FUSE_LOOP)
TOOL_TIMEOUT = 10.0  # making or flushing a device: local, but never unbounded
RELEASE_TIMEOUT = 20.0  # taking it down, all of it (loops detached, mounts gone)
KILL_WAIT = 1.0  # for a tool killed at its deadline to go
BLKROSET = 0x125D  # _IO(0x12, 93)
MAX_NBD = 128
MAX_STACKED = 8  # nbdfuse mounts of one directory a run of killed callers could stack


def kind() -> str:
    """How devices are made here: the setting if it names a kind, else
    ``nbd`` where ``/dev/nbd0`` and ``nbd-client`` exist, else ``fuse-loop``."""
    forced = os.environ.get(settings.BLOCK_DEVICE, "")
    if forced in KINDS:
        return forced
    return NBD if os.path.exists("/dev/nbd0") and shutil.which("nbd-client") else FUSE_LOOP


def _tool(argv: List[str], deadline: Optional[float] = None) -> str:
    """Run a tool by ``deadline`` (monotonic; default: TOOL_TIMEOUT from
    now); its stdout. StorageDaemonFailed saying why not. A tool stuck in
    the kernel past the deadline (``sync`` or ``losetup --detach`` of a
    device whose daemon is frozen sleeps where SIGKILL cannot reach) is
    killed and left behind, never waited for."""
    deadline = time.monotonic() + TOOL_TIMEOUT if deadline is None else deadline
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise StorageDaemonFailed("%s: %s" % (" ".join(argv), e)) from None
    try:
        out, err = proc.communicate(timeout=max(0.01, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass  # unkillable for now: it ends when the kernel lets it, reaped by nobody we wait for
        raise StorageDaemonFailed("%s: did not finish in time" % " ".join(argv)) from None
    if proc.returncode != 0:
        raise StorageDaemonFailed("%s failed: %s" % (" ".join(argv), err.decode("utf-8", "replace").strip()))
    return out.decode("utf-8", "replace").strip()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


# -- fuse-loop ------------------------------------------------------------------------


def backing(mountpoint: str) -> str:
    """The file the loop device is set up on: nbdfuse's file in its mount."""
    return os.path.join(mountpoint, "nbd")


def loops_of(path: str) -> List[str]:
    """The loop devices whose backing file is exactly ``path``."""
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return []
    return ["/dev/" + name for name in sorted(names)
            if name.startswith("loop") and _read("/sys/block/%s/loop/backing_file" % name) == path]


def mounted(mountpoint: str) -> bool:
    """Whether something is mounted on ``mountpoint`` (this namespace)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(" ")
        # Octal escapes (\040 for a space...) in the mount point field.
        if len(fields) > 4 and fields[4].encode("latin-1", "surrogateescape").decode("unicode_escape") == mountpoint:
            return True
    return False


def _mount(mountpoint: str, socket: str, export: str, deadline: float) -> None:
    """Mount the export with nbdfuse, detached from the caller, and wait
    (by ``deadline``) until the mount is there."""
    nbdfuse = shutil.which("nbdfuse")
    if nbdfuse is None:
        raise StorageDaemonFailed("nbdfuse not found (Debian: apt-get install libnbd-bin; `make deps` does it)")
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    uri = "nbd+unix:///%s?socket=%s" % (urllib.parse.quote(export), urllib.parse.quote(socket))
    args = [nbdfuse, mountpoint, uri]
    readiness = Readiness()
    try:
        spawn(lambda: readiness.exec(args), readiness=readiness)
    finally:
        readiness.close_sender()
    started, why = readiness.wait(max(0.0, deadline - time.monotonic()), until_closed=True)
    if started is False:
        raise StorageDaemonFailed("nbdfuse could not be started: %s" % (why or "no message"))
    while not mounted(mountpoint):
        if time.monotonic() >= deadline:
            raise StorageDaemonFailed("nbdfuse did not mount %s within %.0fs" % (mountpoint, TOOL_TIMEOUT))
        time.sleep(0.005)


def _loop(mountpoint: str, socket: str, export: str) -> str:
    """The loop device on the export's file (an existing one of ours, else
    a new one, the export mounted first if it is not)."""
    existing = loops_of(backing(mountpoint))
    if existing:
        return existing[0]
    deadline = time.monotonic() + TOOL_TIMEOUT  # one for the mount and the loop
    if not mounted(mountpoint):
        _mount(mountpoint, socket, export, deadline)
    return _tool(["losetup", "--direct-io=on", "--show", "--find", backing(mountpoint)], deadline)


# -- nbd --------------------------------------------------------------------------------


def _nbd_client_of(device: str) -> str:
    """The command line of the nbd-client serving ``device`` ('' if none)."""
    pid = _read("/sys/block/%s/pid" % os.path.basename(device))
    return _read("/proc/%s/cmdline" % pid).replace("\0", " ") if pid.isdigit() else ""


def _ours(device: str, socket: str) -> bool:
    return (" %s " % socket) in (" %s " % _nbd_client_of(device))


def _nbd(socket: str, export: str, device: str) -> str:
    """Connect ``device`` (chosen and recorded by the caller) to the export."""
    if not _ours(device, socket):
        _tool(["nbd-client", "-unix", socket, device, "-name", export, "-nonetlink", "-block-size", "4096"])
    return device


def free_nbd() -> str:
    """An nbd device nobody serves."""
    for n in range(MAX_NBD):
        if os.path.exists("/dev/nbd%d" % n) and not _read("/sys/block/nbd%d/pid" % n):
            return "/dev/nbd%d" % n
    raise StorageDaemonFailed("no free /dev/nbdN (the nbd module's nbds_max is too low)")


# -- both -----------------------------------------------------------------------------------


def connect(how: str, mountpoint: str, socket: str, export: str, device: str = "") -> str:
    """The device serving the volume: an existing one of ours, else a new
    one (an nbd ``device`` is chosen and recorded by the caller first, so a
    caller killed midway leaves a device the record names)."""
    return _nbd(socket, export, device) if how == NBD else _loop(mountpoint, socket, export)


def release(how: str, mountpoint: str, socket: str, device: str) -> List[str]:
    """Take the device down, only ours (see the module's text), writable
    again for whoever gets it next; the names released. The FUSE mount
    goes too (its nbdfuse then exits), lazily: a loop device a process
    still holds open keeps its file until it is closed."""
    done, deadline = [], time.monotonic() + RELEASE_TIMEOUT  # one deadline for all of it
    if how == FUSE_LOOP:
        for loop in loops_of(backing(mountpoint)):
            set_readonly(loop, False)  # the flag outlives the detach: the next user would inherit it
            _tool(["losetup", "--detach", loop], deadline)
            done.append(loop)
        for _ in range(MAX_STACKED):
            if not mounted(mountpoint):
                break
            _tool(["umount", "--lazy", mountpoint], deadline)
    elif device and _ours(device, socket):
        set_readonly(device, False)
        _tool(["nbd-client", "-d", device], deadline)
        done.append(device)
    return done


def set_readonly(device: str, readonly: bool) -> None:
    """Make the kernel refuse (or allow) writes to the device (BLKROSET)."""
    fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKROSET, struct.pack("i", int(readonly)))
    finally:
        os.close(fd)


def flush(device: str, timeout: Optional[float] = None) -> None:
    """fsync the device (coreutils ``sync DEV``): what the kernel holds is
    written and a flush goes down to the daemon. Bounded: a frozen daemon
    must not hang the caller."""
    _tool(["sync", device], time.monotonic() + (timeout or TOOL_TIMEOUT))
