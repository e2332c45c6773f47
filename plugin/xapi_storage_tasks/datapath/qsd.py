"""qemu-storage-daemon supervision: one daemon per volume in use.

A daemon is started at a volume's first attach, detached from the caller
by :func:`xapi_storage_tasks.process.spawn.spawn` exactly like a task
worker (the caller's pipes reach end-of-file at once), and stopped at the
last detach. It serves the image as an NBD export on a Unix socket
(``K.nbd``) and listens for QMP on two sockets: ``K.qmp`` for the mirror
worker (which keeps one session open to follow its job's events) and
``K.ctl`` for short calls (the QMP socket serves one client at a time).

Its record, ``K.qsd`` (:class:`StorageDaemon`, plain versioned JSON), is
written by the spawned process itself just before it becomes
qemu-storage-daemon (``exec`` keeps the pid, start time and process
group): whatever instant the calling process is killed at, a running
daemon is recorded. The start-up handshake is spawn's
:class:`~xapi_storage_tasks.process.spawn.Readiness`: why a daemon could not
start (before or at its exec) reaches the caller's error. The record says
``served`` once a caller has seen the daemon serve, before any caller is
given its export: a record never seen serving belongs to a start whose
caller died, and is finished or cleared silently by the next call
(:func:`finish_start`); a served daemon found dead is reported
(:class:`~xapi_storage_tasks.wire.errors.StorageDaemonLost`).

Signals go only to the recorded identity, verified first
(:mod:`xapi_storage_tasks.process.identity`).

The volume's kernel block device (:mod:`xapi_storage_tasks.datapath.blockdev`)
is made on its NBD export once the daemon serves. The record names how the
device is made and, once made, the device; it is released before the
daemon is stopped, and by :func:`forget` whatever became of the daemon.

Before its exec the daemon takes an OFD write lock on byte
:data:`LOCK_BYTE` of its image and holds it for its whole life (the kernel
drops it when the daemon dies): a second daemon on the same image (another
state directory, or one wiped while its daemon runs) is refused. QEMU's
own image lock cannot do it for raw images: the NBD export shares every
permission and the raw driver passes them through to the file, so two
daemons writing one raw file do not conflict for QEMU (qcow2 does not
share writes of its file, for its metadata).
"""

import fcntl
import json
import os
import shutil
import signal
import struct
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from xapi_storage_tasks import settings
from xapi_storage_tasks.datapath import blockdev
from xapi_storage_tasks.sr import chain
from xapi_storage_tasks.datapath.volume import Record, Volumes
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.process.spawn import Readiness, spawn
from xapi_storage_tasks.wire.errors import StorageDaemonFailed, StorageDaemonLost

VERSION = 1
START_TIMEOUT = 10.0
STOP_GRACE = 5.0
NODE = "vol"  # the node the export serves at start (a live snapshot puts another on top: see top_node)
EXPORT = "exp0"
SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
FILES = ("qsd", "pid", "nbd", "qmp", "ctl", "log")
LOCK_BYTE = 300  # QEMU's image locks use bytes 100-104 and 200-204: this one is ours alone


class StorageDaemon(NamedTuple):
    """The record of a volume's daemon, ``K.qsd``."""

    identity: Dict[str, Any]  # the process (see identity.identity)
    uri: str
    path: str
    export: str  # the NBD export's name: the volume's key
    nbd: str
    qmp: str
    ctl: str
    started: float
    served: bool  # a caller saw it serve (and may have handed out its export)
    blockdev: str = ""  # how its block device is made (blockdev.KINDS); "" for daemons older than devices
    device: str = ""  # the block device, once made ("/dev/loop3", "/dev/nbd0")

    def to_json(self) -> Dict[str, Any]:
        """The JSON object written to ``K.qsd``."""
        return dict(self._asdict(), version=VERSION)

    @classmethod
    def from_json(cls, obj: Any) -> "StorageDaemon":
        """Parse a record; ValueError naming what is wrong. ``served`` is
        absent from records older than it: those count as served; older
        ones have no block device either."""
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError("not a version %d daemon record" % VERSION)
        if not isinstance(obj.get("identity"), dict):
            raise ValueError("field 'identity' is missing or mistyped")
        for name in ("uri", "path", "export", "nbd", "qmp", "ctl"):
            if not isinstance(obj.get(name), str):
                raise ValueError("field %r is missing or mistyped" % name)
        started, served = obj.get("started"), obj.get("served", True)
        if type(started) not in (int, float) or type(served) is not bool:
            raise ValueError("field 'started' or 'served' is mistyped")
        how, device = obj.get("blockdev", ""), obj.get("device", "")
        if how not in blockdev.KINDS + ("",) or not isinstance(device, str):
            raise ValueError("field 'blockdev' or 'device' is mistyped")
        return cls(obj["identity"], obj["uri"], obj["path"], obj["export"], obj["nbd"], obj["qmp"], obj["ctl"],
                   float(obj["started"]), served, how, device)


