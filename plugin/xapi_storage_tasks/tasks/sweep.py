"""Crash sweeps: what processes killed midway left in ``tmp/``.

That is temporaries of writes (see
:func:`xapi_storage_tasks.files.jsonfile.write_json`), damaged locks moved
aside, and the tombstones of destroys killed after their commit point.
"""

from __future__ import annotations

import os
import time

from xapi_storage_tasks.files import jsonfile
from xapi_storage_tasks.files.dirs import unlink
from xapi_storage_tasks.tasks import index
from xapi_storage_tasks.tasks.store import MAX_TASK_FILE, TOMBSTONE

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from xapi_storage_tasks.tasks.store import Store


def sweep_tmp(store: Store, age: float) -> None:
    """Remove the files in ``tmp/`` older than ``age`` seconds (all of
    them ours, none in use that long), and the tombstones of interrupted
    destroys together with their lock files and index entries."""
    tmp, now = store.dir_fd("tmp"), time.time()
    for name in os.listdir(tmp):
        try:
            if name.endswith(TOMBSTONE):
                task_id = name[: -len(TOMBSTONE)]
                _unindex_tombstone(store, name, task_id)
                unlink(task_id, store.dir_fd("locks"))
                unlink(name, tmp)
            elif now - os.stat(name, dir_fd=tmp, follow_symlinks=False).st_mtime > age:
                unlink(name, tmp)
        except OSError:
            pass


def _unindex_tombstone(store: Store, name: str, task_id: str) -> None:
    """A destroy died after its commit point: the tombstone is the task
    file it renamed away, and names the retention entry to drop."""
    try:
        updated = jsonfile.read_json(name, store.dir_fd("tmp"), MAX_TASK_FILE)["updated"]  # type: ignore[index]
        index.unindex(store, index.bucket(float(updated)), task_id)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # unreadable: a sweep drops the entry once it is due
