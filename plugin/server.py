"""The task daemon: every method of :mod:`plugin.registry` as JSON-RPC over
HTTP/1.1 on a Unix-domain socket.

    python3 -m plugin.server [--socket PATH] [--foreground | --detach [--pidfile F]]
                             [--group NAME] [--max-connections N]

A request is the same JSON-RPC envelope the executables read in envelope
mode, POSTed to any path::

    curl --unix-socket /run/xapi-storage-tasks/daemon.sock \\
         -d '{"method": "Task.ls", "params": [{"dbg": "x"}], "id": 1}' http://localhost/

and the answer is the envelope they print, byte for byte (errors carry the
same XAPI error record). Every call goes through :func:`plugin.runner.call`,
in this process, on the state directory of ``TASK_STATE_DIR`` (or the
default), so the daemon and the executables can be used at the same time on
the same tasks.

Requests that fail before a request object exists (HTTP refusals, bodies
that are not JSON or not an object) are answered in the JSON-RPC 2.0 form,
``{"jsonrpc": "2.0", "error": {"code", "message", "data": <record>}, "id":
null}``, the only form that defines an answer to a request whose id is
unknown: -32700 for unparseable JSON, -32600 for an invalid request,
-32000 for refusals. Such answers come with an HTTP error status; every
answer to a parsed request is HTTP 200.

Connections: one thread each, at most ``--max-connections`` at a time (the
next one is answered 503 and closed, without a thread); keep-alive; a
request must arrive within ``--timeout`` seconds of its first byte, and an
idle connection is closed after as long. Peers are checked with
SO_PEERCRED: the daemon's own uid, root and, with ``--group``, members of
that group; others get 403. The socket is 0600 (0660 and the group with
``--group``).

Start-up refuses to steal a live socket (a lock file beside it is held for
the daemon's life, and a socket that accepts a connection is live); a
socket left by a crashed daemon refuses connections and is replaced.
SIGTERM (or SIGINT, SIGHUP) stops accepting, removes the socket, closes
idle connections, lets requests in progress finish (at most
``--shutdown-timeout`` seconds; a second signal stops waiting) and exits 0.

Workers started through the daemon (``Data.copy``) are forked by
:func:`plugin.worker.spawn` from a thread of this process; see
:func:`prepare_for_forks` for what makes that safe. They are detached
exactly as when an executable starts them, so stopping or restarting the
daemon neither kills nor orphans a task.
"""

import argparse
import errno
import fcntl
import grp
import importlib
import os
import pkgutil
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback

import plugin
from plugin import codec, httpio, registry, runner, store
from plugin.errors import InternalError, InvalidArguments, PluginError
from plugin.store import Store

PROG = "xapi-storage-tasksd"
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
BACKLOG = 128
LINGER = 2.0          # seconds a refused connection may take to send its request
MAX_LINGERING = 256   # refused connections drained at once, beyond which they are just closed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
SERVER_ERROR = -32000

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python names it only from 3.x on some builds

# Held around every call in this process that can hold a C library lock
# while the GIL is released (syslog, stderr writes), and by the forking
# thread across fork(): see prepare_for_forks.
_FORK_GUARD = threading.Lock()


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


# -- JSON-RPC ---------------------------------------------------------------------


def _error_response(error, request_id, v2, rpc_code=None):
    record = codec.error_record(error, codec.traceback_frames(error))
    response = codec.encode_error_response(record, request_id, v2)
    if v2 and rpc_code is not None:
        response["error"]["code"] = rpc_code
    return response


