"""What every call does to keep tasks truthful: reconcile a Pending task
with its worker, request cancellation, and undo an operation's artifacts.

Used by ``Task.*`` and ``Data.*`` alike. The rules:

- A Pending task whose worker is gone (pid absent, reused, a zombie,
  recorded under another boot id, or not holding the task's mark: see
  :func:`xapi_storage_tasks.process.identity.holds`) becomes Failed: ``Cancelled`` if a cancel
  was requested, else ``Worker lost: ...``. Its artifacts are removed.
- A Pending task that never got a worker identity within
  :data:`START_TIMEOUT` seconds is treated the same way.
- A worker still alive :func:`grace` seconds after a cancel request is
  killed with SIGKILL, then handled as gone.
"""

from __future__ import annotations

import os
import stat
import time

from xapi_storage_tasks import settings
from xapi_storage_tasks.process import identity
from xapi_storage_tasks.tasks import index, log, marks, retention, sweep
from xapi_storage_tasks.tasks.state import CANCELLED, Failed
from xapi_storage_tasks.wire.errors import InternalError, PluginError, TaskBusy, TaskCorrupt, TaskDoesNotExist

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Callable, Sequence

    from xapi_storage_tasks.tasks.record import Task
    from xapi_storage_tasks.tasks.state import State
    from xapi_storage_tasks.tasks.store import Store

START_TIMEOUT = 30.0


def remove_artifacts(paths: Sequence[str], created: dict[str, list[int]]) -> list[tuple[str, str]]:
    """Remove declared artifacts, newest first, each only while it is the
    very file the task created (same device and inode as recorded in
    ``created``); missing ones are fine. Returns ``(path, why)`` for each
    path left in place: never created by the task, replaced by another
    file, or failing to go."""
    left = []
    for path in reversed(paths):
        ident = created.get(path)
        if ident is None:
            left.append((path, "never recorded as created by this task; left alone"))
            continue
        try:
            st = os.lstat(path)
            if [st.st_dev, st.st_ino] != ident:
                left.append((path, "holds a file this task did not create; left alone"))
            elif stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append((path, e.strerror or str(e)))
    return left


def fail_and_undo(store: Store, task: Task, message: str) -> State:
    """Under the task's lock (inside a ``transition`` decide callback):
    remove the task's artifacts and return the Failed state to store."""
    for path, why in remove_artifacts(task.artifacts, task.created):
        log.task_event(store, task, "artifact %s not removed: %s" % (path, why))
    task.artifacts = []
    task.created = {}
    log.task_event(store, task, "failed: %s" % message)
    return Failed(message)


def fail_unless_ended(store: Store, task_id: str, message: str, wait: float | None = None) -> Task:
    """Fail the task with ``message``, removing its artifacts, unless it
    has already ended; returns the task as stored afterwards. Raises what
    :meth:`~xapi_storage_tasks.tasks.store.Store.transition` raises."""
    return store.transition(task_id, lambda t: None if t.state.terminal else fail_and_undo(store, t, message), wait)


def kill(store: Store, task_id: str) -> bool:
    """SIGKILL the task's worker (its whole process group), only if the
    kernel vouches it is that worker; waits, briefly, for it to be gone.
    True if it was killed."""
    import signal

    try:
        task = store.get(task_id)
    except PluginError:
        return False
    if task.worker is None or not identity.signal_worker(task.worker, signal.SIGKILL, marks.file_id(store, task_id)):
        return False
    identity.wait_gone(task.worker, 1.0)
    log.task_event(store, task, "worker pid %s killed: it did not end its operation in time" % task.worker.get("pid"))
    return True


def _vouched(store: Store, task: Task) -> bool:
    """The recorded worker is alive, is one we could signal, and the kernel
    says it holds the task's mark: a forged identity naming some other live
    process counts as lost, and is never signalled."""
    worker = task.worker
    return (
        identity.matches(worker)
        and identity.refusal(worker) is None
        and identity.holds(worker, marks.file_id(store, task.id))
    )


def _needs_action(store: Store, task: Task, now: float) -> bool:
    if task.state.terminal:
        return False
    if task.worker is None:
        return now - task.ctime >= START_TIMEOUT
    if not _vouched(store, task):
        return True
    return task.cancel is not None and now - task.cancel >= settings.cancel_grace()


