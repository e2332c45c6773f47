"""The daemon's listening socket, from claiming its path to removing it, and
who may connect to it.

Claiming a path (:func:`claim`): the socket's directory must belong to the
daemon's uid or root and not be writable by others, else another user could
replace the socket; ``PATH.lock`` beside the socket is flocked for the
daemon's life, so exactly one daemon serves a path even when two start at
once. A socket file already there (:func:`remove_stale`) is replaced only
if it refuses connections (left by a daemon that died); one that accepts a
connection is live and never taken over. :func:`listen` binds the socket,
never visible with a mode wider than 0600 (0660 and the group with
``--group``); :func:`unlink_if_same` removes it only while it is still the
file that was bound.

Peers are identified with SO_PEERCRED (and SO_PEERGROUPS for their
supplementary groups); :func:`refusal` says why one may not talk to us.

Every start-up failure is a :class:`StartupError` with a readable message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection

BACKLOG = 128

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python names it only from 3.x on some builds


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


# -- peers ----------------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected ``sock`` (struct
    ucred: a signed pid, unsigned ids)."""
    return struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII")))


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups at connect time (empty where the
    kernel cannot say)."""
    count = 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * 4)
        except OSError as e:
            if e.errno == errno.ERANGE and count < 65536:
                count *= 32
                continue
            return ()
        return struct.unpack("%dI" % (len(raw) // 4), raw)


def refusal(conn: socket.socket, allowed_uids: Collection[int], gid: int | None) -> str | None:
    """Why the peer on ``conn`` may not talk to us, or None: the uids in
    ``allowed_uids`` may, and members of group ``gid`` (unless None).
    Raises OSError if the kernel cannot say who the peer is."""
    pid, uid, peer_gid = peer_credentials(conn)
    if uid in allowed_uids:
        return None
    if gid is not None and (peer_gid == gid or gid in peer_groups(conn)):
        return None
    return "pid %d uid %d gid %d is not allowed" % (pid, uid, peer_gid)


# -- the socket's path ------------------------------------------------------------------


def _check_parent(path: str) -> None:
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StartupError("cannot create %s: %s" % (parent, e.strerror)) from None
    st = os.stat(parent)
    if st.st_uid not in (os.geteuid(), 0):
        raise StartupError("%s is owned by uid %d: the socket must be in a directory of uid %d or root"
                           % (parent, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StartupError("%s is writable by group or others (mode %o): another user could replace the socket"
                           % (parent, st.st_mode & 0o7777))


def write_pid(fd: int) -> None:
    """Make this process's pid the whole content of the file open at ``fd``
    (the lock file: read by a second daemon to say who holds the socket)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)


def lock_pid_file(path: str, mode: int, busy: Callable[[str], str]) -> int:
    """Open ``path``, take its flock without waiting and write our pid in
    it; return the descriptor (the lock lasts while it is open, and the
    kernel drops it however the process dies). If another process holds
    it, raise StartupError(``busy(holder)``, holder being its pid)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        raise StartupError("cannot open %s: %s" % (path, e.strerror)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StartupError("%s is not a regular file" % path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise StartupError(busy(holder)) from None
        write_pid(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _take_lock(path: str) -> int:
    """Hold ``PATH.lock`` for the daemon's life: exactly one daemon serves
    a socket path, even when two start at once."""
    return lock_pid_file(path + ".lock", 0o600,
                         lambda holder: "another daemon (pid %s) is serving %s; not taking it over" % (holder, path))


def claim(path: str) -> int:
    """Make the socket path ``path`` (absolute) this daemon's: check its
    length and its directory, and take its lock file. Returns the lock
    file's descriptor, to hold for the daemon's life. Raises StartupError."""
    if len(os.fsencode(path)) > 107:
        raise StartupError("socket path %s is longer than 107 bytes, the AF_UNIX limit" % path)
    _check_parent(path)
    return _take_lock(path)


def remove_stale(path: str) -> bool:
    """Remove a socket file nobody serves; refuse a live one or a path
    that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError("%s exists and is not a socket; not replacing it" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: left by a daemon that died
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StartupError("cannot replace the stale socket %s: %s" % (path, e.strerror)) from None
        return True
    except FileNotFoundError:
        return False
    except socket.timeout:
        raise StartupError("a server holds %s but does not accept connections; not taking it over" % path) from None
    except OSError as e:
        raise StartupError("cannot check whether %s is in use: %s" % (path, e.strerror)) from None
    else:
        pid = peer_credentials(probe)[0]
        raise StartupError("a live server (pid %d) is serving %s; not taking it over" % (pid, path))
    finally:
        probe.close()


def listen(path: str, gid: int | None = None) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on ``path`` (claimed, no file there): mode 0600, or
    0660 and group ``gid``. Returns ``(socket, ident)``, the socket
    non-blocking and ``ident`` the ``(st_dev, st_ino)`` of the socket file
    for :func:`unlink_if_same`. Raises StartupError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # never visible with a wider mode, not even for an instant
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StartupError("cannot bind %s: %s" % (path, e.strerror)) from None
    finally:
        os.umask(old)
    st = os.lstat(path)
    ident = (st.st_dev, st.st_ino)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
    except OSError as e:
        unlink_if_same(path, ident)
        sock.close()
        raise StartupError("cannot give %s to group %s: %s" % (path, gid, e.strerror)) from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock, ident


def unlink_if_same(path: str, ident: tuple[int, int]) -> None:
    """Unlink ``path`` only if it is still the file we made."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass
