"""A storage-plugin task service for the XAPI toolstack (SMAPIv3 style).

Long-running storage operations run as tasks in detached workers; the
toolstack queries and controls them through the Task and Data interfaces,
served by the executables in ``bin/`` (one per method of
:mod:`xapi_storage_tasks.registry`), by the socket daemon, and through the
Python client. The public face, everything the README teaches::

    from xapi_storage_tasks import connect, start, Store, Pending, Completed, Failed, TaskDoesNotExist

- :func:`connect`, :class:`Client`, :func:`wait`: call any method through
  the socket daemon or the executables;
- :func:`start`, :class:`Context`, :class:`Cancelled`: run an operation as a
  task in a detached worker;
- :class:`Store` and the task states :class:`Pending`, :class:`Completed`,
  :class:`Failed`: the file-per-task state store;
- the error tree, :class:`PluginError` and its subclasses, each with the
  stable name callers see.

Every other module is internal. Nothing is imported here until it is
used (PEP 562 module ``__getattr__``): each executable imports this
package, and pays only for the modules its method needs.
"""

from __future__ import annotations

__version__ = "0.1.0"

_ERRORS = "xapi_storage_tasks.wire.errors"
_EXPORTS = {
    "connect": "xapi_storage_tasks.client.connection",
    "Client": "xapi_storage_tasks.client.connection",
    "wait": "xapi_storage_tasks.client.connection",
    "start": "xapi_storage_tasks.tasks.worker",
    "Context": "xapi_storage_tasks.tasks.worker",
    "Cancelled": "xapi_storage_tasks.tasks.worker",
    "Store": "xapi_storage_tasks.tasks.store",
    "Pending": "xapi_storage_tasks.tasks.state",
    "Completed": "xapi_storage_tasks.tasks.state",
    "Failed": "xapi_storage_tasks.tasks.state",
    "PluginError": _ERRORS,
    "InternalError": _ERRORS,
    "InvalidArguments": _ERRORS,
    "Unimplemented": _ERRORS,
    "TaskDoesNotExist": _ERRORS,
    "TaskInProgress": _ERRORS,
    "TaskCorrupt": _ERRORS,
    "TaskBusy": _ERRORS,
    "StateDirInvalid": _ERRORS,
    "OperationFailed": _ERRORS,
    "NbdError": _ERRORS,
    "PermissionDenied": _ERRORS,
    "ServiceUnavailable": _ERRORS,
    "DaemonUnavailable": _ERRORS,
}

__all__ = sorted(_EXPORTS)

TYPE_CHECKING = False
if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from xapi_storage_tasks.client.connection import Client, connect, wait  # noqa: F401
    from xapi_storage_tasks.tasks.state import Completed, Failed, Pending  # noqa: F401
    from xapi_storage_tasks.tasks.store import Store  # noqa: F401
    from xapi_storage_tasks.tasks.worker import Cancelled, Context, start  # noqa: F401
    from xapi_storage_tasks.wire.errors import (  # noqa: F401
        DaemonUnavailable, InternalError, InvalidArguments, NbdError, OperationFailed, PermissionDenied, PluginError,
        ServiceUnavailable, StateDirInvalid, TaskBusy, TaskCorrupt, TaskDoesNotExist, TaskInProgress, Unimplemented,
    )


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value  # the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
