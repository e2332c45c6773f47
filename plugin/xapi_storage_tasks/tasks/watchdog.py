"""The cancel watchdog: a detached process that makes a cancel end even
when the worker ignores SIGTERM.

:func:`xapi_storage_tasks.tasks.lifecycle.request_cancel` starts one per
first cancel request. Once the grace period has passed it reconciles the
task, which SIGKILLs a worker still alive; it exits as soon as the task is
finished. It gets the reconcile function as an argument, so this module
depends on the store only and the lifecycle can import it without a cycle.
"""

import time
from typing import Callable

from xapi_storage_tasks.process.spawn import spawn
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import PluginError, TaskCorrupt, TaskDoesNotExist

POLL = 0.05
RETRY = 0.5
GIVE_UP = 60.0
"""Seconds after the grace period when a watchdog that keeps failing (a
full disk, a lock held by a stopped process) gives up: any later call on
the task reconciles it just the same."""

Reconcile = Callable[[Store, str], object]


def watch(path: str, task_id: str, grace: float, reconcile: Reconcile) -> None:
    """Until the task is finished: once ``grace`` seconds have passed,
    ``reconcile(store, task_id)`` every :data:`RETRY` seconds."""
    with Store(path) as store:
        deadline = time.monotonic() + grace
        give_up = deadline + GIVE_UP
        while time.monotonic() < give_up:
            try:
                if store.get(task_id).state.terminal:
                    return
                if time.monotonic() >= deadline:
                    reconcile(store, task_id)
                    deadline = time.monotonic() + RETRY
            except (TaskDoesNotExist, TaskCorrupt):
                return  # destroyed, or beyond what a reconcile can fix
            except PluginError:
                deadline = time.monotonic() + RETRY  # e.g. a busy lock: try again
            time.sleep(POLL)


def start(path: str, task_id: str, grace: float, reconcile: Reconcile) -> None:
    """Start the watchdog of a cancelled task as a detached process."""
    spawn(lambda: watch(path, task_id, grace, reconcile))
