"""Per-task and store log lines.

Lines go to syslog when the machine has one (``/dev/log``), else to
``logs/<id>.log`` (per task) or ``logs/store.log`` in the state directory.
``TASK_SYSLOG=0`` or ``=1`` forces the choice. Logging never raises: a
full disk must not turn a successful call into a failed one.
"""

from __future__ import annotations

import os
import time

from xapi_storage_tasks import settings

TYPE_CHECKING = False
if TYPE_CHECKING:  # the store imports this module
    from xapi_storage_tasks.tasks.record import Task
    from xapi_storage_tasks.tasks.store import Store

IDENT = "xapi-storage-tasks"


def _emit(store: Store, filename: str, line: str) -> None:
    try:
        if settings.use_syslog():
            import syslog

            syslog.openlog(IDENT, syslog.LOG_PID, syslog.LOG_DAEMON)
            syslog.syslog(syslog.LOG_INFO, line)
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        data = ("%s %s[%d]: %s\n" % (stamp, IDENT, os.getpid(), line)).encode("utf-8", "replace")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(filename, flags, 0o600, dir_fd=store.dir_fd("logs"))
        try:
            os.write(fd, data)  # one O_APPEND write: lines from processes never interleave
        finally:
            os.close(fd)
    except Exception:
        pass


def task_event(store: Store, task: Task, message: str) -> None:
    """Log ``message`` for ``task`` with its id and debug context."""
    _emit(store, task.id + ".log", "task=%s dbg=%s %s" % (task.id, task.debug_info, message))


def store_event(store: Store, message: str) -> None:
    """Log something about the store as a whole (e.g. a corrupt file)."""
    _emit(store, "store.log", message)
