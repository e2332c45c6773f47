"""``qemu-img`` on an SR's images, each run bounded in time.

Every image of an SR is qcow2 and lives in the SR's directory; a backing
file is named relative to it (the datapath opens only such chains, see
:mod:`~xapi_storage_tasks.sr.chain`).
"""

import os
import subprocess
from typing import List, Optional

from xapi_storage_tasks.wire.errors import InternalError

TIMEOUT = 120.0  # create, resize: metadata work; a rebase copies and gets its own bound
REBASE_TIMEOUT = 3600.0


def _run(args: List[str], timeout: float, hold: Optional[int] = None) -> None:
    try:
        proc = subprocess.run(["qemu-img", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, pass_fds=() if hold is None else (hold,))
    except FileNotFoundError:
        raise InternalError("qemu-img not found (Debian: apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise InternalError("qemu-img %s did not finish within %.0fs" % (args[0], timeout)) from None
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().replace("\n", " | ")
        raise InternalError("qemu-img %s failed: %s" % (args[0], why or "exit status %d" % proc.returncode))


def create(path: str, size: int, backing: Optional[str] = None) -> None:
    """A new qcow2 image of ``size`` bytes at ``path`` (which must not
    exist), over the image ``backing`` (a name in the same directory) if
    given; durable (the file and its directory synced)."""
    args = ["create", "-q", "-f", "qcow2", "-o", "preallocation=off"]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", "qcow2"]  # -u: the size is given, the backing need not be read
    _run(args + [path, str(size)], TIMEOUT)
    sync(path)


def resize(path: str, size: int) -> None:
    """Grow the image no daemon has open to ``size`` bytes."""
    _run(["resize", "-q", "-f", "qcow2", path, str(size)], TIMEOUT)
    sync(path)


def rebase(path: str, backing: Optional[str], backing_format: str = "qcow2", hold: Optional[int] = None) -> None:
    """Make ``path`` (no daemon has it open) stand on ``backing`` (a name
    in its directory; None: on nothing) without changing what it reads:
    the data its old backing held and the new one lacks is copied in first
    (a safe rebase); only then is its header changed, so a crash leaves it
    on its old backing, intact. ``hold``: a lock descriptor qemu-img
    inherits, so the lock lasts as long as it runs."""
    args = ["rebase", "-q", "-f", "qcow2"]
    args += ["-b", backing, "-F", backing_format] if backing is not None else ["-b", ""]
    _run(args + [path], REBASE_TIMEOUT, hold)
    sync(path)


def restore_backing(path: str, backing: str) -> None:
    """Write ``backing`` back into ``path``'s header (nothing else changes:
    an unsafe rebase), for an image that an interrupted merge left
    standing on nothing while its copied data may not all have reached
    its own tables. Reading through ``backing`` again is always right:
    what the merge copied is ``backing``'s own data."""
    _run(["rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", path], TIMEOUT)
    sync(path)


def sync(path: str) -> None:
    """fsync ``path`` and its directory."""
    for target, flags in ((path, os.O_RDONLY), (os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(target, flags | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
