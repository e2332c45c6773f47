"""Retention: finished tasks are destroyed automatically.

The toolstack never calls ``Task.destroy`` or ``Data.destroy``, so every
task it starts would stay forever. A finished task is therefore destroyed
``TASK_RETENTION`` seconds after it ended (default four hours; ``0`` keeps
tasks forever), log included, by whichever call notices:

- a call that looks at an expired task (``stat``, ``cancel``,
  ``destroy``) destroys it and answers ``Task_does_not_exist``;
- every call (``ls`` too) also destroys up to :data:`PER_CALL` other
  expired tasks (:func:`sweep`). They are found through ``ended/``, where
  each ended task has an entry in the bucket of its end time
  (:mod:`xapi_storage_tasks.tasks.index`): the call
  lists the bucket names (one per minute of end times still kept) and reads
  at most :data:`SCAN` entries, never the task files or the whole store.
"""

from __future__ import annotations

import time

from xapi_storage_tasks import settings
from xapi_storage_tasks.tasks import index, log
from xapi_storage_tasks.wire.errors import PluginError, TaskBusy, TaskDoesNotExist, TaskInProgress

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from xapi_storage_tasks.tasks.record import Task
    from xapi_storage_tasks.tasks.store import Store

PER_CALL = 4
"""Expired tasks destroyed at most per call."""
SCAN = 32
"""``ended/`` entries examined at most per call."""


def expired(task: Task, now: float | None = None) -> bool:
    """True when ``task`` finished more than the retention time ago."""
    keep = settings.retention()
    if keep <= 0 or not task.state.terminal:
        return False
    return (time.time() if now is None else now) - task.updated >= keep


def sweep(store: Store) -> int:
    """Destroy up to :data:`PER_CALL` expired tasks, once per store (one
    per call); returns how many. Never raises: a task it cannot destroy
    now (lock busy, a full disk) is left for a later call."""
    if store.swept:
        return 0
    store.swept = True
    keep = settings.retention()
    if keep <= 0:
        return 0
    removed = 0
    try:
        for bucket, task_id in index.ended_before(store, index.bucket(time.time() - keep), SCAN):
            if removed >= PER_CALL:
                break
            try:
                store.destroy(task_id, wait=0, durable=False)
                removed += 1
            except TaskDoesNotExist:
                index.unindex(store, bucket, task_id)  # destroyed already: a stale entry
            except (TaskBusy, TaskInProgress):
                continue
    except (OSError, PluginError) as e:
        log.store_event(store, "retention sweep stopped: %s" % e)
    return removed
