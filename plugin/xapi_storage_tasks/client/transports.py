"""How the client's calls reach the plugin, and how their answers come back.

- :class:`SocketTransport`: JSON-RPC over HTTP/1.1 (:mod:`xapi_storage_tasks.wire.httpio`)
  on the daemon's Unix socket, one persistent connection per concurrent
  caller, reused from call to call; a kept-alive connection the daemon
  closed before reading the request is retried once on a new one.
- :class:`ExecTransport`: the executables in ``bin/`` (``--json`` mode), one
  process per call, found by :func:`default_bin_dir`.
- :class:`AutoTransport`: the daemon when one listens at the socket, else
  the executables, decided again at every call that finds no daemon.

Every transport returns the method's result or raises the exception its
error record names: :func:`error_from_record`, through :func:`error_class`.
:mod:`xapi_storage_tasks.client.connection` builds the client object on these and is where
callers find them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sysconfig
import threading

from xapi_storage_tasks import registry
from xapi_storage_tasks.wire import httpio
from xapi_storage_tasks.wire.errors import DaemonUnavailable, InternalError, InvalidArguments, PluginError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Transport(Protocol):
        """What a client needs of a transport."""

        def call(self, method: str, params: dict) -> object: ...  # noqa: E704

        def close(self) -> None: ...  # noqa: E704
else:
    Transport = object

DEFAULT_TIMEOUT = 60.0
MAX_IDLE_CONNECTIONS = 8
INSTALLED_PLUGIN_DIR = "/usr/libexec/xapi-storage-script/datapath/xapi-storage-tasks"


# -- errors by name -------------------------------------------------------------------

_dynamic: dict[str, type[PluginError]] = {}
_dynamic_lock = threading.Lock()


def _known_classes() -> dict[str, type[PluginError]]:
    found: dict[str, type[PluginError]] = {}
    todo = list(PluginError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if "name" in vars(cls):  # not a base that only inherits a name
            found.setdefault(cls.name, cls)  # breadth first: the least derived class of a name wins
        todo.extend(cls.__subclasses__())
    return found


def error_class(name: str) -> type[PluginError]:
    """The :class:`PluginError` subclass for an error name; a new subclass
    (made once per name) for a name no class has."""
    cls = _known_classes().get(name)
    if cls is not None:
        return cls
    with _dynamic_lock:
        cls = _dynamic.get(name)
        if cls is None:
            # "xapi_storage_tasks.client.connection": where callers find error_class, and these classes
            namespace = {"name": name, "__module__": "xapi_storage_tasks.client.connection"}
            cls = _dynamic[name] = type(str(name), (PluginError,), namespace)
        return cls


def error_from_record(record: object) -> PluginError:
    """The exception for an XAPI error record (``{code, params,
    backtrace}``); ``exc.record`` is the record."""
    params = record.get("params") if isinstance(record, dict) else None
    exc: PluginError
    if not (isinstance(record, dict) and isinstance(params, list) and params and all(isinstance(p, str) for p in params)):
        exc = InternalError("malformed error record: %s" % json.dumps(record)[:200])
    else:
        cls = error_class(params[0])
        try:
            exc = cls(*params[1:])
        except TypeError:  # a subclass with its own constructor: set the fields directly
            exc = cls.__new__(cls)
            PluginError.__init__(exc, *params[1:])
        if record.get("code") not in (None, exc.code):
            exc.code = record["code"]
    exc.record = record  # type: ignore[attr-defined]  # documented: the whole record
    return exc


def _result_of(response: object, request_id: object) -> object:
    """A JSON-RPC response (1.0 or 2.0) -> the result, or raise its error."""
    if not isinstance(response, dict):
        raise InternalError("the daemon's answer is not a JSON-RPC response")
    error = response.get("error")
    if error is not None:
        if isinstance(error, dict) and "data" in error and "params" not in error:
            record = error["data"]  # JSON-RPC 2.0: the record travels in data
            if not isinstance(record, dict):
                raise InternalError("daemon error %s: %s" % (error.get("code"), error.get("message")))
        else:
            record = error
        raise error_from_record(record)
    if response.get("id") != request_id:
        raise InternalError("the daemon answered request %r, not %r" % (response.get("id"), request_id))
    return response.get("result")


# -- transports ------------------------------------------------------------------------------


class _Connection:
    """One keep-alive HTTP connection to the daemon."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.reader = httpio.Reader(self.sock)
        self.timeout = timeout
        self.used = 0

    def exchange(self, body: bytes) -> httpio.Response:
        """Send one request, return the response."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(httpio.format_request(body))
        response = httpio.read_response(self.reader, self.timeout)
        self.used += 1
        return response

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class SocketTransport:
    """Calls over the daemon's socket, reusing connections.

    Each caller takes an idle connection (or opens one) and gives it back
    after the call, so threads can call at once; after a fork the child
    opens its own."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.connections_made = 0
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._next_id = 0

    def _take(self) -> _Connection:
        with self._lock:
            if self._pid != os.getpid():  # forked: those sockets are the parent's
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        conn = _Connection(self.path, self.timeout)
        with self._lock:
            self.connections_made += 1
        return conn

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def connect_error(self, exc: OSError) -> DaemonUnavailable:
        """The error for a connection that could not be made."""
        return DaemonUnavailable("cannot connect to the task daemon at %s: %s" % (self.path, exc.strerror or exc), path=self.path,
                                 absent=isinstance(exc, (FileNotFoundError, ConnectionRefusedError)))

    def _unavailable(self, why: str) -> DaemonUnavailable:
        return DaemonUnavailable("the task daemon at %s %s" % (self.path, why), path=self.path)

    def call(self, method: str, params: dict) -> object:
        """Run ``method`` in the daemon; return its result or raise."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
        body = json.dumps({"method": method, "params": [params], "id": request_id}).encode()
        if len(body) > httpio.MAX_BODY:  # the daemon would refuse it (413) as the executables do
            raise InvalidArguments("input is larger than %d bytes" % httpio.MAX_BODY)
        for attempt in (1, 2):
            try:
                conn = self._take()
            except OSError as e:
                raise self.connect_error(e) from None
            reused = conn.used > 0
            try:
                response = conn.exchange(body)
            except (httpio.Closed, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                # Most likely a kept-alive connection the daemon closed before
                # reading our request (idle timeout, restart). It may also have
                # died while serving it, so resend (once) only what is safe
                # to run twice.
                found = registry.lookup(method)
                if reused and attempt == 1 and found is not None and found.idempotent:
                    self.close()  # its idle siblings are from the same daemon: as stale
                    continue
                raise self._unavailable("closed the connection without answering: %s" % e) from None
            except socket.timeout:
                conn.close()
                raise self._unavailable("did not answer within %g s" % self.timeout) from None
            except (httpio.HttpError, OSError) as e:
                conn.close()
                raise self._unavailable("gave a bad answer: %s" % e) from None
            break
        if response.keep_alive:
            self._give_back(conn)
        else:
            conn.close()
        try:
            decoded = json.loads(response.body.decode("utf-8"))
        except ValueError:
            raise InternalError("the task daemon answered HTTP %d without JSON" % response.status) from None
        if response.status != 200:
            # A refusal (403, 413, 503...): its error, whatever id it carries.
            if isinstance(decoded, dict) and decoded.get("error") is not None:
                return _result_of(decoded, decoded.get("id"))
            raise InternalError("the task daemon answered HTTP %d" % response.status)
        return _result_of(decoded, request_id)

    def close(self) -> None:
        """Close idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def default_bin_dir() -> str | None:
    """Where the executables are: ``bin/`` of this checkout, the installed
    plugin directory, the scripts directory of this Python, or ``$PATH``."""
    # plugin/xapi_storage_tasks/client/transports.py -> the checkout's root.
    checkout = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    candidates = [os.path.join(checkout, "bin"), INSTALLED_PLUGIN_DIR, sysconfig.get_path("scripts")]
    probe = next(iter(registry.METHODS))  # any method's executable will do
    for path in candidates:
        if path and os.access(os.path.join(path, probe), os.X_OK):
            return path
    found = shutil.which(probe)
    return os.path.dirname(found) if found else None


