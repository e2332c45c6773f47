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
import os
import select
import signal
import sys
import time

from xapi_storage_tasks.tasks import lifecycle
from xapi_storage_tasks.tasks import log
from xapi_storage_tasks.process import identity as proc
from xapi_storage_tasks.process.spawn import spawn
from xapi_storage_tasks.wire import boundary
from xapi_storage_tasks.wire.errors import PluginError, TaskDoesNotExist
from xapi_storage_tasks.tasks.state import CANCELLED, Completed, Pending, TransitionRefused
from xapi_storage_tasks.tasks.store import Store

START_WAIT = 10.0
PROGRESS_INTERVAL = 0.25
HEARTBEAT_INTERVAL = 2.0


class Cancelled(BaseException):
    """Raised in the worker when its task is cancelled. A BaseException so
    that an operation's ``except Exception`` cannot swallow it."""


class TaskGone(BaseException):
    """The task was destroyed or finished by someone else: stop quietly."""


class Context:
    """What a running operation may do to its task."""

    def __init__(self, store, task):
        self.store = store
        self.task_id = task.id
        self.debug_info = task.debug_info
        self.cancel_requested = task.cancel is not None
        self._interruptible = False
        self._last_write = 0.0
        self._progress = 0.0

    # SIGTERM lands here. While the operation runs it raises Cancelled at
    # once, so even a long read or write stops promptly; inside the store's
    # own writes it only sets the flag, which is checked right after.
    def _on_sigterm(self, signum, frame):
        self.cancel_requested = True
        if self._interruptible:
            self._interruptible = False
            raise Cancelled()

    @contextlib.contextmanager
    def critical(self):
        """A section SIGTERM must not interrupt (e.g. renaming a finished
        file into place together with forgetting its artifact)."""
        was, self._interruptible = self._interruptible, False
        try:
            yield
        finally:
            self._interruptible = was
        self.check_cancelled()

    def check_cancelled(self):
        """Raise Cancelled if a cancel has been requested."""
        if self.cancel_requested and self._interruptible:
            self._interruptible = False
            raise Cancelled()

    def progress(self, fraction, force=False):
        """Report progress in [0, 1]. Written at most every 0.25 s (and at
        least every 2 s while reported, as a heartbeat)."""
        fraction = float(fraction)
        now = time.monotonic()
        due = now - self._last_write
        if not force and (due < PROGRESS_INTERVAL or (fraction <= self._progress and due < HEARTBEAT_INTERVAL)):
            self.check_cancelled()
            return
        self._progress = max(self._progress, fraction)
        with self.critical():
            try:
                self.store.transition(self.task_id, lambda t: Pending(fraction))
            except (TransitionRefused, TaskDoesNotExist):
                raise TaskGone()
            self._last_write = now

    def declare_artifact(self, path):
        """Record ``path`` as something to remove if the task does not
        complete. Call it *before* creating the file."""
        path = os.path.abspath(path)

        def add(t):
            if t.state.terminal:  # finished elsewhere: nobody would undo it
                raise TaskGone()
            t.artifacts.append(path)

        with self.critical():
            self.store.annotate(self.task_id, add)

    def forget_artifact(self, path):
        """Stop treating ``path`` as an artifact: it no longer exists
        (removed, or renamed to its final name), or it turned out not to be
        ours. Do not forget an operation's result: it stays declared until
        the Completed transition drops every artifact in the same atomic
        write that marks success, so no cancel or crash in between can
        leave a failed task's output behind."""
        path = os.path.abspath(path)
        with self.critical():
            self.store.annotate(self.task_id, lambda t: t.artifacts.remove(path) if path in t.artifacts else None)

    def log(self, message):
        """A line in the task's log."""
        log.task_event(self.store, self.store.get(self.task_id), message)


def _func_ref(func):
    return "%s:%s" % (func.__module__, func.__qualname__)


def start(dbg, func, args=None, kind="Task", store=None):
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


def launch(store, task_id, func, args):
    """Start the worker of an existing Pending task (the second half of
    :func:`start`); returns once the worker has recorded its identity."""
    ready_r, ready_w = os.pipe()
    try:
        spawn(lambda: _work(store.path, task_id, func, args, ready_w), keep_fds=[ready_w])
    finally:
        os.close(ready_w)
    try:
        ready, _, _ = select.select([ready_r], [], [], START_WAIT)
        started = bool(ready) and os.read(ready_r, 1) == b"!"
    finally:
        os.close(ready_r)
    if ready and not started:  # the daemon died before recording itself
        store.transition(task_id, lambda t: None if t.worker or t.state.terminal
                         else lifecycle.fail_and_undo(store, t, "Worker lost: it failed to start"))


def _work(path, task_id, func, args, ready_fd):
    store = Store(path)
    task = store.get(task_id)
    ctx = Context(store, task)
    signal.signal(signal.SIGTERM, ctx._on_sigterm)  # before anyone can learn our pid
    ident = proc.identity()

    def record(t):
        if t.state.terminal:  # given up on while we were starting
            raise TaskGone()
        t.worker = ident

    try:
        task = store.annotate(task_id, record)
    except TaskGone:
        return
    os.write(ready_fd, b"!")
    os.close(ready_fd)
    ctx.cancel_requested = ctx.cancel_requested or task.cancel is not None
    log.task_event(store, task, "worker started: pid %d, %s" % (ident["pid"], task.operation and task.operation.get("func")))
    began = time.monotonic()
    try:
        ctx._interruptible = True
        ctx.check_cancelled()
        result = func(ctx, **args)
        ctx._interruptible = False
        duration = time.monotonic() - began

        def complete(t):
            t.artifacts = []  # the operation succeeded: nothing to undo
            return Completed(duration, result)

        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        log.task_event(store, task, "operation returned after %.3fs, peak RSS %d KiB" % (duration, peak))
        store.transition(task_id, complete)
        log.task_event(store, task, "completed")
    except Cancelled:
        ctx._interruptible = False
        _finish_failed(store, task_id, CANCELLED)
    except TaskGone:
        log.task_event(store, task, "task finished or destroyed elsewhere; worker exits")
    except BaseException as exc:
        ctx._interruptible = False
        log.task_event(store, task, "operation raised:\n" + boundary.traceback_text(exc))
        _finish_failed(store, task_id, boundary.failure_message(exc))


def _finish_failed(store, task_id, message):
    try:
        store.transition(task_id, lambda t: lifecycle.fail_and_undo(store, t, message))
    except (TransitionRefused, TaskDoesNotExist):
        pass


def spawn_escalator(path, task_id, grace):
    """A detached watchdog: once ``grace`` seconds have passed since the
    cancel, reconcile the task, which SIGKILLs a worker that ignored
    SIGTERM. It exits early when the task finishes."""

    def watch():
        with Store(path) as store:
            deadline = time.monotonic() + grace
            while True:
                try:
                    task = store.get(task_id)
                except PluginError:
                    return
                if task.state.terminal:
                    return
                if time.monotonic() >= deadline:
                    lifecycle.reconcile(store, task_id)
                    deadline = time.monotonic() + 0.5
                time.sleep(0.05)

    spawn(watch)