def dispatch(body, log=None):
    """One JSON-RPC request body (bytes) -> the response object. Never
    raises: every failure is an error response, as the executables print
    it. ``log(text)`` receives the traceback of unexpected errors."""
    try:
        request = runner.parse_json(body)
    except PluginError as error:
        return _error_response(error, None, True, PARSE_ERROR)
    if not isinstance(request, dict):
        why = "batch requests are not supported" if isinstance(request, list) else "a request must be a JSON object"
        return _error_response(InvalidArguments(why), None, True, INVALID_REQUEST)
    v2 = request.get("jsonrpc") == "2.0"
    request_id = request.get("id")
    try:
        if not codec.is_envelope(request):
            raise InvalidArguments('a request needs "method" and "params"')
        method, params, _, _ = codec.decode_request(request)
    except PluginError as error:
        return _error_response(error, request_id, v2, INVALID_REQUEST)
    try:
        return codec.encode_response(runner.call(method, params), request_id, v2)
    except BaseException as exc:  # the boundary, as in runner.main: every failure becomes a record
        error = runner.as_plugin_error(exc)
        if not isinstance(exc, PluginError) and log is not None:
            log("%s failed unexpectedly:\n%s" % (method, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        return _error_response(error, request_id, v2)


def encode_body(response):
    """The response body as the executables print it: JSON and a newline."""
    return (codec.dumps(response) + "\n").encode("utf-8")


def refusal_body(status, error):
    """The JSON-RPC 2.0 error answer for an HTTP-level refusal."""
    # The request's fault (malformed, too big, too slow, wrong method or
    # version) is an invalid request; a refusal of the peer or a failure of
    # ours is a server error.
    rpc_code = SERVER_ERROR if status in (403, 500, 503) else INVALID_REQUEST
    return encode_body(_error_response(error, None, True, rpc_code))


# -- peers ----------------------------------------------------------------------------


def peer_credentials(sock):
    """``(pid, uid, gid)`` of the process that connected ``sock`` (struct
    ucred: a signed pid, unsigned ids)."""
    return struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII")))


def peer_groups(sock):
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


# -- systemd ----------------------------------------------------------------------------


def _take_notify_socket():
    """The sd_notify address from ``$NOTIFY_SOCKET``, removed from the
    environment so that workers never inherit it."""
    address = os.environ.pop("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace
    return address if address.startswith("/") else None


def sd_notify(address, state):
    """Send ``state`` (e.g. ``READY=1``) to systemd; False if there is no
    notify socket or it cannot be reached."""
    if not address:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


# -- logging -------------------------------------------------------------------------


class Log:
    """Daemon events: on stderr in the foreground (the journal under
    systemd), in the store's log (syslog or ``logs/store.log``) when
    detached."""

    def __init__(self, to_stderr):
        self.to_stderr = to_stderr

    def __call__(self, message):
        if self.to_stderr:
            with _FORK_GUARD:
                try:
                    sys.stderr.write("%s[%d]: %s\n" % (PROG, os.getpid(), message))
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            return
        from plugin import log

        try:
            with Store() as store:
                log.store_event(store, "%s: %s" % (PROG, message))
        except Exception:
            pass  # logging must never take the daemon down


# -- fork safety ------------------------------------------------------------------------


def _guard(function):
    def guarded(*args, **kwargs):
        with _FORK_GUARD:
            return function(*args, **kwargs)

    guarded.__doc__ = function.__doc__
    guarded.__wrapped__ = function
    return guarded


def _after_fork_in_child():
    _FORK_GUARD.release()
    # The child is a worker-to-be: give it the signal dispositions an
    # executable's child would have, and never let a signal write the
    # wake-up byte into whatever file later reuses that descriptor number.
    try:
        signal.set_wakeup_fd(-1)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
    except ValueError:
        pass


def prepare_for_forks():
    """Make :func:`plugin.worker.spawn` safe to call from a server thread.

    fork() copies only the calling thread; a lock another thread held at
    that instant stays held forever in the child. The child runs Python (it
    opens a DaemonContext, then the operation), so:

    - every module of the ``plugin`` package, python-daemon and syslog are
      imported now, so no server thread is ever inside an import (holding a
      module lock) when a worker is forked, and the child imports nothing
      new that a thread could be importing;
    - the only C-library lock a server thread can hold with the GIL
      released is syslog's (and the stderr buffer's): those calls and fork()
      itself take ``_FORK_GUARD``, so a fork never happens inside one;
    - in the child, the signal handlers and wake-up descriptor of the
      daemon are reset to the defaults an executable's child would have.

    Call once, in the process that will serve, before starting threads.
    """
    for info in pkgutil.iter_modules(plugin.__path__):
        importlib.import_module("plugin." + info.name)
    for name in ("daemon", "syslog"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # without python-daemon no call can start a worker anyway
    import syslog

    for name in ("openlog", "syslog", "closelog"):
        if not hasattr(getattr(syslog, name), "__wrapped__"):
            setattr(syslog, name, _guard(getattr(syslog, name)))
    os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                        after_in_child=_after_fork_in_child)


# -- the socket ------------------------------------------------------------------------------


def _check_parent(path):
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StartupError("cannot create %s: %s" % (parent, e.strerror))
    st = os.stat(parent)
    if st.st_uid not in (os.geteuid(), 0):
        raise StartupError("%s is owned by uid %d: the socket must be in a directory of uid %d or root" % (parent, st.st_uid, os.geteuid()))
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StartupError("%s is writable by group or others (mode %o): another user could replace the socket" % (parent, st.st_mode & 0o7777))


def _take_lock(path):
    """Hold ``PATH.lock`` for the daemon's life: exactly one daemon serves
    a socket path, even when two start at once. The kernel drops the lock
    when the daemon dies, however it dies."""
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartupError("cannot open %s: %s" % (lock_path, e.strerror))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StartupError("%s is not a regular file" % lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise StartupError("another daemon (pid %s) is serving %s; not taking it over" % (holder, path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_stale(path):
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
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except socket.timeout:
        raise StartupError("a server holds %s but does not accept connections; not taking it over" % path)
    except OSError as e:
        raise StartupError("cannot check whether %s is in use: %s" % (path, e.strerror))
    else:
        pid = peer_credentials(probe)[0]
        raise StartupError("a live server (pid %d) is serving %s; not taking it over" % (pid, path))
    finally:
        probe.close()


class PidFile:
    """A pidfile for python-daemon: written (and flocked) once the daemon
    has detached, removed when it exits."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.fd = None
        self.ident = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                raise StartupError("pidfile %s is held by pid %s" % (self.path, holder))
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident = fd, (st.st_dev, st.st_ino)
        return self

    def __exit__(self, *exc):
        if self.fd is None:
            return
        _unlink_if_same(self.path, self.ident)
        os.close(self.fd)
        self.fd = None


def _unlink_if_same(path, ident):
    """Unlink ``path`` only if it is still the file we made."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


# -- the daemon -----------------------------------------------------------------------------


class Daemon:
    """One listening socket and the connections it accepted."""

    def __init__(self, path, gid=None, max_connections=DEFAULT_MAX_CONNECTIONS, timeout=DEFAULT_TIMEOUT,
                 shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT, log=None):
        self.path = os.path.abspath(path)
        self.gid = gid
        self.allowed_uids = {os.geteuid(), 0}
        self.max_connections = max_connections
        self.timeout = timeout
        self.shutdown_timeout = shutdown_timeout
        self.log = log or Log(True)
        self.notify = None  # sd_notify address, told STOPPING=1 at shutdown
        self.signals = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._conns = {}  # socket -> "idle" | "busy"
        self._stopping = False
        self._listener = None
        self._sel = None
        self._lock_fd = None
        self._ident = None
        self._lingering = {}  # refused socket -> deadline
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- start and stop --------------------------------------------------------

    def bind(self):
        """Claim the socket path and listen. Raises StartupError."""
        if len(os.fsencode(self.path)) > 107:
            raise StartupError("socket path %s is longer than 107 bytes, the AF_UNIX limit" % self.path)
        _check_parent(self.path)
        self._lock_fd = _take_lock(self.path)
        if _remove_stale(self.path):
            self.log("replaced the stale socket %s" % self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # never visible with a wider mode, not even for an instant
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise StartupError("cannot bind %s: %s" % (self.path, e.strerror))
        finally:
            os.umask(old)
        st = os.lstat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        try:
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
                os.chmod(self.path, 0o660)
        except OSError as e:
            self._remove_socket()
            sock.close()
            raise StartupError("cannot give %s to group %d: %s" % (self.path, self.gid, e.strerror))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self._listener = sock
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._woken)

    def record_pid(self):
        """Write this process's pid into the socket's lock file (read by a
        second daemon to say who holds the socket)."""
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, b"%d\n" % os.getpid(), 0)

    def fds(self):
        """Descriptors that must survive detaching."""
        return [self._listener.fileno(), self._lock_fd, self._wake_r, self._wake_w, self._sel.fileno()]

    def install_signal_handlers(self):
        """SIGTERM, SIGINT and SIGHUP stop the daemon; the wake-up
        descriptor makes them interrupt the accept loop whichever thread
        the kernel delivers them to."""
        signal.set_wakeup_fd(self._wake_w)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signals += 1

    def request_stop(self):
        """Stop as a signal would (for embedding and tests)."""
        self.signals += 1
        try:
            os.write(self._wake_w, bytes([signal.SIGTERM]))
        except OSError:
            pass

    def _remove_socket(self):
        if self._ident is not None:
            _unlink_if_same(self.path, self._ident)
            self._ident = None

    # -- the accept loop -------------------------------------------------------------------

    def serve(self):
        """Accept and serve until a stop signal, then shut down cleanly.
        Returns the number of requests still in progress when the daemon
        gave up waiting for them (0 normally)."""
        sel = self._sel
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

    def _woken(self, sel, fd):
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        if any(b in data for b in STOP_SIGNALS):
            self._stopping = True

    def _accept(self, sel, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of descriptors: back off instead of spinning on a
                # listener that stays readable.
                self.log("accept failed: %s" % e.strerror)
                time.sleep(0.05)
                return
            self._admit(sel, conn)

    def _refusal(self, conn):
        """Why the peer on ``conn`` may not talk to us, or None."""
        pid, uid, gid = peer_credentials(conn)
        if uid in self.allowed_uids:
            return None
        if self.gid is not None and (gid == self.gid or self.gid in peer_groups(conn)):
            return None
        return "pid %d uid %d gid %d is not allowed" % (pid, uid, gid)

    def _admit(self, sel, conn):
        try:
            why = self._refusal(conn)
        except OSError:
            conn.close()
            return
        if why is not None:
            self.log("refused a connection: %s" % why)
            self._refuse(sel, conn, 403, httpio.PermissionDenied(why))
            return
        with self._lock:
            full = len(self._conns) >= self.max_connections
            if not full:
                self._conns[conn] = "idle"
        if full:
            self._refuse(sel, conn, 503, httpio.ServiceUnavailable("%d connections are open, the limit" % self.max_connections))
            return
        try:
            threading.Thread(target=self._connection, args=(conn,), name="conn-%d" % conn.fileno(), daemon=True).start()
        except RuntimeError:  # no more threads: treat as full
            self._forget(conn)
            self._refuse(sel, conn, 503, httpio.ServiceUnavailable("cannot start a thread"))

    def _refuse(self, sel, conn, status, error):
        """Answer without reading the request, then drain what the peer
        sends for a moment before closing: closing with unread data would
        make the peer see a reset instead of our answer."""
        try:
            conn.setblocking(False)
            conn.send(httpio.format_response(status, refusal_body(status, error), False))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= MAX_LINGERING:
            conn.close()
            return
        self._lingering[conn] = time.monotonic() + LINGER
        sel.register(conn, selectors.EVENT_READ, self._drain)

    def _drain(self, sel, conn):
        try:
            if conn.recv(httpio.CHUNK):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop_lingering(sel, conn)

    def _drop_lingering(self, sel, conn):
        self._lingering.pop(conn, None)
        sel.unregister(conn)
        conn.close()

    def _expire_lingering(self, sel):
        now = time.monotonic()
        for conn in [c for c, deadline in self._lingering.items() if deadline <= now]:
            self._drop_lingering(sel, conn)

    # -- connections -------------------------------------------------------------------------

    def _busy(self, conn):
        with self._lock:
            self._conns[conn] = "busy"

    def _idle(self, conn):
        """Mark ``conn`` idle between requests; False once stopping."""
        with self._lock:
            if self._stopping:
                return False
            self._conns[conn] = "idle"
            return True

    def _forget(self, conn):
        with self._lock:
            self._conns.pop(conn, None)
            self._changed.notify_all()

    def _connection(self, conn):
        reader = httpio.Reader(conn)
        try:
            while True:
                # A connection accepted while stopping was queued before the
                # socket went away: serve what it already sent, not wait.
                idle = self.timeout if not self._stopping else min(self.timeout, 1.0)
                try:
                    request = httpio.read_request(reader, idle, self.timeout, on_start=lambda: self._busy(conn))
                except httpio.Closed:
                    return
                except httpio.HttpError as e:
                    self._answer_refusal(conn, e)
                    return
                response = dispatch(request.body, self.log)
                keep = request.keep_alive and not self._stopping
                conn.settimeout(self.timeout)
                conn.sendall(httpio.format_response(200, encode_body(response), keep))
                if not keep or not self._idle(conn):
                    return
        except OSError:
            pass  # the peer went away or stopped reading: nothing to answer
        except Exception as exc:  # a bug here must cost one connection, not the daemon
            self.log("connection failed:\n%s" % "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            try:
                conn.sendall(httpio.format_response(500, refusal_body(500, InternalError(str(exc))), False))
            except OSError:
                pass
        finally:
            self._forget(conn)
            conn.close()

    def _answer_refusal(self, conn, e):
        error = InvalidArguments(e.message)
        try:
            conn.settimeout(self.timeout)
            conn.sendall(httpio.format_response(e.status, refusal_body(e.status, error), False, e.headers))
            conn.shutdown(socket.SHUT_WR)
            # Read (and drop) what the peer is still sending, briefly, so that
            # it sees our answer rather than a reset.
            deadline = time.monotonic() + LINGER
            drained = 0
            while drained <= 2 * httpio.MAX_BODY:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                conn.settimeout(remaining)
                data = conn.recv(httpio.CHUNK)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    # -- shutdown -------------------------------------------------------------------------------

    def _shutdown(self, sel):
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


# -- detaching ---------------------------------------------------------------------------------


def _read_all(fd, timeout):
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def detach(keep_fds, pidfile):
    """Become a daemon with python-daemon (own session, umask 077, cwd /,
    standard streams on /dev/null, every other descriptor closed), writing
    ``pidfile`` if given. The invoking process waits until the daemon says
    it is ready, then exits 0 (or 1, printing why it is not). Returns the
    descriptor to report readiness on (see :func:`report_ready`)."""
    import daemon as python_daemon

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        os.waitpid(pid, 0)  # the intermediate process exits as soon as it has forked
        verdict = _read_all(ready_r, 60.0)
        if verdict.startswith(b"!"):
            os._exit(0)
        sys.stderr.write("%s: %s\n" % (PROG, verdict[1:].decode("utf-8", "replace") or "the daemon exited during start-up"))
        sys.stderr.flush()
        os._exit(1)
    os.close(ready_r)
    try:
        python_daemon.DaemonContext(
            detach_process=True,
            umask=0o077,
            working_directory="/",
            files_preserve=list(keep_fds) + [ready_w],
            signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
            pidfile=PidFile(pidfile) if pidfile else None,
            prevent_core=True,
        ).open()
    except BaseException as exc:
        os.write(ready_w, b"?" + str(exc).encode("utf-8", "replace"))
        os._exit(1)
    return ready_w


def report_ready(fd):
    """Tell the process that ran ``--detach`` that the daemon serves."""
    os.write(fd, b"!")
    os.close(fd)


# -- command line ----------------------------------------------------------------------------------


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def _parser():
    parser = argparse.ArgumentParser(
        prog="python3 -m plugin.server",
        description="Serve the storage plugin's methods (%s) as JSON-RPC over HTTP/1.1 on a Unix socket."
        % ", ".join(sorted(registry.METHODS)),
    )
    parser.add_argument("--socket", default=None, help="socket path (default: %s)" % httpio.default_socket())
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true", help="stay in the foreground (the default; for systemd, Type=notify)")
    mode.add_argument("--detach", action="store_true", help="detach with python-daemon once listening")
    parser.add_argument("--pidfile", help="with --detach: write the daemon's pid here")
    parser.add_argument("--group", help="also allow members of this group (socket mode 0660)")
    parser.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS,
                        help="concurrent connections; more are answered 503 (default %d)" % DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT,
                        help="seconds a request may take to arrive, and a connection may idle (default %g)" % DEFAULT_TIMEOUT)
    parser.add_argument("--shutdown-timeout", type=_positive(float), default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="seconds to let requests in progress finish on SIGTERM (default %g)" % DEFAULT_SHUTDOWN_TIMEOUT)
    return parser


def _group_id(name):
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError("no group named %r" % name)


def main(argv=None):
    """Run the daemon; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.pidfile and not args.detach:
        parser.error("--pidfile needs --detach")
    # Everything absolute before detaching moves us to /.
    state = os.environ.get("TASK_STATE_DIR")
    if state:
        os.environ["TASK_STATE_DIR"] = os.path.abspath(state)
    os.umask(0o077)
    log = Log(to_stderr=not args.detach)
    try:
        gid = _group_id(args.group) if args.group else None
        try:
            with Store():
                pass  # a bad state directory fails now, not at the first call
        except PluginError as e:
            raise StartupError(str(e))
        server = Daemon(args.socket or httpio.default_socket(), gid, args.max_connections, args.timeout,
                        args.shutdown_timeout, log)
        server.bind()
    except StartupError as e:
        sys.stderr.write("%s: %s\n" % (PROG, e))
        return 1
    ready = None
    if args.detach:
        ready = detach(server.fds(), args.pidfile)
        server.record_pid()  # the lock file named the process that ran --detach
    notify = _take_notify_socket()
    prepare_for_forks()
    server.install_signal_handlers()
    server.notify = notify
    log("serving %s (pid %d, state directory %s)" % (server.path, os.getpid(), os.path.abspath(store.default_path())))
    if ready is not None:
        report_ready(ready)
    sd_notify(notify, "READY=1\nMAINPID=%d\nSTATUS=serving %s" % (os.getpid(), server.path))
    server.serve()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