def binary() -> str:
    """The qemu-storage-daemon executable; StorageDaemonFailed if there is none."""
    name = os.environ.get(settings.QEMU_STORAGE_DAEMON) or "qemu-storage-daemon"
    found = shutil.which(name)
    if found is None:
        raise StorageDaemonFailed("%s not found (Debian: apt-get install qemu-system-common; `make deps` does it)" % name)
    return found


def _opt(value: str) -> str:
    """A value inside qemu's ``key=value,...`` syntax (``,`` doubles)."""
    return value.replace(",", ",,")


def check_socket_path(path: str) -> str:
    """``path``, checked to fit a Unix socket address and the Nbd
    implementation's ``nbd:unix:<socket>:exportname=`` form."""
    if ":" in path:
        raise StorageDaemonFailed("socket path %s holds ':', an Nbd URI cannot carry: use a state directory without ':'" % path)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise StorageDaemonFailed("socket path %s is longer than %d bytes: choose a shorter state directory"
                                  % (path, SUN_PATH_MAX))
    return path


def sockets(vols: Volumes, key: str) -> Dict[str, str]:
    """The daemon's socket paths (see :func:`check_socket_path`)."""
    return {name: check_socket_path(vols.file(key, name)) for name in ("nbd", "qmp", "ctl")}


def argv(vols: Volumes, record: Record) -> List[str]:
    """The daemon's command line for the volume: its vetted chain pinned
    (InvalidArguments if the image references what it must not)."""
    paths = sockets(vols, record.key)
    node = chain.blockdev(chain.vet(record.path, record.driver), NODE)
    export = {"type": "nbd", "id": EXPORT, "node-name": NODE, "name": record.key, "writable": True}
    return [
        binary(),
        "--chardev", "socket,path=%s,server=on,wait=off,id=qmp0" % _opt(paths["qmp"]), "--monitor", "chardev=qmp0",
        "--chardev", "socket,path=%s,server=on,wait=off,id=ctl0" % _opt(paths["ctl"]), "--monitor", "chardev=ctl0",
        "--blockdev", json.dumps(node),
        "--nbd-server", "addr.type=unix,addr.path=%s" % _opt(paths["nbd"]),
        "--export", json.dumps(export),
        "--pidfile", vols.file(record.key, "pid"),
    ]


def flush(daemon: StorageDaemon, timeout: float) -> None:
    """Flush the volume: NBD_CMD_FLUSH through the daemon's export writes
    back everything acknowledged so far, down to the disk (each step
    bounded by ``timeout``)."""
    from xapi_storage_tasks.nbd.protocol import Client, Timeouts
    from xapi_storage_tasks.nbd.uri import Address

    timeouts = Timeouts(connect=timeout, handshake=timeout, io=timeout, flush=timeout)
    with Client.connect(Address(daemon.nbd, None, 0, daemon.export), timeouts) as client:
        client.flush()


async def top_node(client: Any) -> str:
    """The node the daemon's export serves now: the top of the volume's
    chain (a live snapshot moves the export onto its new image)."""
    from xapi_storage_tasks.datapath import qmp

    for export in await qmp.execute(client, "query-block-exports"):
        if export.get("id") == EXPORT:
            return str(export["node-name"])
    raise StorageDaemonFailed("the daemon serves no export %s" % EXPORT)


