"""The Data interface: long-running data operations that own tasks.

``Data.*`` and ``Task.*`` are two views of the same store: the operation
``["CopyV1", id]`` is the task ``id``. Copies are validated in the calling
process (bad input makes no task), then run by a detached worker
(:mod:`xapi_storage_tasks.data.copy`).
"""

import time

from xapi_storage_tasks.tasks import lifecycle
from xapi_storage_tasks.tasks.state import Completed, Pending
from xapi_storage_tasks.wire.codec import OPERATION_TAGS
from xapi_storage_tasks.wire.errors import PluginError, TaskCorrupt, TaskDoesNotExist
from xapi_storage_tasks.tasks.store import Store


def copy(dbg, uri, domain, remote, blocklist):
    """Start copying ``uri`` (or the ranges of ``blocklist``) to ``remote``;
    returns ``("CopyV1", task id)`` at once."""
    from xapi_storage_tasks.data import copy as engine
    from xapi_storage_tasks.data import mirror
    from xapi_storage_tasks.tasks import worker

    mirror.refuse_copy(uri, remote)
    args = engine.plan(uri, remote, blocklist)
    return "CopyV1", worker.start(dbg, engine.run, args, kind="CopyV1")


def mirror(dbg, uri, domain, remote):
    """Start mirroring the attached volume ``uri`` to ``remote``; returns
    ``("MirrorV1", task id)`` at once (see :mod:`xapi_storage_tasks.data.mirror`)."""
    from xapi_storage_tasks.data import mirror as engine

    return "MirrorV1", engine.start(dbg, uri, domain, remote)


def _check_kind(store, operation):
    """The operation names a task of its kind (a plain task, or a copy
    asked about as a mirror, does not exist as that operation)."""
    kind, task_id = operation
    if store.get(task_id).kind != kind:
        raise TaskDoesNotExist(task_id)
    return task_id


def stat(dbg, operation):
    """``{failed, complete, progress}`` of the operation's task."""
    with Store() as store:
        task = lifecycle.reconcile(store, _check_kind(store, operation))
    if task.kind == "MirrorV1" and isinstance(task.state, Pending) and task.operation.get("ready"):
        # The job is ready: the existing data is synchronised (mirroring of
        # new writes goes on), which the toolstack reads as complete. From
        # the task file alone: no QMP per call, this is polled back to back.
        return Completed(time.time() - task.ctime)
    return task.state


def cancel(dbg, operation):
    """As ``Task.cancel``."""
    with Store() as store:
        lifecycle.request_cancel(store, _check_kind(store, operation))


def destroy(dbg, operation):
    """As ``Task.destroy``, unreadable task files included."""
    with Store() as store:
        try:
            _check_kind(store, operation)
        except TaskCorrupt:
            pass  # as Task.destroy: removing it is the operator's way out
        lifecycle.destroy(store, operation[1])


def ls(dbg):
    """Every data operation, oldest first, as ``(kind, id)`` pairs."""
    with Store() as store:
        lifecycle.reconcile_pending(store)
        out = []
        for task_id in store.ids():
            try:
                kind = store.get(task_id).kind
            except PluginError:
                continue  # destroyed meanwhile, or unreadable (stat reports it)
            if kind in OPERATION_TAGS:
                out.append((kind, task_id))
        return out

