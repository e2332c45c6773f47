"""The Task interface: ``Task.stat``, ``Task.cancel``, ``Task.destroy``,
``Task.ls``. Each function takes the decoded params and returns a value for
the codec; errors are raised as :mod:`plugin.errors` exceptions."""

from plugin.store import Store


def stat(dbg, id):
    """The task's record."""
    with Store() as store:
        return store.get(id)


def cancel(dbg, id):
    """Best-effort cancellation; returns at once."""
    with Store() as store:
        store.get(id)


def destroy(dbg, id):
    """Remove every trace of a finished task."""
    with Store() as store:
        store.destroy(id)


def ls(dbg):
    """Every task id, oldest first."""
    with Store() as store:
        return store.ids()
