"""Process identity, and signals that only ever reach the recorded worker.

An identity is a plain dict, stored in the task file::

    {"pid": 4242, "start": 81234567, "pgid": 4242, "boot_id": "2305cddd-...", "fd": 3}

``start`` is the process start time in clock ticks since boot (field 22 of
``/proc/PID/stat``): together with the boot id it tells a live worker from
a process that reused its pid, or from a pid recorded before a reboot.

A task file can be forged, so none of that is trusted on its own before a
signal: a worker holds its task's *mark* (a file only the plugin creates)
open on descriptor ``fd`` for its whole life, and :func:`holds` asks the
kernel (``/proc/PID/fd/FD``) whether the process really has that very file
(device and inode) open there. Only then does :func:`signal_worker` send
anything. Everything here reads ``/proc`` directly, so it is cheap enough
for every ``Task.stat``.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from typing import Any, Dict

    Identity = Dict[str, Any]

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


_boot_id: str | None = None


def boot_id() -> str:
    """This boot's id (read once per process: it cannot change under it)."""
    global _boot_id
    if _boot_id is None:
        with open(_BOOT_ID_PATH) as f:
            _boot_id = f.read().strip()
    return _boot_id


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/PID/stat (state first), or None if no such
    process. The command name may hold spaces and parentheses, so split
    after the last ')'."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].split()


def identity(pid: int | None = None) -> Identity | None:
    """The identity of ``pid`` (default: this process), or None if it is
    gone."""
    pid = os.getpid() if pid is None else pid
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return {"pid": pid, "start": int(fields[19]), "pgid": int(fields[2]), "boot_id": boot_id()}


PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT


def _well_formed(ident: Any) -> bool:
    try:
        return (
            all(type(ident[k]) is int for k in ("pid", "start", "pgid"))
            and isinstance(ident["boot_id"], str)
            and 1 < ident["pid"] <= PID_MAX
            and 1 < ident["pgid"] <= PID_MAX
            and ident["start"] >= 0
        )
    except (KeyError, TypeError):
        return False


def matches(ident: Any) -> bool:
    """True when ``ident`` names a live process of this boot, whose pid has
    not been reused (same start time) and which is not a zombie."""
    if not _well_formed(ident) or ident["boot_id"] != boot_id():
        return False
    fields = _stat_fields(ident["pid"])
    return (
        fields is not None
        and fields[0] not in (b"Z", b"X")
        and int(fields[19]) == ident["start"]
        and int(fields[2]) == ident["pgid"]
    )


def refusal(ident: Any) -> str | None:
    """Why ``ident`` must never be signalled, or None."""
    if not _well_formed(ident):
        return "malformed identity"
    if ident["pid"] == os.getpid() or ident["pgid"] in (os.getpgrp(), os.getpid()):
        return "identity names the caller itself"
    if ident["pid"] != ident["pgid"]:
        return "worker does not lead its own process group"
    return None


def signal_worker(ident: Identity, sig: int, mark: tuple[int, int] | None) -> bool:
    """Send ``sig`` to the worker's process group, only if ``ident`` still
    names the same live process and that process holds the task's ``mark``
    (see :func:`holds`). Returns True if it was signalled.

    With a pidfd the identity check and the signal to the leader hit the same
    process even if the pid is recycled in between; the rest of the group is
    signalled only while that leader is alive (a group id cannot be reused
    while its leader lives).
    """
    if refusal(ident) is not None:
        return False
    import signal  # only a call that signals pays for it (it imports enum)

    pid = ident["pid"]
    pidfd = None
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError:
            pidfd = None  # kernel without pidfds: fall back to the check alone
    try:
        if not matches(ident) or not holds(ident, mark):
            return False
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
            if pidfd is None or not _exited(pidfd, 0):
                os.killpg(ident["pgid"], sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def holds(ident: Any, mark: tuple[int, int] | None) -> bool:
    """True when the process ``ident`` names has the file ``mark``
    (``(device, inode)``) open on descriptor ``ident["fd"]``, as the kernel
    sees it. Call only after :func:`matches` (the pid is that process)."""
    fd = ident.get("fd") if isinstance(ident, dict) else None
    if mark is None or type(fd) is not int or not 0 <= fd < 1 << 20 or not _well_formed(ident):
        return False
    try:
        st = os.stat("/proc/%d/fd/%d" % (ident["pid"], fd))  # follows the descriptor to its file
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == tuple(mark)


def _exited(pidfd: int, timeout: float) -> bool:
    import select

    return bool(select.select([pidfd], [], [], timeout)[0])


def wait_gone(ident: Identity, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to be gone (exited or
    a zombie); True if it is."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while matches(ident):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True
