"""Sparse-extent discovery: which parts of a file hold data, which are holes.

:func:`segments` walks a byte range with ``lseek(SEEK_DATA/SEEK_HOLE)`` and
yields it as consecutive data and hole segments, lazily, so memory stays
constant however fragmented the file is. Holes are never read.

Where the calls are unsupported (``EINVAL``: block devices, old kernels,
some network filesystems) the whole range counts as data, which is always
correct, only not sparse. ``ENXIO`` from ``SEEK_DATA`` below the end of the
file is Linux's documented answer for "no data from here to the end", so it
ends the walk with a hole, as coreutils' ``cp`` does; filesystems without
native support never return it (the kernel's generic code reports all data).
"""

import errno
import os
from typing import Iterator, Optional, Tuple

# errnos meaning "this file or filesystem cannot answer SEEK_DATA/SEEK_HOLE"
UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


def _seek(fd: int, offset: int, whence: int) -> Optional[int]:
    """``lseek`` that returns None for ENXIO ("nothing of that kind after
    ``offset``") and raises for anything else."""
    try:
        return os.lseek(fd, offset, whence)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


def segments(fd: int, start: int, end: int) -> Iterator[Tuple[int, int, bool]]:
    """Yield ``(offset, length, is_data)`` covering ``[start, end)`` of ``fd``
    in order, adjacent and non-empty.

    A file that changes meanwhile gives a consistent walk of some mix of old
    and new layouts; the caller notices a shrunken source when reading.
    """
    pos = start
    while pos < end:
        try:
            data = _seek(fd, pos, os.SEEK_DATA)
            hole = None if data is None else _seek(fd, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            yield pos, end - pos, True  # cannot tell: everything is data
            return
        if data is None or data >= end:
            yield pos, end - pos, False
            return
        if data > pos:
            yield pos, data - pos, False
        # SEEK_HOLE always finds one at EOF; None only if the file shrank.
        stop = end if hole is None else min(hole, end)
        if stop <= data:  # shrank between the two calls: let the read tell
            stop = end
        yield data, stop - data, True
        pos = stop