def load(vols: Volumes, key: str) -> Optional[StorageDaemon]:
    """The daemon record of volume ``key``, or None."""
    obj = vols.read_json(key + ".qsd")
    if obj is None:
        return None
    try:
        return StorageDaemon.from_json(obj)
    except ValueError as e:
        raise StorageDaemonFailed("daemon record %s.qsd is malformed: %s" % (key, e)) from None


def alive(daemon: StorageDaemon) -> bool:
    """The recorded daemon is running (same pid, start time and boot)."""
    return identity.matches(daemon.identity) and identity.refusal(daemon.identity) is None


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


def forget(vols: Volumes, key: str, daemon: Optional[StorageDaemon] = None) -> None:
    """Release the block device of a daemon that is gone, then remove every
    file of it (only our own names), with any temporary record a writer
    killed midway left."""
    mountpoint = vols.file(key, "fuse")
    if daemon is not None:
        blockdev.release(daemon.blockdev, mountpoint, daemon.nbd, daemon.device)
    blockdev.release(blockdev.FUSE_LOOP, mountpoint, "", "")  # found from the kernel, recorded or not
    try:
        os.rmdir(key + ".fuse", dir_fd=vols.fd)
    except FileNotFoundError:
        pass
    for suffix in FILES:
        vols.unlink(key + "." + suffix)
    prefix = key + ".qsd.tmp-"
    for name in os.listdir(vols.fd):
        if name.startswith(prefix):
            vols.unlink(name)


def lost(vols: Volumes, key: str, daemon: StorageDaemon) -> StorageDaemonLost:
    """The error for a daemon found dead; its files are removed, so the
    next attach starts a fresh one."""
    why = log_tail(vols, key)
    forget(vols, key, daemon)
    return StorageDaemonLost("qemu-storage-daemon of %s (pid %s) is gone%s; guests lost their connection to it"
                      % (daemon.uri, daemon.identity.get("pid"), ": " + why if why else ""))


def _lock_image(path: str) -> None:
    """Take the image's lock (byte LOCK_BYTE, OFD write lock) on a
    descriptor the daemon inherits, so it holds the lock until it dies."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi0q", fcntl.F_WRLCK, os.SEEK_SET, LOCK_BYTE, 1, 0))
    except (BlockingIOError, PermissionError):
        raise RuntimeError("image %s is in use: another qemu-storage-daemon holds its lock (byte %d of the file)"
                           % (path, LOCK_BYTE)) from None
    os.set_inheritable(fd, True)


def _become_daemon(store_path: str, record: Record, how: str, args: List[str], readiness: Readiness) -> None:
    """In the detached process: lock the image, record ourselves, then
    exec the daemon; any failure's reason goes to the starter (spawn)."""
    from xapi_storage_tasks.tasks.store import Store

    store = Store(store_path)
    vols = Volumes(store)
    _lock_image(record.path)
    paths = sockets(vols, record.key)
    ident = identity.identity()
    assert ident is not None  # this process is alive
    daemon = StorageDaemon(ident, record.uri, record.path, record.key, paths["nbd"], paths["qmp"], paths["ctl"],
                           time.time(), served=False, blockdev=how)
    vols.write_json(record.key + ".qsd", daemon.to_json())
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    log = os.open(record.key + ".log", flags, 0o600, dir_fd=vols.fd)
    os.dup2(log, 1)
    os.dup2(log, 2)
    readiness.exec(args)


def start(vols: Volumes, record: Record) -> StorageDaemon:
    """Start the volume's daemon (under its lock, none recorded) and return
    its record once it serves; StorageDaemonFailed saying why otherwise."""
    how = blockdev.kind()
    args = argv(vols, record)
    forget(vols, record.key)  # leftovers of a daemon that is gone
    readiness = Readiness()
    try:
        spawn(lambda: _become_daemon(vols.store.path, record, how, args, readiness), readiness=readiness)
    finally:
        readiness.close_sender()
    deadline = time.monotonic() + START_TIMEOUT  # one deadline: the exec and the first serving
    started, why = readiness.wait(START_TIMEOUT, until_closed=True)
    daemon = load(vols, record.key)
    if started is None:
        if daemon is not None:
            stop(vols, record.key, daemon)  # if nothing vouches for it yet, its record stays for the next call
        raise StorageDaemonFailed("qemu-storage-daemon for %s did not start within %.0fs" % (record.uri, START_TIMEOUT))
    if not started or daemon is None:
        forget(vols, record.key)
        raise StorageDaemonFailed("qemu-storage-daemon for %s could not be started: %s"
                           % (record.uri, why or "it exited before its exec without a word"))
    return _until_serving(vols, record.key, daemon, deadline)


