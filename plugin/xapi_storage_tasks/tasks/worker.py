"""Running operations as tasks in detached workers.

:func:`start` creates a Pending task, forks a daemon (python-daemon's
``DaemonContext``: own session and process group, umask 077, cwd ``/``,
standard streams on ``/dev/null``, every inherited descriptor closed) and
returns the task id as soon as the worker has recorded its identity in the
task file. The caller's stdout and stderr pipes therefore reach EOF as soon
as the caller exits, however long the operation runs.

An operation is a function ``op(ctx, **args)``; ``ctx`` is a
:class:`Context`. Its return value becomes the Completed result (None, or a
wire value such as ``["UnitResult", None]``); an exception makes the task
Failed with a readable message (the traceback goes to the log). A cancel
raises :class:`Cancelled` inside the operation; the declared artifacts are
removed and the task ends Failed ``Cancelled``.
"""

import contextlib
import json
import os
import signal
import time
from types import FrameType
from typing import Any, Callable, Dict, Iterator, Optional

from xapi_storage_tasks.process import identity
from xapi_storage_tasks.process.spawn import Readiness, spawn
from xapi_storage_tasks.tasks import lifecycle, log, marks
from xapi_storage_tasks.tasks.record import Task
from xapi_storage_tasks.tasks.reserve import Reserve
from xapi_storage_tasks.tasks.state import CANCELLED, Completed, Pending, State, TransitionRefused
from xapi_storage_tasks.wire import boundary
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import InternalError, TaskBusy, TaskDoesNotExist, TaskInProgress

START_WAIT = 10.0
PROGRESS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 2.0
LOCK_WAIT = 60.0
"""Seconds a worker waits for its task's lock for the writes that matter
(artifacts, the end); progress never waits."""
FINAL_PATIENCE = 300.0
"""Seconds a worker keeps trying to record its task's end when the state
directory refuses the write (after freeing its :mod:`reserve`)."""

Operation = Callable[..., Any]
"""``op(ctx, **args)``: returns the Completed result (None or a wire value)."""


class Cancelled(BaseException):
    """Raised in the worker when its task is cancelled. A BaseException so
    that an operation's ``except Exception`` cannot swallow it."""


class TaskGone(BaseException):
    """The task was destroyed or finished by someone else: stop quietly."""