def _decide(store: Store) -> Callable[[Task], State | None]:
    def decide(task: Task) -> State | None:
        now = time.time()
        if not _needs_action(store, task, now):
            return None
        worker = task.worker
        if worker is not None and _vouched(store, task):
            # Overdue after a cancel: SIGKILL cannot be ignored.
            waited = now - (task.cancel or now)
            log.task_event(store, task, "worker pid %d ignored SIGTERM for %.1fs: SIGKILL" % (worker["pid"], waited))
            import signal  # only where a signal is sent: it imports enum

            identity.signal_worker(worker, signal.SIGKILL, marks.file_id(store, task.id))
            if not identity.wait_gone(worker, 2.0):
                return None
        if task.cancel is not None:
            message = CANCELLED
        elif worker is None:
            message = "Worker lost: it never started"
        elif identity.matches(worker):
            why = identity.refusal(worker) or "it does not hold the task's mark"
            message = "Worker lost: recorded identity is not a worker (%s)" % why
        else:
            message = "Worker lost: process %s is gone" % worker.get("pid")
        return fail_and_undo(store, task, message)

    return decide


def reconcile(store: Store, task_id: str) -> Task:
    """Return the task, first making its state true to its worker's.

    A worker overdue after a cancel is SIGKILLed before the task's lock is
    taken (it may be the very process holding it, stopped mid-write). If
    the lock stays busy for the store's bounded wait, the task is returned
    as read, and a later call settles it."""
    retention.sweep(store)
    task = store.get(task_id)
    now = time.time()
    if retention.expired(task, now):
        try:
            store.destroy(task_id, wait=0, durable=False)
        except TaskBusy:
            return task  # a later call destroys it
        raise TaskDoesNotExist(task_id)
    if not _needs_action(store, task, now):
        return task
    worker = task.worker
    if worker is not None and task.cancel is not None and _vouched(store, task):
        log.task_event(store, task, "worker pid %d ignored SIGTERM for %.1fs: SIGKILL" % (worker["pid"], now - task.cancel))
        import signal

        identity.signal_worker(worker, signal.SIGKILL, marks.file_id(store, task_id))
        identity.wait_gone(worker, 2.0)
    try:
        return store.transition(task_id, _decide(store))
    except TaskBusy as e:
        log.task_event(store, task, "not reconciled now: %s" % e)
        return task


def reconcile_pending(store: Store) -> None:
    """Reconcile every task marked Pending (for ``ls``); drop stale
    marks and temporary files. Unreadable tasks are left for ``stat`` to
    report."""
    retention.sweep(store)
    sweep.sweep_tmp(store, START_TIMEOUT)
    for task_id in store.pending_ids():
        try:
            task = reconcile(store, task_id)
            if task.state.terminal:
                index.retire(store, task)
        except TaskDoesNotExist:
            marks.forget_stale(store, task_id, START_TIMEOUT)
        except TaskCorrupt:
            pass
        except (InternalError, TaskBusy) as e:  # e.g. a full disk: still list what exists
            log.store_event(store, "could not reconcile task %s: %s" % (task_id, e))


def request_cancel(store: Store, task_id: str) -> Task:
    """Durably record the cancel request, then SIGTERM the verified worker;
    neither needs the task's lock, so a cancel returns promptly even while
    a stopped process holds it. A finished task is left alone. Returns the
    task."""
    task = reconcile(store, task_id)
    if task.state.terminal:
        return task
    first = store.request_cancel(task_id)
    if task.cancel is None:
        task.cancel = store.cancel_time(task_id)
    if task.worker is None:
        # The worker may have recorded itself since our read. The request is
        # durable now: either this read sees the worker, or the worker's own
        # read, after recording itself, sees the request.
        try:
            task.worker = store.get(task_id).worker
        except PluginError:
            return task
    if task.worker is None:
        log.task_event(store, task, "cancel requested before the worker started")
        return task  # the worker honours it as soon as it records itself
    import signal

    signalled = identity.signal_worker(task.worker, signal.SIGTERM, marks.file_id(store, task_id))
    outcome = "sent" if signalled else "not sent (worker gone, or not vouched for by the kernel)"
    log.task_event(store, task, "cancel requested: SIGTERM to pid %s %s" % (task.worker.get("pid"), outcome))
    if not signalled:
        return reconcile(store, task_id)
    if first:
        from xapi_storage_tasks.tasks import watchdog  # only a first cancel pays for it

        watchdog.start(store.path, task_id, settings.cancel_grace(), reconcile)
    return task


def destroy(store: Store, task_id: str) -> None:
    """Remove every trace of a finished task; a Pending one whose worker is
    gone is reconciled first, a live one is refused (TaskInProgress)."""
    try:
        reconcile(store, task_id)
    except TaskCorrupt:
        pass  # unreadable: destroying it is the operator's way out
    store.destroy(task_id)
