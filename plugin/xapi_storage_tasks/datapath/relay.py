"""A mirror's one connection to its target, held by the mirror's worker.

qemu-storage-daemon's NBD client has no I/O timeout, and in write-blocking
mode every guest write waits for the target: a target that stops answering
(frozen, or partitioned away) would hold the guest's writes for as long as
it stays so. The daemon therefore never connects to the target itself. The
mirror's worker:

1. connects to the target and waits for its NBD greeting, both within one
   deadline, without consuming the greeting: a remote that accepts and
   never answers is refused before the daemon is involved (the daemon
   negotiates with a new NBD target synchronously, in the main loop that
   also serves the guests' export and QMP);
2. listens on a private Unix socket that the daemon's ``nbd`` node
   connects to, accepts exactly one connection, and relays bytes both ways
   (two threads of blocking I/O, outside the GIL);
3. can :meth:`Relay.cut` the connection at any instant: the daemon's client
   sees end-of-file, fails every request in flight (a guest write waiting
   for the target then completes against the source) and the job fails.

The connection lives exactly as long as the worker process: a worker
killed at any instant cuts it (the kernel closes its sockets), so no job is
ever left waiting on a frozen target with nobody to end it.
"""

import os
import select
import socket
import threading
import time
from typing import Optional

from xapi_storage_tasks.nbd.uri import Address
from xapi_storage_tasks.wire.errors import MirrorFailed

GREETING = b"NBDMAGIC"  # how every NBD server opens a connection
BUFFER = 1 << 20  # requests from the daemon: up to a mirror chunk at a time
REPLY_BUFFER = 1 << 16  # replies from the target: headers, mostly
SOCKET_BUFFER = 4 << 20
"""SO_SNDBUF/SO_RCVBUF of both relayed sockets (the kernel may cap it):
with the default, a 512 MiB sync took 1.45-1.6x ``qemu-img convert``,
with 4 MiB 1.2-1.45x (bench/datapath.py's sync, interleaved runs)."""


class Relay:
    """The relay of one mirror (see the module docstring). Its clock
    fields are :func:`time.monotonic` values, written by the pump threads
    and read by the worker's loop."""

    def __init__(self, remote: socket.socket, listener: socket.socket, path: str) -> None:
        self.remote = remote
        self.listener = listener
        self.path = path
        self.local: Optional[socket.socket] = None
        self.last_reply = time.monotonic()  # the target last sent us something
        self.ended: Optional[str] = None  # why the connection is over, once it is
        self._cut = threading.Event()

    @classmethod
    def open(cls, address: Address, path: str, deadline: float) -> "Relay":
        """Connect to the target and see its greeting before ``deadline``,
        then listen on ``path`` for the daemon. MirrorFailed, naming what
        did not happen, otherwise."""
        what = str(address)
        remote = _connect(address, deadline)
        try:
            _await_greeting(remote, what, deadline)
            remote.settimeout(None)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _unlink(path)  # a leftover of a killed worker of ours: same private name
                listener.bind(path)
                os.chmod(path, 0o600)
                listener.listen(1)
            except OSError as e:
                listener.close()
                raise MirrorFailed("cannot listen on %s for the mirror's connection: %s" % (path, e.strerror)) from None
        except BaseException:
            remote.close()
            raise
        relay = cls(remote, listener, path)
        threading.Thread(target=relay._accept, args=(deadline,), name="relay-accept", daemon=True).start()
        return relay

    def _accept(self, deadline: float) -> None:
        """Take the daemon's one connection, then pump both ways."""
        try:
            ready, _, _ = select.select([self.listener], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or self._cut.is_set():
                raise OSError("the storage daemon did not connect")
            self.local, _ = self.listener.accept()
        except OSError as e:
            self._end("no connection from the storage daemon: %s" % (e.strerror or e))
            return
        finally:
            self.listener.close()
            _unlink(self.path)
        if self._cut.is_set():  # cut while we accepted: honour it on the new socket too
            self._shutdown()
            return
        for sock in (self.local, self.remote):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:
                    pass  # the default then: slower, not wrong
        threading.Thread(target=self._pump, args=(self.local, self.remote, BUFFER, False), name="relay-out",
                         daemon=True).start()
        self._pump(self.remote, self.local, REPLY_BUFFER, True)

    def _pump(self, src: socket.socket, dst: socket.socket, size: int, replies: bool) -> None:
        buf = memoryview(bytearray(size))
        while True:
            try:
                n = src.recv_into(buf)
            except OSError as e:
                self._end("relay I/O failed: %s" % (e.strerror or e))
                return
            if not n:
                self._end("the %s closed the connection" % ("target" if replies else "storage daemon"))
                return
            if replies:
                self.last_reply = time.monotonic()
            if self.ended is not None:
                # Over: what still comes is read and dropped, down to the
                # end-of-file the shutdown gives. A daemon blocked sending
                # into a full socket is released only that way (its own
                # shutdown does not wake a writer) and then sees the error.
                continue
            try:
                dst.sendall(buf[:n])
            except OSError as e:
                self._end("relay I/O failed: %s" % (e.strerror or e))

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        self._shutdown()

    def _shutdown(self) -> None:
        # shutdown, not close: it wakes the other pump blocked on the same
        # socket, and the daemon's reads see end-of-file at once.
        for sock in (self.local, self.remote):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self, why: str) -> None:
        """End the connection now (see the module docstring)."""
        self._cut.set()
        self._end(why)

    def close(self) -> None:
        """Release every socket (after the daemon let go of its end)."""
        self._cut.set()
        self._shutdown()
        for sock in (self.local, self.remote, self.listener):
            if sock is not None:
                sock.close()
        _unlink(self.path)


def _connect(address: Address, deadline: float) -> socket.socket:
    timeout = max(0.001, deadline - time.monotonic())
    try:
        if address.socket_path is None:
            sock = socket.create_connection((address.host or "", address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise MirrorFailed("cannot connect to the mirror's target %s: %s" % (address, e.strerror or e or "timed out")) from None


def _await_greeting(sock: socket.socket, what: str, deadline: float) -> None:
    """Wait until the target's greeting is there, leaving it unread for the
    daemon's client."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MirrorFailed("the mirror's target %s accepted the connection but sent no NBD greeting" % what)
        sock.settimeout(remaining)
        try:
            head = sock.recv(len(GREETING), socket.MSG_PEEK)
        except socket.timeout:
            continue
        except OSError as e:
            raise MirrorFailed("the mirror's target %s failed before its greeting: %s" % (what, e.strerror or e)) from None
        if not head:
            raise MirrorFailed("the mirror's target %s closed the connection before its greeting" % what)
        if not GREETING.startswith(head[:len(GREETING)]):
            raise MirrorFailed("the mirror's target %s is not an NBD server (it sent %r)" % (what, head))
        if len(head) == len(GREETING):
            return
        time.sleep(0.001)  # part of it arrived: the rest follows at once


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
