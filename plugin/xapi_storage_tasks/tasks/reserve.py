"""Room for a worker's last words: space set aside in the state directory.

A worker that finds the state directory full must still record how its
task ended. At start it allocates a nameless file (``O_TMPFILE`` in
``tmp/``, or one unlinked at once where that is not supported) of a few
times its task file's size; when a write of its task fails, it frees that
space and tries again. The file has no name, so nothing is left behind
whatever instant the worker dies at: the kernel frees it with the process.
"""

import os

from xapi_storage_tasks.tasks.store import Store

MIN_SIZE = 16 << 10


class Reserve:
    """Space held for a worker's final task writes."""

    def __init__(self, store: Store, task_file_size: int) -> None:
        self.fd = -1
        size = max(MIN_SIZE, 4 * task_file_size)
        tmp = store.dir_fd("tmp")
        try:
            try:
                fd = os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=tmp)
            except OSError:  # no O_TMPFILE here: a name that lives for an instant
                name = ".reserve.%s" % os.urandom(6).hex()
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=tmp)
                os.unlink(name, dir_fd=tmp)
        except OSError:
            return  # no room even for this: the worker runs without a reserve
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            return
        self.fd = fd

    def release(self) -> bool:
        """Give the space back to the file system; False if there was none
        to give."""
        if self.fd < 0:
            return False
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
            self.fd = -1
        return True
