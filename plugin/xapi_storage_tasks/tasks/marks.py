"""A task's mark: the empty file ``pending/<id>`` while the task is Pending.

The marks list the tasks that can need reconciling, so ``ls`` costs
nothing per ended task. The mark is also what a worker holds open (and
flocked) for its whole life, which is how the kernel vouches for the
worker before any signal (see
:func:`xapi_storage_tasks.process.identity.holds`). It is dropped, with
the cancel request, once the task has ended.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from xapi_storage_tasks.files.dirs import as_internal, unlink
from xapi_storage_tasks.wire.errors import InternalError, TaskInProgress

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from xapi_storage_tasks.tasks.store import Store


def hold(store: Store, task_id: str) -> int:
    """(In the worker, before it records its identity.) Open the task's
    mark and flock it, for the life of the calling process; returns the
    descriptor. Raises TaskInProgress if another worker holds it."""
    pending = store.dir_fd("pending")
    with as_internal("cannot open the mark of task %s" % task_id):
        fd = os.open(task_id, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                     dir_fd=pending)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InternalError("the mark of task %s is not a regular file" % task_id)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TaskInProgress(task_id) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_id(store: Store, task_id: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the task's mark, or None if it has none
    (ended, or damaged): what a live worker must hold open."""
    try:
        st = os.stat(task_id, dir_fd=store.dir_fd("pending"), follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def forget(store: Store, task_id: str) -> None:
    """Drop the mark, cancel request and poll memory of an ended task (best
    effort: a stale mark only costs ``ls`` one more look at the task)."""
    for name in ("pending", "cancels", "polls"):
        try:
            unlink(task_id, store.dir_fd(name))
        except OSError:
            pass


def forget_stale(store: Store, task_id: str, age: float) -> None:
    """Remove the mark and lock left by a ``create`` that died before
    writing the task file, once the mark is ``age`` seconds old and no
    creator holds the lock."""
    pending, lock_dir = store.dir_fd("pending"), store.dir_fd("locks")
    try:
        if time.time() - os.stat(task_id, dir_fd=pending, follow_symlinks=False).st_mtime < age:
            return
        fd = os.open(task_id, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=lock_dir)
    except FileNotFoundError:
        unlink(task_id, pending)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.stat(task_id + ".json", dir_fd=store.dir_fd("tasks"), follow_symlinks=False)
        except FileNotFoundError:
            unlink(task_id, pending)
            unlink(task_id, lock_dir)
    except BlockingIOError:
        pass  # a create is still in progress
    finally:
        os.close(fd)
