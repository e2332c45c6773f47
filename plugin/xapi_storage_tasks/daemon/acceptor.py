"""The daemon's accept loop: one listening socket, the connections it
accepted, and a clean stop.

An :class:`Acceptor` binds its socket (:mod:`xapi_storage_tasks.daemon.listener`), then one
thread (:meth:`Acceptor.serve`) accepts connections and admits them: a peer
that is not allowed is answered 403 (``Permission_denied``) and, past
``max_connections``, 503 (``Service_unavailable``), both without a thread,
drained briefly so that the peer reads the answer rather than a reset.
Each admitted connection gets a thread that serves its requests
(:func:`xapi_storage_tasks.daemon.rpc.serve_connection`); the daemon tracks each one as idle
or busy.

A stop signal (or :meth:`Acceptor.request_stop`) wakes the loop through a
pipe. Stopping removes the socket, so new clients see no daemon at once,
serves the connections already queued, closes the idle ones, and waits
for requests in progress for at most ``shutdown_timeout`` seconds (a
second signal stops waiting).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import threading
import time

from xapi_storage_tasks.daemon import listener, rpc
from xapi_storage_tasks.daemon.daemonize import STOP_SIGNALS, Log, install_stop_handlers, sd_notify
from xapi_storage_tasks.wire import httpio
from xapi_storage_tasks.wire.errors import PermissionDenied, PluginError, ServiceUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
MAX_LINGERING = 256   # refused connections drained at once, beyond which they are just closed


class Acceptor:
    """One listening socket and the connections it accepted."""

    def __init__(self, path: str, gid: int | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 timeout: float = DEFAULT_TIMEOUT, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
                 log: Callable[[str], object] | None = None) -> None:
        self.path = os.path.abspath(path)
        self.gid = gid
        self.allowed_uids = {os.geteuid(), 0}
        self.max_connections = max_connections
        self.timeout = timeout
        self.shutdown_timeout = shutdown_timeout
        self.log = log or Log(True)
        self.notify: str | None = None  # sd_notify address, told STOPPING=1 at shutdown
        self.signals = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._conns: dict[socket.socket, str] = {}  # "idle" | "busy"
        self._stopping = False
        self._listener: socket.socket | None = None
        self._sel: selectors.DefaultSelector | None = None
        self._lock_fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._lingering: dict[socket.socket, float] = {}  # refused socket -> deadline
        self._wake_r, self._wake_w = self._wake_pipe()

    @staticmethod
    def _wake_pipe() -> tuple[int, int]:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        return read, write

    # -- start and stop --------------------------------------------------------

    def bind(self) -> None:
        """Claim the socket path and listen. Raises StartupError."""
        self._lock_fd = listener.claim(self.path)
        if listener.remove_stale(self.path):
            self.log("replaced the stale socket %s" % self.path)
        self._listener, self._ident = listener.listen(self.path, self.gid)
        self._new_loop()

    def _new_loop(self) -> None:
        assert self._listener is not None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._woken)

    def after_fork(self) -> None:
        """In a forked serving process: a selector and a wake-up pipe of
        its own (the inherited ones are shared with the other processes),
        the same listening socket."""
        assert self._sel is not None, "bind() first"
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r, self._wake_w = self._wake_pipe()
        self._new_loop()

    def close_lock(self) -> None:
        """Give up the socket path's lock (a supervisor that never served)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def record_pid(self) -> None:
        """Write this process's pid into the socket's lock file (read by a
        second daemon to say who holds the socket)."""
        assert self._lock_fd is not None, "bind() first"
        listener.write_pid(self._lock_fd)

    def fds(self) -> list[int]:
        """Descriptors that must survive detaching."""
        assert self._listener is not None and self._sel is not None and self._lock_fd is not None, "bind() first"
        return [self._listener.fileno(), self._lock_fd, self._wake_r, self._wake_w, self._sel.fileno()]

    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop the daemon; the wake-up
        descriptor makes them interrupt the accept loop whichever thread
        the kernel delivers them to."""
        install_stop_handlers(self._wake_w, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def request_stop(self) -> None:
        """Stop as a signal would (for embedding and tests)."""
        self.signals += 1
        try:
            os.write(self._wake_w, bytes([signal.SIGTERM]))
        except OSError:
            pass

    def _remove_socket(self) -> None:
        if self._ident is not None:
            listener.unlink_if_same(self.path, self._ident)
            self._ident = None

    # -- the accept loop -------------------------------------------------------------------

    def serve(self) -> int:
        """Accept and serve until a stop signal, then shut down cleanly.
        Returns the number of requests still in progress when the daemon
        gave up waiting for them (0 normally)."""
        sel = self._sel
        assert sel is not None, "bind() first"
        try:
            while not self._stopping:
                timeout = None
                if self._lingering:
                    timeout = max(0.0, min(self._lingering.values()) - time.monotonic())
                for key, _ in sel.select(timeout):
                    key.data(sel, key.fileobj)
                self._expire_lingering(sel)
            return self._shutdown(sel)
        finally:
            sel.close()

    def _woken(self, sel: selectors.BaseSelector, fd: int) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        if any(b in data for b in STOP_SIGNALS):
            self._stopping = True

    def _accept(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors: back off instead of spinning on a
                # listener that stays readable.
                self.log("accept failed: %s" % e.strerror)
                time.sleep(0.05)
                return
            self._admit(sel, conn)

    def _admit(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            why = listener.refusal(conn, self.allowed_uids, self.gid)
        except OSError:
            conn.close()
            return
        if why is not None:
            self.log("refused a connection: %s" % why)
            self._refuse(sel, conn, 403, PermissionDenied(why))
            return
        with self._lock:
            full = len(self._conns) >= self.max_connections
            if not full:
                self._conns[conn] = "idle"
        if full:
            self._refuse(sel, conn, 503, ServiceUnavailable("%d connections are open, the limit" % self.max_connections))
            return
        try:
            threading.Thread(target=self._connection, args=(conn,), name="conn-%d" % conn.fileno(), daemon=True).start()
        except RuntimeError:  # no more threads: treat as full
            self._forget(conn)
            self._refuse(sel, conn, 503, ServiceUnavailable("cannot start a thread"))

    def _refuse(self, sel: selectors.BaseSelector, conn: socket.socket, status: int, error: PluginError) -> None:
        """Answer without reading the request, then drain what the peer
        sends for a moment before closing: closing with unread data would
        make the peer see a reset instead of our answer."""
        try:
            conn.setblocking(False)
            conn.send(httpio.format_response(status, rpc.refusal_body(status, error), False))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= MAX_LINGERING:
            conn.close()
            return
        self._lingering[conn] = time.monotonic() + rpc.LINGER
        sel.register(conn, selectors.EVENT_READ, self._drain)

    def _drain(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            if conn.recv(httpio.CHUNK):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop_lingering(sel, conn)

    def _drop_lingering(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        self._lingering.pop(conn, None)
        sel.unregister(conn)
        conn.close()

    def _expire_lingering(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in [c for c, deadline in self._lingering.items() if deadline <= now]:
            self._drop_lingering(sel, conn)

    # -- connections -------------------------------------------------------------------------

    def _busy(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns[conn] = "busy"

    def _idle(self, conn: socket.socket) -> bool:
        """Mark ``conn`` idle between requests; False once stopping."""
        with self._lock:
            if self._stopping:
                return False
            self._conns[conn] = "idle"
            return True

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)
            self._changed.notify_all()

    def _connection(self, conn: socket.socket) -> None:
        try:
            rpc.serve_connection(conn, self.timeout, self.log, lambda: self._stopping,
                                 lambda: self._busy(conn), lambda: self._idle(conn))
        finally:
            self._forget(conn)
            conn.close()

    # -- shutdown -------------------------------------------------------------------------------

    def _shutdown(self, sel: selectors.BaseSelector) -> int:
        assert self._listener is not None and self._lock_fd is not None
        self._stopping = True
        sd_notify(self.notify, "STOPPING=1")
        self.log("stopping: no new connections; waiting up to %gs for requests in progress" % self.shutdown_timeout)
        self._remove_socket()  # new clients see no daemon at once
        while True:  # connections already queued were made before: serve them
            try:
                conn, _ = self._listener.accept()
            except OSError:
                break
            self._admit(sel, conn)
        sel.unregister(self._listener)
        self._listener.close()
        with self._lock:
            for conn, state in self._conns.items():
                if state == "idle":
                    try:
                        conn.shutdown(socket.SHUT_RD)  # its reader sees the end of stream
                    except OSError:
                        pass
            deadline = time.monotonic() + self.shutdown_timeout
            while self._conns and time.monotonic() < deadline and self.signals < 2:
                self._changed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = len(self._conns)
        for conn in list(self._lingering):
            self._drop_lingering(sel, conn)
        if left:
            self.log("exiting with %d request(s) still in progress" % left)
        os.close(self._lock_fd)
        self._lock_fd = None
        return left
