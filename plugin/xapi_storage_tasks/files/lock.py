"""The one bounded wait for a lock file (flock).

Every lock of the plugin (a task's, a volume's) is a file flocked whole:
the kernel drops the lock when its holder dies. A holder that retires a
lock file removes it while holding it, so a waiter that then gets the
lock checks the file still has a name (``st_nlink``) and otherwise opens
the new one. The wait has one deadline, and backs off exponentially up
to a cap between attempts.
"""

from __future__ import annotations

import fcntl
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Callable


class Held:
    """``with Held(open_file, wait, busy) as fd:`` holds the lock file that
    ``open_file()`` opens, waited for at most ``wait`` seconds; after that
    the exception ``busy()`` returns is raised. (A class, not contextlib:
    task calls import this module.)"""

    __slots__ = ("open_file", "wait", "busy", "cap", "fd")

    def __init__(self, open_file: Callable[[], int], wait: float, busy: Callable[[], BaseException],
                 cap: float = 0.005) -> None:
        self.open_file, self.wait, self.busy, self.cap, self.fd = open_file, wait, busy, cap, -1

    def __enter__(self) -> int:
        deadline = time.monotonic() + self.wait
        delay = 0.001
        while True:
            fd = self.open_file()
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self.busy() from None
                        time.sleep(min(delay, left))
                        delay = min(delay * 2, self.cap)
                named = os.fstat(fd).st_nlink > 0
            except BaseException:
                os.close(fd)
                raise
            if named:
                self.fd = fd
                return fd
            os.close(fd)  # removed by the holder we waited for: take the new one

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
