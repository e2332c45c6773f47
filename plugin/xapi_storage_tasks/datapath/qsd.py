"""qemu-storage-daemon supervision: one daemon per volume in use.

A daemon is started at a volume's first attach, detached from the caller
by :func:`xapi_storage_tasks.process.spawn.spawn` exactly like a task
worker (the caller's pipes reach end-of-file at once), and stopped at the
last detach. It serves the image as an NBD export on a Unix socket
(``K.nbd``) and listens for QMP on two sockets: ``K.qmp`` for the mirror
worker (which keeps one session open to follow its job's events) and
``K.ctl`` for short calls (the QMP socket serves one client at a time).

Its record, ``K.qsd`` (plain JSON), is written by the spawned process
itself just before it becomes qemu-storage-daemon (``exec`` keeps the pid,
start time and process group): whatever instant the calling process is
killed at, a running daemon is recorded. Signals go only to the recorded
identity, verified first (:mod:`xapi_storage_tasks.process.identity`). A
record whose process is gone is a daemon that died: the next call reports
it (:class:`~xapi_storage_tasks.wire.errors.DaemonLost`).
"""

import json
import os
import select
import shutil
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

from xapi_storage_tasks import settings
from xapi_storage_tasks.wire.errors import DaemonFailed, DaemonLost
from xapi_storage_tasks.datapath.volume import Record, Volumes
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.process.spawn import spawn

VERSION = 1
START_TIMEOUT = 10.0
STOP_GRACE = 5.0
NODE = "vol"  # the node the export serves and mirrors read from
SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
FILES = ("qsd", "pid", "nbd", "qmp", "ctl", "log")


def binary() -> str:
    """The qemu-storage-daemon executable; DaemonFailed if there is none."""
    name = os.environ.get(settings.QEMU_STORAGE_DAEMON) or "qemu-storage-daemon"
    found = shutil.which(name)
    if found is None:
        raise DaemonFailed("%s not found (Debian: apt-get install qemu-system-common; `make deps` does it)" % name)
    return found


def _opt(value: str) -> str:
    """A value inside qemu's ``key=value,...`` syntax (``,`` doubles)."""
    return value.replace(",", ",,")


