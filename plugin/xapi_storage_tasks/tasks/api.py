"""The Task interface: ``Task.stat``, ``Task.cancel``, ``Task.destroy``,
``Task.ls``. Each function takes the decoded params and returns a value for
the codec; errors are raised as :mod:`xapi_storage_tasks.wire.errors`
exceptions. Every call first makes Pending tasks true to their workers
(:mod:`xapi_storage_tasks.tasks.lifecycle`).

This module imports nothing at import time: the registry refers to these
functions directly, so every executable (and the client) imports this
module whichever method it runs. Each function imports what its call
needs when it is called.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.record import Task


def stat(dbg: str, id: str) -> Task:
    """The task's record."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        return lifecycle.reconcile(store, id)


def cancel(dbg: str, id: str) -> None:
    """Best-effort cancellation; returns at once. A no-op for a finished
    task."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        lifecycle.request_cancel(store, id)


def destroy(dbg: str, id: str) -> None:
    """Remove every trace of a finished task; refuses a Pending one."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        lifecycle.destroy(store, id)


def ls(dbg: str) -> list[str]:
    """Every task id, oldest first."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        lifecycle.reconcile_pending(store)
        return store.ids()
