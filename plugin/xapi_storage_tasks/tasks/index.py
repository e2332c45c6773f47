"""The retention index: ``ended/<b>/<id>``, an empty entry per ended task
in the bucket of its end time (``b = end // WIDTH``). It is how retention
finds expired tasks without reading or listing every task."""

from __future__ import annotations

import os

from xapi_storage_tasks.files.dirs import O_DIR, unlink
from xapi_storage_tasks.tasks import marks
from xapi_storage_tasks.wire.errors import PluginError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from xapi_storage_tasks.tasks.record import Task
    from xapi_storage_tasks.tasks.store import Store

WIDTH = 60
"""Seconds of end times per bucket."""


def bucket(when: float) -> int:
    """The bucket of an end time."""
    return int(when // WIDTH)


def retire(store: Store, task: Task) -> None:
    """Index an ended task by its end time, then drop its mark and cancel
    request. Best effort: if the index entry cannot be made, the mark
    stays and the next ``ls`` (which reconciles marked tasks) tries again."""
    try:
        ended = store.dir_fd("ended")
        name = str(bucket(task.updated))
        try:
            os.mkdir(name, 0o700, dir_fd=ended)
        except FileExistsError:
            pass
        fd = os.open(name, O_DIR, dir_fd=ended)
        try:
            os.close(os.open(task.id, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd))
        finally:
            os.close(fd)
    except (OSError, PluginError):
        return
    marks.forget(store, task.id)


def unindex(store: Store, b: int, task_id: str) -> None:
    """Drop a task's entry in bucket ``b``, and the bucket once empty."""
    try:
        ended = store.dir_fd("ended")
        fd = os.open(str(b), O_DIR, dir_fd=ended)
        try:
            unlink(task_id, fd)
        finally:
            os.close(fd)
        os.rmdir(str(b), dir_fd=ended)
    except (OSError, PluginError):
        pass  # not there, or not empty


def ended_before(store: Store, b: int, limit: int) -> list[tuple[int, str]]:
    """Up to ``limit`` ``(bucket, id)`` entries of tasks that ended in
    buckets before ``b``, oldest buckets first. Reads the bucket names and
    only as many entries as it returns."""
    ended = store.dir_fd("ended")
    found: list[tuple[int, str]] = []
    for n in sorted(int(n) for n in os.listdir(ended) if n.isdigit() and int(n) < b):
        try:
            fd = os.open(str(n), O_DIR, dir_fd=ended)
        except OSError:
            continue
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    found.append((n, entry.name))
                    if len(found) >= limit:
                        return found
        finally:
            os.close(fd)
    return found
