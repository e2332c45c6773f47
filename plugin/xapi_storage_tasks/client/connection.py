"""A Python client for the plugin's methods, as the interface documents
show it::

    from xapi_storage_tasks import connect

    c = connect()                                # the daemon, else the executables
    c.Task.ls(dbg="x")
    c.Task.stat(dbg="x", id=task_id)
    c.Task.stat({"dbg": "x", "id": task_id})     # one params dict, as in the documents
    c.Data.copy(dbg="x", uri=src, domain="0", remote=dst)

Methods come from :data:`xapi_storage_tasks.registry.METHODS` (an unknown one is an
AttributeError); importing the client loads the registry and the error tree,
nothing of the store. A failed call raises the :mod:`xapi_storage_tasks.wire.errors` class whose
``name`` is the error record's ``params[0]``, with the same details; its
``record`` attribute holds the whole record. Names this client does not
know become a subclass of :class:`~xapi_storage_tasks.wire.errors.PluginError` with that
``name``.

Transports (:mod:`xapi_storage_tasks.client.transports`):

- **the daemon** (:mod:`xapi_storage_tasks.daemon.server`): JSON-RPC over HTTP/1.1 on its Unix
  socket, one persistent connection per concurrent caller, reused from
  call to call;
- **the executables** in ``bin/`` (``--json`` mode), one process per call,
  so a client works where no daemon runs.

``connect(socket=PATH)`` always uses that socket. ``connect()`` uses the
daemon at :func:`xapi_storage_tasks.wire.httpio.default_socket` if one answers there, and the
executables otherwise, deciding again at every call that finds no daemon (a
call that could not connect was never sent, so taking the other way is
safe).
"""

from __future__ import annotations

import time

from xapi_storage_tasks import registry
from xapi_storage_tasks.client.transports import (
    DEFAULT_TIMEOUT,
    AutoTransport,
    ExecTransport,
    SocketTransport,
    Transport,
    error_class,
    error_from_record,
)
from xapi_storage_tasks.wire import httpio
from xapi_storage_tasks.wire.errors import DaemonUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# -- the client object --------------------------------------------------------------------------------


class RemoteMethod:
    """One registered method, callable as ``m(dbg=..., ...)``, ``m({...})``
    or positionally in the registry's parameter order."""

    def __init__(self, transport: Transport, method: registry.Method) -> None:
        self._transport = transport
        self.name = method.name
        self.params = method.param_names
        self.__doc__ = "%s(%s)" % (self.name, ", ".join(self.params))

    def __call__(self, *args: object, **kwargs: object) -> Any:  # a JSON value
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

    def __repr__(self) -> str:
        return "<method %s>" % self.__doc__


class Interface:
    """The methods of one interface (``Task``, ``Data``) as attributes."""

    def __init__(self, transport: Transport, name: str) -> None:
        self._transport = transport
        self._name = name
        self._methods = {m.name.split(".", 1)[1]: m.name for m in registry.METHODS.values() if m.interface == name}

    def __getattr__(self, attr: str) -> RemoteMethod:
        key = self._methods.get(attr) if not attr.startswith("_") else None
        if key is None:
            raise AttributeError("%s has no method %r (registered: %s)" % (self._name, attr, ", ".join(sorted(self._methods))))
        method = RemoteMethod(self._transport, registry.METHODS[key])
        setattr(self, attr, method)  # made once: the next lookup is a plain attribute
        return method

    def __dir__(self) -> list[str]:
        return sorted(self._methods)

    def __repr__(self) -> str:
        return "<interface %s: %s>" % (self._name, ", ".join(sorted(self._methods)))


class Client:
    """What :func:`connect` returns: one attribute per interface."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._interfaces = sorted({m.interface for m in registry.METHODS.values()})

    def __getattr__(self, attr: str) -> Interface:
        if attr.startswith("_") or attr not in self._interfaces:
            raise AttributeError("no interface %r (registered: %s)" % (attr, ", ".join(self._interfaces)))
        interface = Interface(self.transport, attr)
        setattr(self, attr, interface)  # made once: the next lookup is a plain attribute
        return interface

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._interfaces))

    def call(self, method: str, params: dict) -> Any:  # a JSON value
        """Call a method by its full name with a params dict."""
        found = registry.lookup(method)
        if found is None:
            raise AttributeError("no method %r" % method)
        return self.transport.call(found.name, params)

    def close(self) -> None:
        """Release the transport's connections."""
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(socket: str | None = None, bin_dir: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Client:
    """A client. ``socket``: the daemon's socket path (always used when
    given); else the daemon at the default path if it answers, otherwise
    the executables in ``bin_dir`` (default: :func:`xapi_storage_tasks.client.transports.default_bin_dir`)."""
    if socket is not None:
        return Client(SocketTransport(socket, timeout))
    return Client(AutoTransport(httpio.default_socket(), bin_dir, timeout))


def wait(client: Client, task_id: str, dbg: str = "wait", interval: float = 0.1, timeout: float | None = None) -> dict:
    """Poll ``Task.stat`` until the task is no longer Pending; return its
    record. ``timeout`` (seconds) raises TimeoutError."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        record = client.Task.stat(dbg=dbg, id=task_id)
        if record["state"][0] != "Pending":
            return record
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("task %s still Pending after %s s" % (task_id, timeout))
        time.sleep(interval)


__all__ = ["connect", "Client", "DaemonUnavailable", "error_class", "error_from_record", "wait",
           "AutoTransport", "ExecTransport", "SocketTransport"]
