"""A Python client for the plugin's methods, as the interface documents
show it::

    from plugin import client

    c = client.connect()                         # the daemon, else the executables
    c.Task.ls(dbg="x")
    c.Task.stat(dbg="x", id=task_id)
    c.Task.stat({"dbg": "x", "id": task_id})     # one params dict, as in the documents
    c.Data.copy(dbg="x", uri=src, domain="0", remote=dst)

Methods come from :data:`plugin.registry.METHODS` (an unknown one is an
AttributeError). A failed call raises the :mod:`plugin.errors` class whose
``name`` is the error record's ``params[0]``, with the same details; its
``record`` attribute holds the whole record. Names this client does not
know become a subclass of :class:`~plugin.errors.PluginError` with that
``name``.

Transports:

- **the daemon** (:mod:`plugin.server`): JSON-RPC over HTTP/1.1 on its Unix
  socket, one persistent connection per concurrent caller, reused from
  call to call;
- **the executables** in ``bin/`` (``--json`` mode), one process per call,
  so a client works where no daemon runs.

``connect(socket=PATH)`` always uses that socket. ``connect()`` uses the
daemon at :func:`plugin.httpio.default_socket` if one answers there, and the
executables otherwise, deciding again at every call that finds no daemon (a
call that could not connect was never sent, so taking the other way is
safe).
"""

import json
import os
import shutil
import socket as _socket
import subprocess
import sysconfig
import threading
import time

from plugin import httpio, registry
from plugin.errors import InternalError, InvalidArguments, PluginError

DEFAULT_TIMEOUT = 60.0
MAX_IDLE_CONNECTIONS = 8
INSTALLED_PLUGIN_DIR = "/usr/libexec/xapi-storage-script/datapath/xapi-storage-tasks"


class DaemonUnavailable(PluginError):
    """The daemon could not be reached, or broke the connection without an
    answer. Raised by the client only; never on the wire. ``absent`` is
    true when nothing listens at the socket (no such file, or connection
    refused): the request was certainly not served."""

    name = "Daemon_unavailable"
    absent = False


# -- errors by name -------------------------------------------------------------------

_dynamic = {}
_dynamic_lock = threading.Lock()


