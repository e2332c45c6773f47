"""The Data interface: long-running data operations that own tasks.

``Data.*`` and ``Task.*`` are two views of the same store: the operation
``["CopyV1", id]`` is the task ``id``. Copies are validated in the calling
process (bad input makes no task), then run by a detached worker
(:mod:`xapi_storage_tasks.data.copy`).

This module imports only the error tree at import time: the registry
refers to these functions directly, so every executable (and the client)
imports this module whichever method it runs. Each function imports what
its call needs when it is called (``Data.stat`` never loads the copy
engine, ``Data.copy`` loads it and the worker machinery).
"""

from __future__ import annotations

from xapi_storage_tasks.wire.errors import PluginError, TaskCorrupt, TaskDoesNotExist

TYPE_CHECKING = False
if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.state import State
    from xapi_storage_tasks.tasks.store import Store


def copy(dbg: str, uri: str, domain: str, remote: str, blocklist: tuple[int, list[tuple[int, int]]] | None) -> tuple[str, str]:
    """Start copying ``uri`` (or the ranges of ``blocklist``) to ``remote``;
    returns ``("CopyV1", task id)`` at once."""
    from xapi_storage_tasks.datapath import mirror
    from xapi_storage_tasks.data.copy import plan, run
    from xapi_storage_tasks.tasks import worker

    mirror.refuse_copy(uri, remote)  # a copy would undo the mirror's writes
    return "CopyV1", worker.start(dbg, run, plan(uri, remote, blocklist), kind="CopyV1")


def mirror(dbg: str, uri: str, domain: str, remote: str) -> tuple[str, str]:
    """Start mirroring the attached volume ``uri`` to ``remote``; returns
    ``("MirrorV1", task id)`` at once (see :mod:`xapi_storage_tasks.datapath.mirror`)."""
    from xapi_storage_tasks.datapath import service

    return "MirrorV1", service.mirror(dbg, uri, domain, remote)


def _check_kind(store: Store, operation: tuple[str, str]) -> str:
    """The operation names a task of its kind (a plain task, or a copy
    asked about as a mirror, does not exist as that operation)."""
    kind, task_id = operation
    if store.get(task_id).kind != kind:
        raise TaskDoesNotExist(task_id)
    return task_id


def stat(dbg: str, operation: tuple[str, str]) -> State:
    """``{failed, complete, progress}`` of the operation's task; paced for
    a caller polling a running operation back to back (see
    :mod:`xapi_storage_tasks.tasks.pacing`)."""
    from xapi_storage_tasks.tasks import pacing
    from xapi_storage_tasks.tasks.store import Store

    kind, task_id = operation
    with Store() as store:
        return pacing.paced(store, task_id, lambda: _status(store, kind, task_id))


def _status(store: Store, kind: str, task_id: str) -> tuple[State, bool]:
    """The operation's state as of now, and whether it has ended; a task
    of another kind is no such operation (one read of the task file)."""
    import time

    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.state import Completed, Pending

    task = lifecycle.reconcile(store, task_id)
    if task.kind != kind:
        raise TaskDoesNotExist(task_id)
    if task.kind == "MirrorV1" and isinstance(task.state, Pending) and (task.operation or {}).get("ready"):
        # The job is ready: the existing data is synchronised (mirroring of
        # new writes goes on), which the toolstack reads as complete. From
        # the task file alone: no QMP per call, this is polled back to back.
        return Completed(time.time() - task.ctime), False
    return task.state, task.state.terminal


def cancel(dbg: str, operation: tuple[str, str]) -> None:
    """As ``Task.cancel``."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        lifecycle.request_cancel(store, _check_kind(store, operation))


def destroy(dbg: str, operation: tuple[str, str]) -> None:
    """As ``Task.destroy``, unreadable task files included."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        try:
            _check_kind(store, operation)
        except TaskCorrupt:
            pass  # as Task.destroy: removing it is the operator's way out
        lifecycle.destroy(store, operation[1])


def ls(dbg: str) -> list[tuple[str, str]]:
    """Every data operation, oldest first, as ``(kind, id)`` pairs."""
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.store import Store
    from xapi_storage_tasks.wire.codec import OPERATION_TAGS

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
