"""The durable file-per-task state store.

Layout of the state directory (mode 0700, files 0600)::

    tasks/<id>.json   the task record (see xapi_storage_tasks.tasks.record), replaced atomically
    tmp/              temporaries being written, renamed into tasks/; a
                      destroyed task's file on its way out; damaged locks
    locks/<id>        per-task lock file (see xapi_storage_tasks.tasks.locks)
    cancels/<id>      empty file: a cancel was requested at its mtime.
                      Written without the task's lock, so a cancel never
                      waits for a stopped writer; merged into the record
                      by every read, removed once the task has ended
    pending/<id>      the task's mark while it is Pending (see
                      xapi_storage_tasks.tasks.marks)
    ended/<b>/<id>    the retention index (see xapi_storage_tasks.tasks.index)
    polls/<id>        the last answer to a poller of the running task (see
                      xapi_storage_tasks.tasks.pacing)
    logs/<id>.log     per-task log when there is no syslog

Every directory is opened relative to the root with O_NOFOLLOW, so symlinks
planted inside the store are never followed
(:mod:`xapi_storage_tasks.files.dirs`). Every write replaces the file
atomically and durably (:func:`xapi_storage_tasks.files.jsonfile.write_json`):
a reader sees the old file or the new one, never part of one, whatever
instant a writer dies at. What a killed process leaves behind is swept by
:mod:`xapi_storage_tasks.tasks.sweep`.

State changes go through :meth:`Store.transition` only, which applies the
table in :mod:`xapi_storage_tasks.tasks.state`; :meth:`Store.annotate` changes the private
fields and refuses to touch the state.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from xapi_storage_tasks import settings
from xapi_storage_tasks.files import jsonfile
from xapi_storage_tasks.files.dirs import O_NEW, as_internal, open_dir, open_root, unlink
from xapi_storage_tasks.tasks import index, listing, locks, log
from xapi_storage_tasks.tasks.record import Task
from xapi_storage_tasks.tasks.state import Pending, check
from xapi_storage_tasks.wire import ids
from xapi_storage_tasks.wire.errors import InternalError, TaskCorrupt, TaskDoesNotExist, TaskInProgress

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Callable
    from typing import Any

    from xapi_storage_tasks.files.lock import Held
    from xapi_storage_tasks.tasks.state import State

MAX_TASK_FILE = settings.MAX_TASK_FILE
TOMBSTONE = ".destroyed"
"""Suffix of a destroyed task's file in ``tmp/``, once it is renamed away."""