def _until_serving(vols: Volumes, key: str, daemon: StorageDaemon, deadline: float) -> StorageDaemon:
    """Wait until the daemon serves (its pidfile, written after every
    option is in place, and its NBD socket exist), then record it served."""
    pidfile = vols.file(key, "pid")
    while not (os.path.exists(pidfile) and os.path.exists(daemon.nbd)):
        if not alive(daemon):
            why = log_tail(vols, key)
            forget(vols, key, daemon)
            raise StorageDaemonFailed("qemu-storage-daemon for %s exited at start: %s" % (daemon.uri, why or "no message"))
        if time.monotonic() >= deadline:
            stop(vols, key, daemon)
            raise StorageDaemonFailed("qemu-storage-daemon for %s did not start serving within %.0fs"
                                      % (daemon.uri, START_TIMEOUT))
        time.sleep(0.005)
    daemon = daemon._replace(served=True)
    vols.write_json(key + ".qsd", daemon.to_json())
    return daemon


def finish_start(vols: Volumes, key: str, daemon: StorageDaemon) -> Optional[StorageDaemon]:
    """A daemon never seen serving (its starter died midway): wait for it
    to serve and return it recorded served, or, if it cannot serve, clear
    it and return None. Nobody was ever given its export, so nobody lost
    it: no StorageDaemonLost. StorageDaemonFailed only if it would not stop."""
    if not alive(daemon):
        forget(vols, key, daemon)
        return None
    try:
        return _until_serving(vols, key, daemon, time.monotonic() + START_TIMEOUT)
    except StorageDaemonFailed:
        if load(vols, key) is not None:
            raise
        return None


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


def with_device(vols: Volumes, key: str, daemon: StorageDaemon) -> StorageDaemon:
    """The serving daemon with its block device made and recorded. An nbd
    device is recorded before it is connected, a loop device after (one a
    caller killed midway left is found again by its backing file)."""
    if not daemon.blockdev:
        raise StorageDaemonFailed("the storage daemon of %s was started by an earlier version, without a block device:"
                                  " detach the volume everywhere and attach it again" % daemon.uri)
    device = daemon.device
    if daemon.blockdev == blockdev.NBD and not device:
        device = blockdev.free_nbd()
        daemon = daemon._replace(device=device)
        vols.write_json(key + ".qsd", daemon.to_json())
    made = blockdev.connect(daemon.blockdev, vols.file(key, "fuse"), daemon.nbd, daemon.export, device)
    if made != daemon.device:
        daemon = daemon._replace(device=made)
        vols.write_json(key + ".qsd", daemon.to_json())
    return daemon


def stop(vols: Volumes, key: str, daemon: StorageDaemon) -> bool:
    """Stop the recorded daemon, its block device released first (SIGTERM:
    it flushes and exits; SIGKILL after a grace) and remove its files.
    False if it would not go: its record stays, so a later call finishes
    the job."""
    ident = daemon.identity
    if alive(daemon):
        blockdev.release(daemon.blockdev, vols.file(key, "fuse"), daemon.nbd, daemon.device)
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
    forget(vols, key, daemon)
    return True


def describe(daemon: StorageDaemon) -> Dict[str, Any]:
    """What Plugin.diagnostics shows of a daemon: its record and, while it
    runs, psutil's view of the process (memory, CPU time, status)."""
    import psutil

    ident = daemon.identity
    out: Dict[str, Any] = {"pid": ident.get("pid"), "nbd": daemon.nbd, "export": daemon.export,
                           "blockdev": daemon.blockdev, "device": daemon.device,
                           "started": daemon.started, "served": daemon.served, "running": alive(daemon)}
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