class Context:
    """What a running operation may do to its task, and the worker's run
    loop around the operation (:meth:`run`)."""

    def __init__(self, store: Store, task: Task) -> None:
        self.store = store
        self.task_id = task.id
        self.debug_info = task.debug_info
        self.cancel_requested = task.cancel is not None
        self._interruptible = False
        self._last_write = 0.0
        self._progress = 0.0
        self._progress_skipped = False

    def listen_for_cancel(self) -> None:
        """Make SIGTERM a cancel request (call before anyone can learn our
        pid)."""
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # SIGTERM lands here. While the operation runs it raises Cancelled at
    # once, so even a long read or write stops promptly; inside the store's
    # own writes it only sets the flag, which is checked right after.
    def _on_sigterm(self, signum: int, frame: Optional[FrameType]) -> None:
        self.cancel_requested = True
        if self._interruptible:
            self._interruptible = False
            raise Cancelled()

    def run(self, func: Operation, args: Dict[str, Any]) -> Any:
        """Run ``func(self, **args)`` interruptibly: a cancel requested
        before or during it raises :class:`Cancelled` in it. Returns its
        result; afterwards a SIGTERM only sets :attr:`cancel_requested`."""
        self._interruptible = True
        try:
            self.check_cancelled()
            return func(self, **args)
        finally:
            self._interruptible = False

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section SIGTERM must not interrupt (e.g. renaming a finished
        file into place together with forgetting its artifact)."""
        was, self._interruptible = self._interruptible, False
        try:
            yield
        finally:
            self._interruptible = was
        self.check_cancelled()

    def check_cancelled(self) -> None:
        """Raise Cancelled if a cancel has been requested."""
        if self.cancel_requested and self._interruptible:
            self._interruptible = False
            raise Cancelled()

    def progress(self, fraction: float, force: bool = False) -> None:
        """Report progress in [0, 1]. Written at most every 0.25 s (and at
        least every 2 s while reported, as a heartbeat).

        Progress is advisory: a write that cannot be made now (a full or
        failing state directory, the task's lock busy) is skipped and the
        operation goes on; the next report tries again."""
        fraction = float(fraction)
        now = time.monotonic()
        due = now - self._last_write
        if not force and (due < PROGRESS_INTERVAL or (fraction <= self._progress and due < HEARTBEAT_INTERVAL)):
            self.check_cancelled()
            return
        self._progress = max(self._progress, fraction)
        with self.critical():
            try:
                self.store.transition(self.task_id, lambda t: Pending(self._progress), wait=0)
            except (TransitionRefused, TaskDoesNotExist):
                raise TaskGone() from None
            except (InternalError, TaskBusy) as e:
                if not self._progress_skipped:
                    log.task_event(self.store, self.store.get(self.task_id), "progress not recorded, going on: %s" % e)
                self._progress_skipped = True
            else:
                self._progress_skipped = False
            self._last_write = now

    def declare_artifact(self, path: str) -> None:
        """Declare ``path`` as something this task may create. Call it
        *before* creating the file, then :meth:`created_artifact` once it
        exists: if the task does not complete, the path is removed only
        while it holds the file recorded then (a declared path never
        recorded, or holding someone else's file, is left alone)."""
        path = os.path.abspath(path)

        def add(t: Task) -> None:
            if t.state.terminal:  # finished elsewhere: nobody would undo it
                raise TaskGone()
            if path not in t.artifacts:
                t.artifacts.append(path)

        with self.critical():
            self.store.annotate(self.task_id, add)

    def created_artifact(self, path: str, fd: int) -> None:
        """Record that this task created the declared artifact ``path``,
        open as ``fd``: its device and inode identify it from now on."""
        path = os.path.abspath(path)
        st = os.fstat(fd)

        def record(t: Task) -> None:
            if path not in t.artifacts:
                raise ValueError("artifact %s was not declared" % path)
            t.created[path] = [st.st_dev, st.st_ino]

        with self.critical():
            self.store.annotate(self.task_id, record)

    def create_artifact(self, path: str, mode: int = 0o600) -> int:
        """Create the new file ``path`` (never over an existing one) as an
        artifact of this task and return a descriptor open for writing.

        Where the file system allows it (``O_TMPFILE``), the file is made
        nameless, its identity recorded, and only then linked at ``path``:
        a worker killed at any instant leaves either no file or one the
        cleanup knows. Elsewhere it is created then recorded, and a worker
        killed in between leaves the file (cleanup cannot prove it is the
        task's, so it is left alone)."""
        path = os.path.abspath(path)
        self.declare_artifact(path)
        flags = os.O_WRONLY | os.O_CLOEXEC
        directory, name = os.path.split(path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fd, named = os.open(".", flags | os.O_TMPFILE, mode, dir_fd=dfd), False
            except OSError:  # no O_TMPFILE on this file system: create by name
                fd, named = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd), True
            try:
                self.created_artifact(path, fd)
                if not named:  # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N; EEXIST if path exists
                    os.link("/proc/self/fd/%d" % fd, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=True)
            except BaseException:
                os.close(fd)
                raise
        finally:
            os.close(dfd)
        return fd

    def moving_artifact(self, src: str, dst: str) -> None:
        """Call just before renaming the created artifact ``src`` to
        ``dst``: ``dst`` becomes an artifact with the same identity (a
        rename keeps the inode), so the file is undone under whichever name
        it has if the task fails, and a file someone else puts at ``dst``
        never is."""
        src, dst = os.path.abspath(src), os.path.abspath(dst)

        def move(t: Task) -> None:
            if src not in t.created:
                raise ValueError("artifact %s was not recorded as created" % src)
            if dst not in t.artifacts:
                t.artifacts.append(dst)
            t.created[dst] = list(t.created[src])

        with self.critical():
            self.store.annotate(self.task_id, move)

    def forget_artifact(self, path: str) -> None:
        """Stop treating ``path`` as an artifact: it no longer exists
        (removed, or renamed to its final name), or it turned out not to be
        ours. Do not forget an operation's result: it stays declared until
        the Completed transition drops every artifact in the same atomic
        write that marks success, so no cancel or crash in between can
        leave a failed task's output behind."""
        path = os.path.abspath(path)

        def drop(t: Task) -> None:
            if path in t.artifacts:
                t.artifacts.remove(path)
            t.created.pop(path, None)

        with self.critical():
            self.store.annotate(self.task_id, drop)

    def log(self, message: str) -> None:
        """A line in the task's log."""
        log.task_event(self.store, self.store.get(self.task_id), message)


def _func_ref(func: Operation) -> str:
    return "%s:%s" % (func.__module__, func.__qualname__)


def start(dbg: str, func: Operation, args: Optional[Dict[str, Any]] = None, kind: str = "Task",
          store: Optional[Store] = None) -> str:
    """Start ``func(ctx, **args)`` as a task; return the task id.

    The task exists (Pending 0.0) and its worker's identity is recorded
    when this returns, so a cancel right after always has a target.
    """
    args = dict(args or {})
    owned = store is None
    store = store or Store()
    try:
        task = store.create(dbg, operation={"kind": kind, "func": _func_ref(func), "args": args})
        launch(store, task.id, func, args)
        return task.id
    finally:
        if owned:
            store.close()


def launch(store: Store, task_id: str, func: Operation, args: Dict[str, Any]) -> None:
    """Start the worker of an existing Pending task (the second half of
    :func:`start`); returns once the worker has recorded its identity."""
    readiness = Readiness()
    try:
        spawn(lambda: _work(store.path, task_id, func, args, readiness), readiness=readiness)
    finally:
        readiness.close_sender()
    started, why = readiness.wait(START_WAIT)
    if started is False:  # the daemon died before recording itself
        message = "Worker lost: it failed to start" + (" (%s)" % why if why else "")

        def decide(t: Task) -> Optional[State]:
            return None if t.worker or t.state.terminal else lifecycle.fail_and_undo(store, t, message)

        store.transition(task_id, decide)


def _work(path: str, task_id: str, func: Operation, args: Dict[str, Any], readiness: Readiness) -> None:
    store = Store(path, lock_wait=LOCK_WAIT)
    task = store.get(task_id)
    ctx = Context(store, task)
    ctx.listen_for_cancel()  # before anyone can learn our pid
    try:
        # Held open until this process ends: the kernel's proof, for any
        # canceller, that this process is the task's worker.
        mark = marks.hold(store, task_id)
    except TaskInProgress:
        return  # another worker already runs this task
    ident = identity.identity()
    assert ident is not None  # this process is alive
    ident["fd"] = mark
    reserve = Reserve(store, len(json.dumps(task.to_disk())))

    def record(t: Task) -> None:
        if t.state.terminal:  # given up on while we were starting
            raise TaskGone()
        t.worker = ident

    try:
        task = store.annotate(task_id, record)
    except TaskGone:
        return
    readiness.ready()
    ctx.cancel_requested = ctx.cancel_requested or task.cancel is not None
    log.task_event(store, task, "worker started: pid %d, %s" % (ident["pid"], task.operation and task.operation.get("func")))
    began = time.monotonic()
    try:
        result = ctx.run(func, args)
        duration = time.monotonic() - began

        def complete(t: Task) -> State:
            t.artifacts, t.created = [], {}  # the operation succeeded: nothing to undo
            return Completed(duration, result)

        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        log.task_event(store, task, "operation returned after %.3fs, peak RSS %d KiB" % (duration, peak))
        _record_end(store, task_id, complete, reserve)
        log.task_event(store, task, "completed")
    except Cancelled:
        _finish_failed(store, task_id, CANCELLED, reserve)
    except TaskGone:
        log.task_event(store, task, "task finished or destroyed elsewhere; worker exits")
    except BaseException as exc:
        log.task_event(store, task, "operation raised:\n" + boundary.traceback_text(exc))
        _finish_failed(store, task_id, boundary.failure_message(exc), reserve)


def _record_end(store: Store, task_id: str, decide: Callable[[Task], Optional[State]], reserve: Reserve) -> None:
    """Record the task's end; when the state directory refuses the write
    (full, failing, the lock held), free the reserve and keep trying for
    :data:`FINAL_PATIENCE` seconds."""
    deadline = time.monotonic() + FINAL_PATIENCE
    while True:
        try:
            store.transition(task_id, decide)
            return
        except (InternalError, TaskBusy):
            if reserve.release():
                continue
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _finish_failed(store: Store, task_id: str, message: str, reserve: Reserve) -> None:
    try:
        _record_end(store, task_id, lambda t: lifecycle.fail_and_undo(store, t, message), reserve)
    except (TransitionRefused, TaskDoesNotExist):
        pass