def _known_classes():
    found, todo = {}, list(PluginError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        found.setdefault(cls.name, cls)  # breadth first: the least derived class of a name wins
        todo.extend(cls.__subclasses__())
    return found


def error_class(name):
    """The :class:`PluginError` subclass for an error name; a new subclass
    (made once per name) for a name no class has."""
    cls = _known_classes().get(name)
    if cls is not None:
        return cls
    with _dynamic_lock:
        cls = _dynamic.get(name)
        if cls is None:
            cls = _dynamic[name] = type(str(name), (PluginError,), {"name": name, "__module__": __name__})
        return cls


def error_from_record(record):
    """The exception for an XAPI error record (``{code, params,
    backtrace}``); ``exc.record`` is the record."""
    params = record.get("params") if isinstance(record, dict) else None
    if not (isinstance(params, list) and params and all(isinstance(p, str) for p in params)):
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
    exc.record = record
    return exc


def _result_of(response, request_id):
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

    def __init__(self, path, timeout):
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.reader = httpio.Reader(self.sock)
        self.timeout = timeout
        self.used = 0

    def exchange(self, body):
        """Send one request, return the response."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(httpio.format_request(body))
        response = httpio.read_response(self.reader, self.timeout)
        self.used += 1
        return response

    def close(self):
        """Close the connection."""
        self.sock.close()


class SocketTransport:
    """Calls over the daemon's socket, reusing connections.

    Each caller takes an idle connection (or opens one) and gives it back
    after the call, so threads can call at once; after a fork the child
    opens its own."""

    def __init__(self, path, timeout=DEFAULT_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self.connections_made = 0
        self._idle = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._next_id = 0

    def _take(self):
        with self._lock:
            if self._pid != os.getpid():  # forked: those sockets are the parent's
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        conn = _Connection(self.path, self.timeout)
        with self._lock:
            self.connections_made += 1
        return conn

    def _give_back(self, conn):
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def connect_error(self, exc):
        """The error for a connection that could not be made."""
        error = DaemonUnavailable("cannot connect to the task daemon at %s: %s" % (self.path, getattr(exc, "strerror", None) or exc))
        error.absent = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
        return error

    def call(self, method, params):
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
                raise self.connect_error(e)
            reused = conn.used > 0
            try:
                response = conn.exchange(body)
            except (httpio.Closed, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                # A kept-alive connection the daemon closed before reading our
                # request (idle timeout, restart): the request was never
                # served, so sending it again is safe. Only once.
                if reused and attempt == 1:
                    self.close()  # its idle siblings are from the same daemon: as stale
                    continue
                raise DaemonUnavailable("the task daemon at %s closed the connection without answering: %s" % (self.path, e))
            except _socket.timeout:
                conn.close()
                raise DaemonUnavailable("the task daemon at %s did not answer within %g s" % (self.path, self.timeout))
            except (httpio.HttpError, OSError) as e:
                conn.close()
                raise DaemonUnavailable("bad answer from the task daemon at %s: %s" % (self.path, e))
            break
        if response.keep_alive:
            self._give_back(conn)
        else:
            conn.close()
        try:
            decoded = json.loads(response.body.decode("utf-8"))
        except ValueError:
            raise InternalError("the task daemon answered HTTP %d without JSON" % response.status)
        return _result_of(decoded, request_id if response.status == 200 else decoded.get("id"))

    def close(self):
        """Close idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def default_bin_dir():
    """Where the executables are: ``bin/`` of this checkout, the installed
    plugin directory, the scripts directory of this Python, or ``$PATH``."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [os.path.join(here, "bin"), INSTALLED_PLUGIN_DIR, sysconfig.get_path("scripts")]
    probe = next(iter(registry.METHODS))
    for path in candidates:
        if path and os.access(os.path.join(path, probe), os.X_OK):
            return path
    found = shutil.which(probe)
    return os.path.dirname(found) if found else None


class ExecTransport:
    """Calls by running ``bin/<Interface.method> --json``, one process each."""

    def __init__(self, bin_dir=None, timeout=DEFAULT_TIMEOUT):
        self.bin_dir = bin_dir or default_bin_dir()
        self.timeout = timeout
        if self.bin_dir is None:
            raise DaemonUnavailable("no task daemon, and no executables found (pass bin_dir)")

    def call(self, method, params):
        """Run the method's executable; return its result or raise."""
        found = registry.lookup(method)
        name = found[0] if found else method
        path = os.path.join(self.bin_dir, name)
        data = json.dumps(params).encode()
        try:
            proc = subprocess.run([path, "--json"], input=data, capture_output=True, timeout=self.timeout)
        except FileNotFoundError:
            raise error_class("Unimplemented")(name)
        except subprocess.TimeoutExpired:
            raise InternalError("%s did not finish within %g s" % (path, self.timeout))
        try:
            value = json.loads(proc.stdout.decode("utf-8"))
        except ValueError:
            raise InternalError("%s exited with status %d and no JSON: %s" % (path, proc.returncode, proc.stderr.decode("utf-8", "replace")[-300:]))
        if proc.returncode == 0:
            return value
        if proc.returncode == 1 and isinstance(value, dict):
            raise error_from_record(value)
        raise InternalError("%s exited with status %d" % (path, proc.returncode))

    def close(self):
        """Nothing to release."""


class AutoTransport:
    """The daemon at the default socket when it answers, else the
    executables."""

    def __init__(self, path, bin_dir=None, timeout=DEFAULT_TIMEOUT):
        self.socket = SocketTransport(path, timeout)
        self._bin_dir = bin_dir
        self._timeout = timeout
        self._exec = None

    @property
    def executables(self):
        """The fallback transport, made on first use."""
        if self._exec is None:
            self._exec = ExecTransport(self._bin_dir, self._timeout)
        return self._exec

    def call(self, method, params):
        """Try the daemon; where none can be connected to, the executables."""
        try:
            return self.socket.call(method, params)
        except DaemonUnavailable as e:
            if not e.absent:
                raise  # a daemon was reached (or refused us): that is the answer
        return self.executables.call(method, params)

    def close(self):
        """Close idle connections."""
        self.socket.close()


# -- the client object --------------------------------------------------------------------------------


class Method:
    """One registered method, callable as ``m(dbg=..., ...)``, ``m({...})``
    or positionally in the registry's parameter order."""

    def __init__(self, transport, name, spec):
        self._transport = transport
        self.name = name
        self.params = tuple(p for p, _ in spec)
        self.__doc__ = "%s(%s)" % (name, ", ".join(self.params))

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and isinstance(args[0], dict):
            params = dict(args[0])
        elif len(args) > len(self.params):
            raise TypeError("%s takes at most %d positional arguments" % (self.name, len(self.params)))
        else:
            params = dict(zip(self.params, args))
        for key, value in kwargs.items():
            if key in params:
                raise TypeError("%s got parameter %r twice" % (self.name, key))
            params[key] = value
        return self._transport.call(self.name, params)

    def __repr__(self):
        return "<method %s>" % self.__doc__


class Interface:
    """The methods of one interface (``Task``, ``Data``) as attributes."""

    def __init__(self, transport, name):
        self._transport = transport
        self._name = name
        self._methods = {key.split(".", 1)[1]: key for key in registry.METHODS if key.split(".", 1)[0] == name}

    def __getattr__(self, attr):
        key = self._methods.get(attr) if not attr.startswith("_") else None
        if key is None:
            raise AttributeError("%s has no method %r (registered: %s)" % (self._name, attr, ", ".join(sorted(self._methods))))
        return Method(self._transport, key, registry.METHODS[key][2])

    def __dir__(self):
        return sorted(self._methods)

    def __repr__(self):
        return "<interface %s: %s>" % (self._name, ", ".join(sorted(self._methods)))


class Client:
    """What :func:`connect` returns: one attribute per interface."""

    def __init__(self, transport):
        self.transport = transport
        self._interfaces = sorted({key.split(".", 1)[0] for key in registry.METHODS})

    def __getattr__(self, attr):
        if attr.startswith("_") or attr not in self._interfaces:
            raise AttributeError("no interface %r (registered: %s)" % (attr, ", ".join(self._interfaces)))
        return Interface(self.transport, attr)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._interfaces))

    def call(self, method, params):
        """Call a method by its full name with a params dict."""
        if registry.lookup(method) is None:
            raise AttributeError("no method %r" % method)
        return self.transport.call(registry.lookup(method)[0], params)

    def close(self):
        """Release the transport's connections."""
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(socket=None, bin_dir=None, timeout=DEFAULT_TIMEOUT):
    """A client. ``socket``: the daemon's socket path (always used when
    given); else the daemon at the default path if it answers, otherwise
    the executables in ``bin_dir`` (default: :func:`default_bin_dir`)."""
    if socket is not None:
        return Client(SocketTransport(socket, timeout))
    return Client(AutoTransport(httpio.default_socket(), bin_dir, timeout))


def wait(client, task_id, dbg="wait", interval=0.1, timeout=None):
    """Poll ``Task.stat`` until the task is no longer Pending; return its
    record. ``timeout`` (seconds) raises TimeoutError."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        record = client.Task.stat(dbg=dbg, id=task_id)
        if record["state"][0] != "Pending":
            return record
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("task %s still Pending after %g s" % (task_id, timeout))
        time.sleep(interval)


__all__ = ["connect", "Client", "DaemonUnavailable", "error_class", "error_from_record", "wait"]
