"""The Task interface: ``Task.stat``, ``Task.cancel``, ``Task.destroy``,
``Task.ls``. Each function takes the decoded params and returns a value for
the codec; errors are raised as :mod:`xapi_storage_tasks.wire.errors` exceptions. Every call
first makes Pending tasks true to their workers (:mod:`xapi_storage_tasks.tasks.lifecycle`)."""

from xapi_storage_tasks.tasks import lifecycle
from xapi_storage_tasks.tasks.store import Store


def stat(dbg, id):
    """The task's record."""
    with Store() as store:
        return lifecycle.reconcile(store, id)


def cancel(dbg, id):
    """Best-effort cancellation; returns at once. A no-op for a finished
    task."""
    with Store() as store:
        lifecycle.request_cancel(store, id)


def destroy(dbg, id):
    """Remove every trace of a finished task; refuses a Pending one."""
    with Store() as store:
        lifecycle.destroy(store, id)


def ls(dbg):
    """Every task id, oldest first."""
    with Store() as store:
        lifecycle.reconcile_pending(store)
        return store.ids()
