"""The one way a small JSON file is read, written and cleaned up after.

Reading is bounded: the file is opened relative to its directory with
``O_NOFOLLOW``, must be a regular file of at most ``limit`` bytes, and is
parsed strictly (:mod:`xapi_storage_tasks.wire.jsontext`). Whatever is
wrong raises :class:`Unreadable`; each caller turns it into its own error.

Writing replaces the file atomically and durably: the new content is
written to a file with no name (``O_TMPFILE``) and fsynced, linked under a
temporary name and renamed over the old file, and the directory is
fsynced. A reader sees the old file or the new one, whole, whatever
instant the writer dies at. A writer killed between the link and the
rename (or, where the file system has no ``O_TMPFILE``, while it writes)
leaves a temporary ``<name>.tmp-<hex>``: :func:`sweep` removes those of
ours once they are old.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from xapi_storage_tasks.files.dirs import O_NEW, unlink
from xapi_storage_tasks.wire import jsontext

TEMP = ".tmp-"
"""What names a temporary: ``<name>.tmp-<8 hex digits>``."""
TEMP_AGE = 60.0
"""Seconds after which a temporary is a dead writer's: a live writer's
lives for one write."""

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
"""What ``open(O_TMPFILE)`` fails with where the kernel or file system
lacks it (any other error is the write's)."""
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class Unreadable(ValueError):
    """The file is not one bounded, strict JSON value."""


def read_json(name: str, dir_fd: int, limit: int) -> object:
    """The JSON value in file ``name`` of ``dir_fd``. Raises
    FileNotFoundError if there is none, :class:`Unreadable` otherwise."""
    try:
        fd = os.open(name, _O_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise Unreadable("cannot open it: %s" % (e.strerror or e)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable("not a regular file")
        data = os.read(fd, limit + 1)
    except OSError as e:
        raise Unreadable("cannot read it: %s" % (e.strerror or e)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Unreadable("larger than %d bytes" % limit)
    try:
        return jsontext.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors
        raise Unreadable(str(e) or type(e).__name__) from None


def write_json(value: object, name: str, dir_fd: int, tmp_fd: int, durable: bool = True) -> None:
    """Replace file ``name`` of ``dir_fd`` atomically and durably with the
    compact JSON of ``value``; the temporary name is made in ``tmp_fd`` (the
    same file system). ``durable=False`` skips both fsyncs, for a file whose
    loss in a crash costs nothing (the replacement stays atomic). Raises
    OSError, leaving at most a temporary only a kill can leave."""
    data = jsontext.dumps(value, compact=True).encode()
    tmp = "%s%s%s" % (name, TEMP, os.urandom(4).hex())
    try:
        fd, named = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=tmp_fd), False
    except OSError as e:
        if e.errno not in _NO_TMPFILE:
            raise
        fd, named = os.open(tmp, O_NEW, 0o600, dir_fd=tmp_fd), True  # a name from the start
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
            if not named:  # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N
                os.link("/proc/self/fd/%d" % fd, tmp, dst_dir_fd=tmp_fd, follow_symlinks=True)
                named = True
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=tmp_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if named:
            unlink(tmp, tmp_fd)
        raise
    if durable:
        os.fsync(dir_fd)


def is_temporary(name: str) -> bool:
    """True for a name :func:`write_json` gives its temporaries."""
    head, sep, tail = name.rpartition(TEMP)
    return bool(head and sep) and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail)


def sweep(dir_fd: int, age: float = TEMP_AGE) -> None:
    """Remove the temporaries in ``dir_fd`` older than ``age`` seconds
    (only names :func:`write_json` gives): what writers killed midway
    left."""
    now = time.time()
    for name in os.listdir(dir_fd):
        if is_temporary(name):
            try:
                if now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime >= age:
                    unlink(name, dir_fd)
            except OSError:
                pass