def check_socket_path(path: str) -> str:
    """``path``, checked to fit a Unix socket address and the Nbd
    implementation's ``nbd:unix:<socket>:exportname=`` form."""
    if ":" in path:
        raise DaemonFailed("socket path %s holds ':', an Nbd URI cannot carry: use a state directory without ':'" % path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise DaemonFailed("socket path %s is longer than %d bytes: choose a shorter state directory" % (path, SUN_PATH_MAX))
    return path


def sockets(vols: Volumes, key: str) -> Dict[str, str]:
    """The daemon's socket paths (see :func:`check_socket_path`)."""
    return {name: check_socket_path(vols.file(key, name)) for name in ("nbd", "qmp", "ctl")}


def argv(vols: Volumes, record: Record) -> List[str]:
    """The daemon's command line for the volume."""
    paths = sockets(vols, record.key)
    blockdev = {"driver": record.driver, "node-name": NODE,
                "file": {"driver": "file", "filename": record.path, "aio": "threads"}}
    export = {"type": "nbd", "id": "exp0", "node-name": NODE, "name": record.key, "writable": True}
    return [
        binary(),
        "--chardev", "socket,path=%s,server=on,wait=off,id=qmp0" % _opt(paths["qmp"]), "--monitor", "chardev=qmp0",
        "--chardev", "socket,path=%s,server=on,wait=off,id=ctl0" % _opt(paths["ctl"]), "--monitor", "chardev=ctl0",
        "--blockdev", json.dumps(blockdev),
        "--nbd-server", "addr.type=unix,addr.path=%s" % _opt(paths["nbd"]),
        "--export", json.dumps(export),
        "--pidfile", vols.file(record.key, "pid"),
    ]


def load(vols: Volumes, key: str) -> Optional[Dict[str, Any]]:
    """The daemon record of volume ``key``, or None."""
    daemon = vols.read_json(key + ".qsd")
    if daemon is not None and not (isinstance(daemon, dict) and isinstance(daemon.get("identity"), dict)):
        raise DaemonFailed("daemon record %s.qsd is malformed" % key)
    return daemon


def alive(daemon: Dict[str, Any]) -> bool:
    """The recorded daemon is running (same pid, start time and boot)."""
    return identity.matches(daemon["identity"]) and identity.refusal(daemon["identity"]) is None


def log_tail(vols: Volumes, key: str, limit: int = 600) -> str:
    """The end of the daemon's stderr, on one line ('' if none)."""
    try:
        fd = os.open(key + ".log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=vols.fd)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, max(0, size - limit))
    finally:
        os.close(fd)
    return " | ".join(line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip())


def forget(vols: Volumes, key: str) -> None:
    """Remove every file of a daemon that is gone (only our own names)."""
    for suffix in FILES:
        vols.unlink(key + "." + suffix)


def lost(vols: Volumes, key: str, daemon: Dict[str, Any]) -> DaemonLost:
    """The error for a daemon found dead; its files are removed, so the
    next attach starts a fresh one."""
    why = log_tail(vols, key)
    forget(vols, key)
    return DaemonLost("qemu-storage-daemon of %s (pid %s) is gone%s; guests lost their connection to it"
                      % (daemon.get("uri"), daemon["identity"].get("pid"), ": " + why if why else ""))


def _become_daemon(store_path: str, record: Record, args: List[str], ready_fd: int) -> None:
    """In the detached process: record ourselves, then exec the daemon."""
    from xapi_storage_tasks.tasks.store import Store

    store = Store(store_path)
    vols = Volumes(store)
    paths = sockets(vols, record.key)
    vols.write_json(record.key + ".qsd", {
        "version": VERSION, "identity": identity.identity(), "uri": record.uri, "path": record.path,
        "export": record.key, "nbd": paths["nbd"], "qmp": paths["qmp"], "ctl": paths["ctl"], "started": time.time(),
    })
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    log = os.open(record.key + ".log", flags, 0o600, dir_fd=vols.fd)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.write(ready_fd, b"!")
    os.close(ready_fd)
    os.execv(args[0], args)


def start(vols: Volumes, record: Record) -> Dict[str, Any]:
    """Start the volume's daemon (under its lock, none running) and return
    its record once it serves; DaemonFailed (with its stderr) otherwise."""
    args = argv(vols, record)
    forget(vols, record.key)  # leftovers of a daemon that is gone
    ready_r, ready_w = os.pipe()
    try:
        spawn(lambda: _become_daemon(vols.store.path, record, args, ready_w), keep_fds=[ready_w])
    finally:
        os.close(ready_w)
    try:
        ready, _, _ = select.select([ready_r], [], [], START_TIMEOUT)
        recorded = bool(ready) and os.read(ready_r, 1) == b"!"
    finally:
        os.close(ready_r)
    daemon = load(vols, record.key) if recorded else None
    if daemon is None:
        raise DaemonFailed("qemu-storage-daemon for %s could not be started" % record.uri)
    deadline = time.monotonic() + START_TIMEOUT
    pidfile = vols.file(record.key, "pid")
    while not (os.path.exists(pidfile) and os.path.exists(daemon["nbd"])):
        if not alive(daemon):
            why = log_tail(vols, record.key)
            forget(vols, record.key)
            raise DaemonFailed("qemu-storage-daemon for %s exited at start: %s" % (record.uri, why or "no message"))
        if time.monotonic() >= deadline:
            stop(vols, record.key, daemon)
            raise DaemonFailed("qemu-storage-daemon for %s did not start serving within %.0fs" % (record.uri, START_TIMEOUT))
        time.sleep(0.005)
    return daemon


def _mark(vols: Volumes, key: str) -> Optional[Tuple[int, int]]:
    """``(device, inode)`` of the daemon's pidfile, its mark: QEMU keeps its
    pidfile open (and locked) for its whole life, so the kernel can vouch
    that the process about to be signalled is that daemon (see
    :func:`xapi_storage_tasks.process.identity.holds`). None: no signal."""
    try:
        st = os.stat(key + ".pid", dir_fd=vols.fd, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def mark_fd(pid: int, mark: Tuple[int, int]) -> Optional[int]:
    """The descriptor on which process ``pid`` holds ``mark``, if any."""
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == mark:
            return int(name)
    return None


def stop(vols: Volumes, key: str, daemon: Dict[str, Any]) -> bool:
    """Stop the recorded daemon (SIGTERM: it flushes and exits; SIGKILL
    after a grace) and remove its files. False if it would not go: its
    record stays, so a later call finishes the job."""
    ident = daemon["identity"]
    if alive(daemon):
        mark = _mark(vols, key)
        # Which descriptor holds the mark is looked up now, not recorded (a
        # caller killed mid-attach never records it); signal_worker checks
        # it again through a pidfd before the signal.
        fd = mark_fd(ident["pid"], mark) if mark and isinstance(ident.get("pid"), int) else None
        if fd is None:
            return False  # nothing vouches for it: never signal, and do not wait for a stop never asked
        ident = dict(ident, fd=fd)
        identity.signal_worker(ident, signal.SIGTERM, mark)
        if not identity.wait_gone(ident, STOP_GRACE):
            identity.signal_worker(ident, signal.SIGKILL, mark)
            if not identity.wait_gone(ident, 2.0):
                return False
    forget(vols, key)
    return True


def describe(daemon: Dict[str, Any]) -> Dict[str, Any]:
    """What Plugin.diagnostics shows of a daemon: its record and, while it
    runs, psutil's view of the process (memory, CPU time, status)."""
    import psutil

    ident = daemon["identity"]
    out: Dict[str, Any] = {"pid": ident.get("pid"), "nbd": daemon.get("nbd"), "export": daemon.get("export"),
                           "started": daemon.get("started"), "running": alive(daemon)}
    if out["running"]:
        try:
            proc = psutil.Process(ident["pid"])
            with proc.oneshot():
                cpu = proc.cpu_times()
                out.update(status=proc.status(), rss=proc.memory_info().rss, cpu_seconds=cpu.user + cpu.system,
                           threads=proc.num_threads(), fds=proc.num_fds())
        except psutil.Error as e:
            out["error"] = str(e)
    return out
