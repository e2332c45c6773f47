"""The durable file-per-task state store.

Layout of the state directory (mode 0700, files 0600)::

    tasks/<id>.json   the task record (see xapi_storage_tasks.tasks.record), replaced atomically
    tmp/              temporary files being written, renamed into tasks/;
                      a destroyed task's file on its way out
    locks/<id>        per-task lock file (flock; the kernel drops it if the
                      holder dies). A call waits for it at most
                      ``TASK_LOCK_WAIT`` seconds, then answers Task_busy; a
                      damaged lock (a symlink, a directory...) is moved
                      aside to tmp/ and replaced
    cancels/<id>      empty file: a cancel was requested at its mtime.
                      Written without the task's lock, so a cancel never
                      waits for a stopped writer; merged into the record
                      by every read, removed once the task is finished
    pending/<id>      empty marker while the task is Pending, so reconciling
                      live tasks costs nothing per finished task; also the
                      task's *mark*: its worker holds it open (and flocked)
                      for its whole life, which is how the kernel vouches
                      for the worker before any signal
                      (see xapi_storage_tasks.process.identity.holds)
    ended/<b>/<id>    empty entry per finished task, in the bucket of its end
                      time (b = end // 60 s): how retention finds expired
                      tasks without reading or listing every task
    logs/<id>.log     per-task log when there is no syslog

Every directory is opened relative to the root with O_NOFOLLOW, so symlinks
planted inside the store are never followed. Every write goes to a
temporary sibling, is fsynced, renamed over the old file and the directory
is fsynced: a reader sees the old file or the new one, never part of one,
whatever instant a writer dies at.

State changes go through :meth:`Store.transition` only, which applies the
table in :mod:`xapi_storage_tasks.tasks.state`; :meth:`Store.annotate` changes the private
fields and refuses to touch the state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from xapi_storage_tasks import settings
from xapi_storage_tasks.tasks import ids, log
from xapi_storage_tasks.tasks.record import Task
from xapi_storage_tasks.tasks.state import Pending, check
from xapi_storage_tasks.wire import jsontext
from xapi_storage_tasks.wire.errors import (
    InternalError,
    PluginError,
    StateDirInvalid,
    TaskBusy,
    TaskCorrupt,
    TaskDoesNotExist,
    TaskInProgress,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Callable
    from typing import Any

    from xapi_storage_tasks.tasks.state import State

MAX_TASK_FILE = settings.MAX_TASK_FILE
TOMBSTONE = ".destroyed"
ENDED_WIDTH = 60
"""Seconds of end times per ``ended/`` bucket."""

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_dir(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirInvalid(path, "not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirInvalid(path, "owned by uid %d, not by uid %d" % (st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise StateDirInvalid(path, "writable by group or others (mode %o)" % (st.st_mode & 0o777))


def _open_dir(name: str, dir_fd: int, label: str) -> int:
    """Open (creating with 0700 if needed) subdirectory ``name`` of
    ``dir_fd``, never via a symlink."""
    for attempt in (1, 2):
        try:
            fd = os.open(name, _O_DIR, dir_fd=dir_fd)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise StateDirInvalid(label, "vanished while being created") from None
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise StateDirInvalid(label, "cannot create: %s" % e.strerror) from None
        except OSError as e:
            why = e.strerror
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, dir_fd):
                why = "is a symlink"
            raise StateDirInvalid(label, why) from None
    try:
        _check_dir(fd, label)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_root(path: str) -> int:
    """Open the state directory ``path`` (absolute) one component at a
    time from ``/``, never through a symlink: a symlink anywhere in the
    path (not only its last component) could send the store elsewhere, so
    it is refused, naming the component. Missing components are created
    (mode 0700)."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", _O_DIR)
    try:
        for i in range(len(parts)):
            here = "/" + "/".join(parts[: i + 1])
            try:
                child = os.open(parts[i], _O_DIR, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(parts[i], 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise StateDirInvalid(path, "cannot create %s: %s" % (here, e.strerror)) from None
                try:
                    child = os.open(parts[i], _O_DIR, dir_fd=fd)
                except OSError as e:
                    raise StateDirInvalid(path, "%s: %s" % (here, e.strerror)) from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parts[i], fd):
                    why = "is a symlink" if i == len(parts) - 1 else "its parent %s is a symlink" % here
                elif i == len(parts) - 1:
                    why = e.strerror or str(e)
                else:
                    why = "%s: %s" % (here, e.strerror)
                raise StateDirInvalid(path, why) from None
            os.close(fd)
            fd = child
        _check_dir(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class _io:
    """``with _io(what):`` reports a failed store operation (an OSError)
    as an InternalError naming it. (A class, not contextlib: every call
    imports this module.)"""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: object, e: BaseException | None, tb: object) -> None:
        if isinstance(e, OSError):
            raise InternalError("%s: %s" % (self.what, e.strerror or e)) from None


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:  # damage: an empty directory goes too
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError:
            pass


def _bucket(when: float) -> int:
    return int(when // ENDED_WIDTH)


def _flock(fd: int, wait: float) -> bool:
    """Take an exclusive flock on ``fd`` within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.005)


class _Locked:
    """``with store._locked(task_id, wait):`` holds the task's lock,
    waited for at most ``wait`` seconds (then Task_busy)."""

    __slots__ = ("store", "task_id", "wait", "fd")

    def __init__(self, store: Store, task_id: str, wait: float) -> None:
        self.store, self.task_id, self.wait, self.fd = store, task_id, wait, -1

    def __enter__(self) -> None:
        fd = self.store._open_lock(self.task_id)
        try:
            if not _flock(fd, self.wait):
                raise TaskBusy(self.task_id, "its lock has been held by another process for %gs; retry" % self.wait)
            if os.fstat(fd).st_nlink == 0:  # destroyed while we waited
                raise TaskDoesNotExist(self.task_id)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def replace_file(data: bytes, tmp: str, tmp_dir: int, name: str, dir_fd: int) -> None:
    """Write ``data`` to the new file ``tmp`` (in directory ``tmp_dir``),
    fsync it and rename it over ``name`` (in ``dir_fd``): readers see the
    old file or the new one, whole, never a part. The caller fsyncs the
    directory to make the rename durable, and removes ``tmp`` on failure."""
    fd = os.open(tmp, _O_NEW, 0o600, dir_fd=tmp_dir)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=dir_fd)


class Store:
    """A state directory. Cheap to open: one directory per method call."""

    def __init__(self, path: str | None = None, lock_wait: float | None = None) -> None:
        self.path = os.path.abspath(path or settings.state_dir())
        self.lock_wait = settings.lock_wait() if lock_wait is None else lock_wait
        self.swept = False
        """Set once retention has run with this store (once per call)."""
        self._root = _open_root(self.path)
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
        cancels, logs)."""
        fd = self._dirs.get(name)
        if fd is None:
            fd = self._dirs[name] = _open_dir(name, self._root, os.path.join(self.path, name))
        return fd

    # -- reading ------------------------------------------------------------

    def ids(self) -> list[str]:
        """Every task id, oldest first (ids sort by creation time)."""
        names = os.listdir(self.dir_fd("tasks"))  # only <id>.json lives here
        names.sort()
        return [n[:-5] for n in names]

    def pending_ids(self) -> list[str]:
        """Ids marked Pending: the only tasks that can need reconciling."""
        return sorted(os.listdir(self.dir_fd("pending")))

    def get(self, task_id: str) -> Task:
        """Read one task. Raises TaskDoesNotExist or TaskCorrupt."""
        try:
            fd = os.open(task_id + ".json", _O_READ, dir_fd=self.dir_fd("tasks"))
        except FileNotFoundError:
            raise TaskDoesNotExist(task_id) from None
        except OSError as e:
            raise self._corrupt(task_id, "cannot open its file: %s" % e.strerror) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._corrupt(task_id, "its file is not a regular file")
            data = os.read(fd, MAX_TASK_FILE + 1)
        finally:
            os.close(fd)
        try:
            if len(data) > MAX_TASK_FILE:
                raise ValueError("file larger than %d bytes" % MAX_TASK_FILE)
            task = Task.from_disk(jsontext.loads(data.decode("utf-8")))
            if task.id != task_id:
                raise ValueError("file holds id %r" % task.id)
        except ValueError as e:  # includes JSON and UTF-8 errors
            raise self._corrupt(task_id, str(e)) from None
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
        with _io("cannot record the cancel of task %s" % task_id):
            try:
                os.close(os.open(task_id, _O_NEW, 0o600, dir_fd=cancels))
            except FileExistsError:
                return False
            try:
                os.fsync(cancels)
            except OSError:
                _unlink(task_id, cancels)  # reported as not done: leave nothing
                raise
        try:  # destroyed meanwhile: leave no request behind
            os.stat(task_id + ".json", dir_fd=self.dir_fd("tasks"), follow_symlinks=False)
        except FileNotFoundError:
            _unlink(task_id, cancels)
            raise TaskDoesNotExist(task_id) from None
        return True

    def _corrupt(self, task_id: str, why: str) -> TaskCorrupt:
        log.store_event(self, "task %s is corrupt: %s" % (task_id, why))
        return TaskCorrupt(task_id, why)

    # -- writing ----------------------------------------------------------

    def _write(self, task: Task) -> None:
        d, tmp_d = self.dir_fd("tasks"), self.dir_fd("tmp")
        data = jsontext.dumps(task.to_disk(), compact=True).encode()
        tmp = "%s.%s" % (task.id, os.urandom(4).hex())
        try:
            with _io("cannot write task %s" % task.id):
                replace_file(data, tmp, tmp_d, task.id + ".json", d)
        except BaseException:
            _unlink(tmp, tmp_d)
            raise
        with _io("cannot make task %s durable (fsync of its directory)" % task.id):
            os.fsync(d)

    def _open_lock(self, task_id: str) -> int:
        """The task's lock file, opened; damage (missing, a symlink, a
        directory, a FIFO...) is repaired: a usable lock is what makes the
        task destroyable."""
        locks = self.dir_fd("locks")
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(5):
            try:
                fd = os.open(task_id, flags, dir_fd=locks)
            except FileNotFoundError:
                # Only damage removes a lock file while the task file remains.
                try:
                    os.stat(task_id + ".json", dir_fd=self.dir_fd("tasks"), follow_symlinks=False)
                except FileNotFoundError:
                    raise TaskDoesNotExist(task_id) from None
                try:
                    fd = os.open(task_id, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=locks)
                except FileExistsError:
                    continue  # someone else repaired it first
            except OSError as e:  # ELOOP, EISDIR, ENXIO...: not a lock file
                self._move_aside(task_id, e.strerror or str(e))
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            self._move_aside(task_id, "not a regular file")
        raise InternalError("cannot open the lock file of task %s" % task_id)

    def _move_aside(self, task_id: str, why: str) -> None:
        log.store_event(self, "lock file of task %s is damaged (%s): moved to tmp/ and replaced" % (task_id, why))
        with _io("cannot move the damaged lock of task %s aside" % task_id):
            try:
                os.rename(task_id, "%s.damaged-lock.%s" % (task_id, os.urandom(4).hex()),
                          src_dir_fd=self.dir_fd("locks"), dst_dir_fd=self.dir_fd("tmp"))
            except FileNotFoundError:
                pass

    def _locked(self, task_id: str, wait: float | None = None) -> _Locked:
        return _Locked(self, task_id, self.lock_wait if wait is None else wait)

    def create(self, debug_info: str, operation: dict[str, Any] | None = None) -> Task:
        """Create a Pending(0.0) task and return it (the API for workers and
        tests). ``operation`` is stored as given, e.g. ``{"kind": "CopyV1",
        "args": {...}}``."""
        now_ns = time.time_ns()
        task = Task(ids.new_id(now_ns), debug_info, now_ns / 1e9, Pending(0.0), operation=operation)
        locks, pending = self.dir_fd("locks"), self.dir_fd("pending")
        with _io("cannot create task %s" % task.id):
            fd = os.open(task.id, _O_NEW, 0o600, dir_fd=locks)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with _io("cannot create task %s" % task.id):
                os.close(os.open(task.id, _O_NEW, 0o600, dir_fd=pending))
            self._write(task)
        except BaseException:
            _unlink(task.id, pending)
            _unlink(task.id, locks)
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
        for ``wait`` seconds (default: the store's), then Task_busy.
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
            self.finished(task)
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
        """Remove every file of a finished (or unreadable) task.

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
            with _io("cannot destroy task %s" % task_id):
                _unlink(task_id + ".log", self.dir_fd("logs"))
                _unlink(task_id, self.dir_fd("pending"))
                _unlink(task_id, self.dir_fd("cancels"))
                for name in os.listdir(tmp):  # a crashed writer's leftovers
                    if name.startswith(task_id):
                        _unlink(name, tmp)
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
                _unlink(task_id, self.dir_fd("locks"))
                _unlink(tomb, tmp)
            if task is not None:
                self.unindex(_bucket(task.updated), task_id)

    def hold_mark(self, task_id: str) -> int:
        """(In the worker, before it records its identity.) Open the task's
        mark and flock it, for the life of the calling process; returns the
        descriptor. Raises TaskInProgress if another worker holds it."""
        pending = self.dir_fd("pending")
        with _io("cannot open the mark of task %s" % task_id):
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

    def mark(self, task_id: str) -> tuple[int, int] | None:
        """``(device, inode)`` of the task's mark, or None if it has none
        (finished, or damaged): what a live worker must hold open."""
        try:
            st = os.stat(task_id, dir_fd=self.dir_fd("pending"), follow_symlinks=False)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

    def finished(self, task: Task) -> None:
        """Index a finished task by its end time (``ended/``), then drop
        its Pending marker and cancel request. Best effort: if the index
        entry cannot be made, the marker stays and the next ``ls`` (which
        reconciles marked tasks) tries again."""
        try:
            ended = self.dir_fd("ended")
            bucket = str(_bucket(task.updated))
            try:
                os.mkdir(bucket, 0o700, dir_fd=ended)
            except FileExistsError:
                pass
            fd = os.open(bucket, _O_DIR, dir_fd=ended)
            try:
                os.close(os.open(task.id, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd))
            finally:
                os.close(fd)
        except (OSError, PluginError):
            return
        self.forget_marker(task.id)

    def unindex(self, bucket: int, task_id: str) -> None:
        """Drop a task's ``ended/`` entry, and its bucket once empty."""
        try:
            ended = self.dir_fd("ended")
            fd = os.open(str(bucket), _O_DIR, dir_fd=ended)
            try:
                _unlink(task_id, fd)
            finally:
                os.close(fd)
            os.rmdir(str(bucket), dir_fd=ended)
        except (OSError, PluginError):
            pass  # not there, or not empty

    def ended_before(self, bucket: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` ``(bucket, id)`` entries of tasks that ended in
        buckets before ``bucket``, oldest buckets first. Reads the bucket
        names and only as many entries as it returns."""
        ended = self.dir_fd("ended")
        found: list[tuple[int, str]] = []
        for b in sorted(int(n) for n in os.listdir(ended) if n.isdigit() and int(n) < bucket):
            try:
                fd = os.open(str(b), _O_DIR, dir_fd=ended)
            except OSError:
                continue
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        found.append((b, entry.name))
                        if len(found) >= limit:
                            return found
            finally:
                os.close(fd)
        return found

    def forget_marker(self, task_id: str) -> None:
        """Drop the Pending marker and cancel request of a finished task
        (best effort: a stale marker only costs ``ls`` one more look at the
        task)."""
        for name in ("pending", "cancels"):
            try:
                _unlink(task_id, self.dir_fd(name))
            except OSError:
                pass

    def sweep_tmp(self, age: float) -> None:
        """Remove what processes killed midway left in ``tmp/``: temporary
        files older than ``age`` seconds, and the tombstones of interrupted
        destroys together with their lock files."""
        tmp, now = self.dir_fd("tmp"), time.time()
        for name in os.listdir(tmp):
            try:
                if name.endswith(TOMBSTONE):
                    task_id = name[: -len(TOMBSTONE)]
                    self._unindex_tombstone(name, task_id)
                    _unlink(task_id, self.dir_fd("locks"))
                    _unlink(name, tmp)
                elif now - os.stat(name, dir_fd=tmp, follow_symlinks=False).st_mtime > age:
                    _unlink(name, tmp)
            except OSError:
                pass

    def _unindex_tombstone(self, name: str, task_id: str) -> None:
        """A destroy died after its commit point: the tombstone is the task
        file it renamed away, and names the retention entry to drop."""
        try:
            fd = os.open(name, _O_READ, dir_fd=self.dir_fd("tmp"))
            try:
                data = os.read(fd, MAX_TASK_FILE + 1)
            finally:
                os.close(fd)
            updated = jsontext.loads(data.decode("utf-8"))["updated"]  # type: ignore[index]
            self.unindex(_bucket(float(updated)), task_id)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: a sweep drops the entry once it is due

    def forget_stale_marker(self, task_id: str, age: float) -> None:
        """Remove the marker and lock left by a ``create`` that died before
        writing the task file, once the marker is ``age`` seconds old and no
        creator holds the lock."""
        pending, locks = self.dir_fd("pending"), self.dir_fd("locks")
        try:
            if time.time() - os.stat(task_id, dir_fd=pending, follow_symlinks=False).st_mtime < age:
                return
            fd = os.open(task_id, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=locks)
        except FileNotFoundError:
            _unlink(task_id, pending)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.stat(task_id + ".json", dir_fd=self.dir_fd("tasks"), follow_symlinks=False)
            except FileNotFoundError:
                _unlink(task_id, pending)
                _unlink(task_id, locks)
        except BlockingIOError:
            pass  # a create is still in progress
        finally:
            os.close(fd)
