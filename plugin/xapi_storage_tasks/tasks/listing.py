"""The listing cache of ``tasks/``: ``Task.ls`` of a large store (kept
for ever, ``TASK_RETENTION=0``) without listing and sorting the directory
at every call.

A directory's entries change together with its change time, which only
the kernel sets (to the current time, at each entry added, removed or
renamed in or out), atomically with the change, also across a crash of
the writer. So a listing of ``tasks/`` stamped with the directory's
identity and times, read (fstat) before the listing, is the directory's
exact list as long as those are unchanged, with two provisos. Times are
coarse (a clock tick): a change just after the stat can keep the same
stamp, so a listing is only cached when the stamp is :data:`SETTLED`
older than the clock read before the stat (any later change gets a later
stamp). And a crash of the host can lose directory changes the cache saw
(a destroy need not be durable): the stamp includes the boot id, so a
cache of an earlier boot is never used. The cache (``ids.list`` in the
state directory) is plain text, written atomically and not fsynced (it
is only a cache: lost or damaged, it is made again)::

    xapi-storage-tasks ids 1
    <boot id> <dev> <ino> <mtime ns> <ctime ns> <count>
    <id>
    ...
"""

from __future__ import annotations

import os
import time

from xapi_storage_tasks.files.dirs import unlink

CACHE = "ids.list"
HEADER = "xapi-storage-tasks ids 1"
SETTLED = 2_000_000_000
"""ns: ``tasks/`` is listed into the cache only once unchanged this long."""

def ids(root: int, tasks: int, tmp: int) -> list[str]:
    """Every task id in the directory ``tasks`` (of the state directory
    ``root``), sorted; ``tmp`` holds the cache's temporary."""
    now = time.time_ns()  # before the stat: see the module docstring
    key = _key(os.fstat(tasks))
    cached = _cached(root, key)
    if cached is not None:
        return cached
    names = os.listdir(tasks)  # only <id>.json lives here
    names.sort()
    got = [n[:-5] for n in names]
    if now - key[1] > SETTLED:
        _cache(root, tmp, key, got)
    return got


def _key(st: os.stat_result) -> tuple[int, int, int, int, str]:
    from xapi_storage_tasks.process import identity

    return (st.st_mtime_ns, max(st.st_mtime_ns, st.st_ctime_ns), st.st_dev, st.st_ino, identity.boot_id())


def _stamp(key: tuple[int, int, int, int, str], count: int) -> str:
    mtime, changed, dev, ino, boot = key
    return "%s\n%s %d %d %d %d %d\n" % (HEADER, boot, dev, ino, mtime, changed, count)


def _cached(root: int, key: tuple[int, int, int, int, str]) -> list[str] | None:
    """The cached listing if it is ``tasks/``'s for ``key``, else None."""
    try:
        fd = os.open(CACHE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        while len(data) <= size:  # a short read: the rest
            more = os.read(fd, size + 1 - len(data))
            if not more:
                break
            data += more
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    first = text.find("\n", len(HEADER) + 1)
    head = text[: first + 1]
    if first < 0 or not text.endswith("\n") or not head.startswith(HEADER + "\n"):
        return None
    try:
        count = int(head.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return None
    if head != _stamp(key, count):
        return None
    got = text[first + 1 : -1].split("\n") if count else []
    return got if len(got) == count else None


def _cache(root: int, tmp: int, key: tuple[int, int, int, int, str], got: list[str]) -> None:
    """Replace the listing cache; best effort (a cache)."""
    name = "%s.%d" % (CACHE, os.getpid())
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=tmp)
        try:
            data = (_stamp(key, len(got)) + "".join([i + "\n" for i in got])).encode("ascii")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(name, CACHE, src_dir_fd=tmp, dst_dir_fd=root)
    except (OSError, UnicodeEncodeError):
        unlink(name, tmp)