class ExecTransport:
    """Calls by running ``bin/<Interface.method> --json``, one process each."""

    def __init__(self, bin_dir: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        found = bin_dir or default_bin_dir()
        if found is None:
            raise DaemonUnavailable("no task daemon, and no executables found (pass bin_dir)")
        self.bin_dir = found
        self.timeout = timeout

    def call(self, method: str, params: dict) -> object:
        """Run the method's executable; return its result or raise."""
        found = registry.lookup(method)
        name = found.name if found else method
        path = os.path.join(self.bin_dir, name)
        data = json.dumps(params).encode()
        try:
            proc = subprocess.run([path, "--json"], input=data, capture_output=True, timeout=self.timeout)
        except FileNotFoundError:
            raise error_class("Unimplemented")(name) from None
        except subprocess.TimeoutExpired:
            raise InternalError("%s did not finish within %g s" % (path, self.timeout)) from None
        try:
            value = json.loads(proc.stdout.decode("utf-8"))
        except ValueError:
            raise InternalError("%s exited with status %d and no JSON: %s"
                                % (path, proc.returncode, proc.stderr.decode("utf-8", "replace")[-300:])) from None
        if proc.returncode == 0:
            return value
        if proc.returncode == 1 and isinstance(value, dict):
            raise error_from_record(value)
        raise InternalError("%s exited with status %d" % (path, proc.returncode))

    def close(self) -> None:
        """Nothing to release."""


class AutoTransport:
    """The daemon at the default socket when it answers, else the
    executables."""

    def __init__(self, path: str, bin_dir: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = SocketTransport(path, timeout)
        self._bin_dir = bin_dir
        self._timeout = timeout
        self._exec: ExecTransport | None = None

    @property
    def executables(self) -> ExecTransport:
        """The fallback transport, made on first use."""
        if self._exec is None:
            self._exec = ExecTransport(self._bin_dir, self._timeout)
        return self._exec

    def call(self, method: str, params: dict) -> object:
        """Try the daemon; where none can be connected to, the executables."""
        try:
            return self.socket.call(method, params)
        except DaemonUnavailable as e:
            if not e.absent:
                raise  # a daemon was reached (or refused us): that is the answer
        return self.executables.call(method, params)

    def close(self) -> None:
        """Close idle connections."""
        self.socket.close()