class Store:
    """A state directory. Cheap to open: one directory per method call."""

    def __init__(self, path: str | None = None, lock_wait: float | None = None) -> None:
        self.path = os.path.abspath(path or settings.state_dir())
        self.lock_wait = settings.lock_wait() if lock_wait is None else lock_wait
        self.swept = False
        """Set once retention has run with this store (once per call)."""
        self._root = open_root(self.path)
        self._dirs: dict[str, int] = {}

    def close(self) -> None:
        """Release the directory descriptors."""
        for fd in [self._root, *self._dirs.values()]:
            os.close(fd)
        self._dirs.clear()
        self._root = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dir_fd(self, name: str) -> int:
        """Descriptor of subdirectory ``name`` (tasks, tmp, locks, pending,
        cancels, ended, logs, volumes)."""
        fd = self._dirs.get(name)
        if fd is None:
            fd = self._dirs[name] = open_dir(name, self._root, os.path.join(self.path, name))
        return fd

    # -- reading ------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every task id, oldest first (ids sort by creation time): from the
        listing cache while it is ``tasks/``'s as it is now, else from the
        directory (see :mod:`xapi_storage_tasks.tasks.listing`)."""
        return listing.ids(self._root, self.dir_fd("tasks"), self.dir_fd("tmp"))

    def pending_ids(self) -> list[str]:
        """Ids marked Pending: the only tasks that can need reconciling."""
        return sorted(os.listdir(self.dir_fd("pending")))

    def get(self, task_id: str) -> Task:
        """Read one task. Raises TaskDoesNotExist or TaskCorrupt."""
        try:
            task = Task.from_disk(jsonfile.read_json(task_id + ".json", self.dir_fd("tasks"), MAX_TASK_FILE))
            if task.id != task_id:
                raise ValueError("file holds id %r" % task.id)
        except FileNotFoundError:
            raise TaskDoesNotExist(task_id) from None
        except ValueError as e:  # jsonfile.Unreadable too
            log.store_event(self, "task %s is corrupt: %s" % (task_id, e))
            raise TaskCorrupt(task_id, str(e)) from None
        if task.cancel is None and not task.state.terminal:
            task.cancel = self.cancel_time(task_id)
        return task

    def cancel_time(self, task_id: str) -> float | None:
        """When a cancel of the task was requested (see
        :meth:`request_cancel`), or None."""
        try:
            st = os.stat(task_id, dir_fd=self.dir_fd("cancels"), follow_symlinks=False)
        except OSError:
            return None
        return st.st_mtime if stat.S_ISREG(st.st_mode) else None

    def request_cancel(self, task_id: str) -> bool:
        """Durably record a cancel request without taking the task's lock;
        True if it is the first one."""
        cancels = self.dir_fd("cancels")
        with as_internal("cannot record the cancel of task %s" % task_id):
            try:
                os.close(os.open(task_id, O_NEW, 0o600, dir_fd=cancels))
            except FileExistsError:
                return False
            try:
                os.fsync(cancels)
            except OSError:
                unlink(task_id, cancels)  # reported as not done: leave nothing
                raise
        try:  # destroyed meanwhile: leave no request behind
            os.stat(task_id + ".json", dir_fd=self.dir_fd("tasks"), follow_symlinks=False)
        except FileNotFoundError:
            unlink(task_id, cancels)
            raise TaskDoesNotExist(task_id) from None
        return True

    # -- writing ----------------------------------------------------------

    def _write(self, task: Task) -> None:
        with as_internal("cannot write task %s" % task.id):
            jsonfile.write_json(task.to_disk(), task.id + ".json", self.dir_fd("tasks"), self.dir_fd("tmp"))

    def _locked(self, task_id: str, wait: float | None) -> Held:
        return locks.held(self, task_id, self.lock_wait if wait is None else wait)

    def create(self, debug_info: str, operation: dict[str, Any] | None = None) -> Task:
        """Create a Pending(0.0) task and return it (the API for workers and
        tests). ``operation`` is stored as given, e.g. ``{"kind": "CopyV1",
        "args": {...}}``."""
        now_ns = time.time_ns()
        task = Task(ids.new_id(now_ns), debug_info, now_ns / 1e9, Pending(0.0), operation=operation)
        lock_dir, pending = self.dir_fd("locks"), self.dir_fd("pending")
        with as_internal("cannot create task %s" % task.id):
            fd = os.open(task.id, O_NEW, 0o600, dir_fd=lock_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with as_internal("cannot create task %s" % task.id):
                os.close(os.open(task.id, O_NEW, 0o600, dir_fd=pending))
            self._write(task)
        except BaseException:
            unlink(task.id, pending)
            unlink(task.id, lock_dir)
            raise
        finally:
            os.close(fd)
        return task

    def transition(self, task_id: str, decide: Callable[[Task], State | None], wait: float | None = None) -> Task:
        """The one function that changes a task's state.

        Under the task's lock, ``decide(task)`` returns the new state, or
        None to leave the task alone; it may also set the task's private
        fields (e.g. clear ``artifacts`` it has removed). The change must be
        in :data:`xapi_storage_tasks.tasks.state.ALLOWED`, else
        :class:`xapi_storage_tasks.tasks.state.TransitionRefused` is raised and nothing is
        written. Returns the task as stored afterwards. The lock is waited
        for ``wait`` seconds (default: the store's), then Task_busy. A task
        that ends is retired (:func:`xapi_storage_tasks.tasks.index.retire`).
        """
        with self._locked(task_id, wait):
            task = self.get(task_id)
            new = decide(task)
            if new is None:
                return task
            task.state = check(task.state, new)
            task.updated = time.time()
            self._write(task)
        if task.state.terminal:
            index.retire(self, task)
        return task

    def annotate(self, task_id: str, mutate: Callable[[Task], object], wait: float | None = None) -> Task:
        """Change a task's private fields under its lock: ``mutate(task)``
        edits them in place. Changing the state here is refused."""
        with self._locked(task_id, wait):
            task = self.get(task_id)
            before = task.state
            mutate(task)
            if task.state is not before:
                raise InternalError("annotate may not change the state of %s" % task_id)
            self._write(task)
        return task

    def destroy(self, task_id: str, wait: float | None = None, durable: bool = True) -> None:
        """Remove every file of an ended (or unreadable) task.

        Raises TaskInProgress for a Pending task, TaskDoesNotExist for an
        unknown one, TaskBusy if its lock stays held ``wait`` seconds.
        ``durable=False`` skips the directory fsync (for retention: a
        destroy lost in a crash is simply done again).
        """
        with self._locked(task_id, wait):
            try:
                task = self.get(task_id)
            except TaskCorrupt:
                task = None  # removing it is the only way out for the operator
            if task is not None and not task.state.terminal:
                raise TaskInProgress(task_id)
            tasks, tmp = self.dir_fd("tasks"), self.dir_fd("tmp")
            tomb = task_id + TOMBSTONE
            with as_internal("cannot destroy task %s" % task_id):
                unlink(task_id + ".log", self.dir_fd("logs"))
                unlink(task_id, self.dir_fd("pending"))
                unlink(task_id, self.dir_fd("cancels"))
                unlink(task_id, self.dir_fd("polls"))
                for name in os.listdir(tmp):  # a crashed writer's leftovers
                    if name.startswith(task_id):
                        unlink(name, tmp)
                # The commit point: once the file is renamed away the task
                # does not exist. A destroy killed before it can simply be
                # repeated; one killed after it leaves a tombstone, and the
                # next sweep removes that and the lock file.
                try:
                    os.rename(task_id + ".json", tomb, src_dir_fd=tasks, dst_dir_fd=tmp)
                except FileNotFoundError:
                    pass
                if durable:
                    os.fsync(tasks)
                unlink(task_id, self.dir_fd("locks"))
                unlink(tomb, tmp)
            if task is not None:
                index.unindex(self, index.bucket(task.updated), task_id)
