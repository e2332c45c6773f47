"""Per-task locks: ``locks/<id>``, one flocked file per task.

The kernel drops a lock whose holder dies. A call waits for it at most
the store's ``lock_wait`` seconds (``TASK_LOCK_WAIT``), then answers
Task_busy (the wait itself: :class:`xapi_storage_tasks.files.lock.Held`).
A damaged lock file (missing while the task exists, a symlink, a
directory, a FIFO...) is moved aside to ``tmp/`` and replaced: a usable
lock is what makes the task destroyable.
"""

from __future__ import annotations

import os
import stat

from xapi_storage_tasks.files.dirs import as_internal
from xapi_storage_tasks.files.lock import Held
from xapi_storage_tasks.tasks import log
from xapi_storage_tasks.wire.errors import InternalError, TaskBusy, TaskDoesNotExist

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from xapi_storage_tasks.tasks.store import Store

_O_LOCK = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def held(store: Store, task_id: str, wait: float) -> Held:
    """``with held(store, task_id, wait):`` holds the task's lock, waited
    for at most ``wait`` seconds (then Task_busy); TaskDoesNotExist if the
    task is destroyed meanwhile."""
    why = "its lock has been held by another process for %gs; retry" % wait
    return Held(lambda: open_lock(store, task_id), wait, lambda: TaskBusy(task_id, why))


def open_lock(store: Store, task_id: str) -> int:
    """The task's lock file, opened (not locked); damage is repaired.
    TaskDoesNotExist when neither it nor the task file exists."""
    lock_dir = store.dir_fd("locks")
    for _ in range(5):
        try:
            fd = os.open(task_id, _O_LOCK, dir_fd=lock_dir)
        except FileNotFoundError:
            # Only damage removes a lock file while the task file remains.
            try:
                os.stat(task_id + ".json", dir_fd=store.dir_fd("tasks"), follow_symlinks=False)
            except FileNotFoundError:
                raise TaskDoesNotExist(task_id) from None
            try:
                fd = os.open(task_id, _O_LOCK | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=lock_dir)
            except FileExistsError:
                continue  # someone else repaired it first
        except OSError as e:  # ELOOP, EISDIR, ENXIO...: not a lock file
            _move_aside(store, task_id, e.strerror or str(e))
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        _move_aside(store, task_id, "not a regular file")
    raise InternalError("cannot open the lock file of task %s" % task_id)


def _move_aside(store: Store, task_id: str, why: str) -> None:
    log.store_event(store, "lock file of task %s is damaged (%s): moved to tmp/ and replaced" % (task_id, why))
    with as_internal("cannot move the damaged lock of task %s aside" % task_id):
        try:
            os.rename(task_id, "%s.damaged-lock.%s" % (task_id, os.urandom(4).hex()),
                      src_dir_fd=store.dir_fd("locks"), dst_dir_fd=store.dir_fd("tmp"))
        except FileNotFoundError:
            pass
