"""Paced answers for a caller that polls a running task back to back.

The toolstack polls ``Data.stat`` of a migration's mirror with no sleep,
one fresh process per poll, so however cheap one call is, the loop burns a
core. A poll of a running task therefore answers at once only when the
task's status changed since the last answer about it (it ended, or its
progress moved by :data:`STEP`), when there was no answer in the last
``TASK_STAT_WAIT`` seconds (a first or isolated call), or when the task has
ended. Otherwise it waits, holding no lock, until the status changes or
that period since the last answer has passed, then answers the truth: a
back-to-back poller gets about one answer per period and every change
within milliseconds, and nobody waits longer than the period.

The last answer lives in ``polls/<id>``: plain JSON ``{"at": <time>,
"state": [<tag>, <progress or null>]}``, replaced atomically but without
fsync (losing it in a crash only makes the next poll answer at once, as a
missing or unreadable one does). It goes when the task ends
(:func:`xapi_storage_tasks.tasks.marks.forget`) and with the task
(:meth:`xapi_storage_tasks.tasks.store.Store.destroy`).

The wait watches the task file itself: every write of it replaces the file
(a new inode), so a ``stat`` every :data:`TICK` seconds sees a worker's
write within a tick. Measured on a 0.5 s wait in a fresh ``python3 -I -S``,
that costs less CPU than an inotify watch, whose ``ctypes`` import alone
costs more than the stats, and it has no per-user instance limit.
"""

from __future__ import annotations

import os
import time

from xapi_storage_tasks import settings
from xapi_storage_tasks.files import jsonfile
from xapi_storage_tasks.files.dirs import unlink
from xapi_storage_tasks.wire.errors import PluginError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Callable

    from xapi_storage_tasks.tasks.state import State
    from xapi_storage_tasks.tasks.store import Store

    Look = Callable[[], tuple[State, bool]]

TICK = 0.005
"""Seconds between two looks at the task file while waiting."""
STEP = 0.1
"""Progress that counts as news."""
MAX_MEMORY = 256
"""The largest ``polls/<id>`` read back, in bytes."""


def paced(store: Store, task_id: str, look: Look) -> State:
    """The answer of ``look()``, paced (see the module docstring).

    ``look()`` returns the answer as of now and whether the task has
    ended; it is called again after a wait, so the answer is never stale.
    No lock is held between calls of it."""
    answer, ended = look()
    wait = settings.stat_wait()
    if ended or wait <= 0:
        return answer
    last = _recall(store, task_id)
    if last is not None and not _news(last[1], answer):
        left = min(wait, last[0] + wait - time.time())  # a clock step never stretches the wait
        if left > 0:
            answer, ended = _wait(store, task_id, last[1], left, look)
            if ended:
                return answer
    _remember(store, task_id, answer)
    return answer


def _summary(state: State) -> list[object]:
    """What a poller was told: the state's tag and, while Pending, its progress."""
    return [state.to_wire()[0], getattr(state, "progress", None)]


def _news(before: list[object], state: State) -> bool:
    tag, progress = _summary(state)
    if tag != before[0]:
        return True
    return isinstance(progress, float) and isinstance(before[1], float) and progress - before[1] >= STEP


def _wait(store: Store, task_id: str, before: list[object], left: float, look: Look) -> tuple[State, bool]:
    """Look again each time the task file is replaced, until there is news
    or ``left`` seconds have passed; then the answer as of then."""
    deadline = time.monotonic() + left
    tasks, name = store.dir_fd("tasks"), task_id + ".json"
    seen = _identity(name, tasks)
    while True:
        now = time.monotonic()
        if now >= deadline:
            return look()
        time.sleep(min(TICK, deadline - now))
        current = _identity(name, tasks)
        if current != seen:
            seen = current
            answer, ended = look()
            if ended or _news(before, answer):
                return answer, ended


def _identity(name: str, dir_fd: int) -> tuple[int, int, int] | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None  # gone: the look that follows says so
    return st.st_ino, st.st_mtime_ns, st.st_size


def _recall(store: Store, task_id: str) -> tuple[float, list[object]] | None:
    """When the last answer was given, and what it was; None if unknown."""
    try:
        memory = jsonfile.read_json(task_id, store.dir_fd("polls"), MAX_MEMORY)
    except (OSError, ValueError, PluginError):
        return None
    if not isinstance(memory, dict):
        return None
    at, state = memory.get("at"), memory.get("state")
    if not isinstance(at, float) or not isinstance(state, list) or len(state) != 2 or not isinstance(state[0], str):
        return None
    return at, state


def _remember(store: Store, task_id: str, state: State) -> None:
    """Best effort: a memory not written only makes the next poll answer
    at once."""
    try:
        polls = store.dir_fd("polls")
        jsonfile.write_json({"at": time.time(), "state": _summary(state)}, task_id, polls, store.dir_fd("tmp"),
                            durable=False)
        try:  # destroyed meanwhile: leave nothing behind
            os.stat(task_id + ".json", dir_fd=store.dir_fd("tasks"), follow_symlinks=False)
        except FileNotFoundError:
            unlink(task_id, polls)
    except (OSError, PluginError):
        pass
