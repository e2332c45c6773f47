"""Every setting the plugin reads from its environment, in one place.

The toolstack calls executables with its own environment, so each setting
has a default that is right on a host; the variables exist for operators,
tests and the socket daemon (whose calls use the daemon's environment).
This module imports only :mod:`os`: every layer, client included, may use
it.
"""

import os

APP = "xapi-storage-tasks"

STATE_DIR = "TASK_STATE_DIR"
"""The state directory (see :func:`state_dir`)."""

CANCEL_GRACE = "TASK_CANCEL_GRACE"
"""Seconds a cancelled worker has to stop before SIGKILL (default 5)."""

SYSLOG = "TASK_SYSLOG"
"""``1`` forces syslog, ``0`` forces ``logs/<id>.log`` files; unset: syslog
when ``/dev/log`` exists."""

NBD_CONNECT_TIMEOUT = "TASK_NBD_CONNECT_TIMEOUT"
"""Seconds a copy waits to connect to an NBD server (default 10)."""
NBD_HANDSHAKE_TIMEOUT = "TASK_NBD_HANDSHAKE_TIMEOUT"
"""Seconds an NBD server may stay silent during the handshake (default 10)."""
NBD_IO_TIMEOUT = "TASK_NBD_IO_TIMEOUT"
"""Seconds an NBD server may stall a copy: no request or data accepted, no
reply (default 30)."""
NBD_FLUSH_TIMEOUT = "TASK_NBD_FLUSH_TIMEOUT"
"""Seconds an NBD server may take to answer the final flush (default 300)."""
NBD_CONNECTIONS = "TASK_NBD_CONNECTIONS"
"""Most connections a copy opens to an NBD server that allows several
(NBD_FLAG_CAN_MULTI_CONN); 1 keeps every copy on one (default 4)."""

DATAPATH_LOCK_WAIT = "TASK_DATAPATH_LOCK_WAIT"
"""Seconds a Datapath call waits for another call on the same volume
(default 30)."""

MIRROR_DRAIN_TIMEOUT = "TASK_MIRROR_DRAIN_TIMEOUT"
"""Seconds ``Datapath.deactivate`` may spend draining a mirror, all of it
(default 10)."""
MIRROR_STALL_TIMEOUT = "TASK_MIRROR_STALL_TIMEOUT"
"""Seconds a mirror's target may complete nothing while work waits for it
(guest writes included) before the mirror cuts it off and fails (default
5): the longest a frozen target holds a guest write."""

BLOCK_DEVICE = "TASK_BLOCK_DEVICE"
"""How a volume's kernel block device is made: ``nbd`` (the kernel NBD
client on the storage daemon's export) or ``fuse-loop`` (its FUSE export
plus a loop device); unset or anything else: ``nbd`` where ``/dev/nbd0``
and ``nbd-client`` exist, ``fuse-loop`` otherwise."""

QEMU_STORAGE_DAEMON = "TASK_QEMU_STORAGE_DAEMON"
"""The qemu-storage-daemon executable (default: found on PATH)."""

LOCK_WAIT = "TASK_LOCK_WAIT"
"""Seconds a call waits for a task's lock before answering ``Task_busy``
(default 2)."""

STAT_WAIT = "TASK_STAT_WAIT"
"""Seconds a ``Data.stat`` of a running operation whose status has not
changed since the last answer about it may wait for news (default 0.8;
``0`` always answers at once): a caller polling back to back gets about
one answer per period, and each change at once."""

RETENTION = "TASK_RETENTION"
"""Seconds a finished task is kept after it ended before it is destroyed
automatically (default 14400, four hours); ``0`` keeps tasks forever."""

DEFAULT_CANCEL_GRACE = 5.0
DEFAULT_RETENTION = 4 * 3600.0
DEFAULT_LOCK_WAIT = 2.0
DEFAULT_STAT_WAIT = 0.8
MAX_INPUT = 1 << 20
"""The largest params object or request body accepted, in bytes."""
MAX_TASK_FILE = 1 << 20
"""The largest task file the store reads back, in bytes (a copy's plan,
blocklist included, must fit in it)."""


def state_dir() -> str:
    """``$TASK_STATE_DIR``; else ``/run/xapi-storage-tasks`` for root, the
    user's runtime directory otherwise (``/tmp/xapi-storage-tasks-UID`` as
    a last resort; the store checks ownership, so nobody else can pre-create
    it)."""
    env = os.environ.get(STATE_DIR)
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/" + APP
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, APP)
    return "/tmp/%s-%d" % (APP, os.geteuid())


def seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from variable ``name``; ``default``
    when it is unset or not such a number."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 and value != float("inf") else default


def cancel_grace() -> float:
    """Seconds a worker has to honour SIGTERM before SIGKILL."""
    return seconds(CANCEL_GRACE, DEFAULT_CANCEL_GRACE)


def nbd_timeouts() -> "tuple[float, float, float, float]":
    """The NBD stall timeouts ``(connect, handshake, io, flush)`` in seconds;
    0 waits forever."""
    return (seconds(NBD_CONNECT_TIMEOUT, 10.0), seconds(NBD_HANDSHAKE_TIMEOUT, 10.0),
            seconds(NBD_IO_TIMEOUT, 30.0), seconds(NBD_FLUSH_TIMEOUT, 300.0))


def nbd_connections() -> int:
    """Most NBD connections per copy, 1 to 16 (default 4)."""
    value = os.environ.get(NBD_CONNECTIONS, "")
    return int(value) if value.isdigit() and 1 <= int(value) <= 16 else 4


def use_syslog() -> bool:
    """Whether log lines go to syslog (else to files in the state directory)."""
    forced = os.environ.get(SYSLOG)
    if forced in ("0", "1"):
        return forced == "1"
    return os.path.exists("/dev/log")


def lock_wait() -> float:
    """Seconds a call waits for a task's lock (a worker writes its task in
    milliseconds: a longer hold means a stopped or stuck process)."""
    return seconds(LOCK_WAIT, DEFAULT_LOCK_WAIT)


def retention() -> float:
    """Seconds a finished task is kept (0: forever). The toolstack never
    destroys the tasks it starts; this keeps the store from growing
    without bound."""
    return seconds(RETENTION, DEFAULT_RETENTION)


def plugin_directory() -> str:
    """The name of the directory the running executable is in: the plugin
    directory the toolstack ran it from (``datapath/<scheme>/`` or
    ``volume/org.xen.xapi.storage.<type>/``), or a checkout's ``bin``."""
    import sys

    return os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0]))) if sys.argv and sys.argv[0] else ""


def stat_wait() -> float:
    """The longest a poll of an unchanged running operation waits for news
    (``TASK_STAT_WAIT``); 0: never waits."""
    return seconds(STAT_WAIT, DEFAULT_STAT_WAIT)
