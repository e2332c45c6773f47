"""The copy engine behind ``Data.copy``: a local raw volume onto a local
file, a block device or an NBD export, run as a task.

The Data API does exactly::

    args = copy.plan(uri, remote, blocklist)   # in the caller: InvalidArguments, no task
    task_id = worker.start(dbg, copy.run, args, kind="CopyV1")

:func:`plan` checks everything that can be checked without the target
server and returns the JSON-able keyword arguments of :func:`run`, which
does the copy in the worker (see :mod:`xapi_storage_tasks.tasks.worker`).

Sources are a regular file or a block device, named by an absolute path or
by a ``file://``, ``raw+file://``, ``loop+blkback://`` or ``raw+block://``
URI (the spellings SMAPIv3 volume plugins hand out; percent-encoded, and a
doubled leading slash, as ``"raw+file:///" + path`` produces, is fine).
Local targets take the same forms; remote targets are NBD URIs
(:func:`xapi_storage_tasks.nbd.uri.parse_uri`). Target kinds are listed in
:mod:`xapi_storage_tasks.data.targets`. Symbolic links are resolved when
the call is made and regular files on pseudo-filesystems (``/proc``,
``/sys``, ...) are refused, as source or target
(:mod:`xapi_storage_tasks.data.paths`). Data lands at the same offsets as
in the source.

Without a blocklist the whole source is copied; with one, exactly the
listed blocks (a last block that the source only partly covers is copied up
to the source's end; a block wholly past the end is an error), and nothing
else on the target changes. Holes in the source are never read: on the
target they become holes (punched, BLKZEROOUT, NBD write-zeroes), except
where the target is known to be zero already (a new file, or the part of
an existing file that the copy has just extended).

If the copy fails or is cancelled: a new file target is removed (it never
appears, and neither does its temporary). Existing files, block devices
and NBD exports cannot be rolled back: they then hold the ranges copied so
far, in offset order, and the rest as before (an existing file given a full
copy has already been resized to the source's size).
"""

import json
import os
import stat
import time
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence, Tuple

from xapi_storage_tasks import settings
from xapi_storage_tasks.data import extents, paths, targets
from xapi_storage_tasks.data.target import Source, Spec, Target
from xapi_storage_tasks.nbd.uri import is_nbd_uri
from xapi_storage_tasks.wire.errors import InvalidArguments, OperationFailed

if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.worker import Context

Blocklist = List[Any]
"""A checked blocklist: ``[blocksize, [[start, length], ...]]`` in blocks."""

CHUNK = 8 << 20          # bytes per copy call: progress and cancel granularity
ZERO_CHUNK = 128 << 20   # bytes per zeroing call
PLAN_HEADROOM = 64 << 10  # task file bytes besides the plan (ids, paths, dbg)


# ---- plan: in the caller, before any task exists ---------------------------


def _open_error(what: str, path: str, e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "%s %s does not exist" % (what, path)
    if isinstance(e, PermissionError):
        return "%s %s is not readable: %s" % (what, path, e.strerror)
    return "cannot open %s %s: %s" % (what, path, e.strerror)


def _check_source(st: os.stat_result, path: str, error: type) -> None:
    """A source is a regular file off pseudo-filesystems, or a block device."""
    if stat.S_ISREG(st.st_mode):
        fstype = paths.pseudo_filesystem(st)
        if fstype is not None:
            raise error("source %s is on a %s pseudo-filesystem, not storage" % (path, fstype))
    elif not stat.S_ISBLK(st.st_mode):
        raise error("source %s is neither a regular file nor a block device" % path)


def _examine_source(value: object) -> Source:
    """The source named by ``value``: links resolved, readable, a regular
    file or a block device, with its size."""
    named = paths.local_path(value, "source")
    path = paths.resolve(named, "source")
    try:
        # O_NONBLOCK: a FIFO swapped in after any check must not hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArguments(_open_error("source", named, e)) from None
    try:
        st = os.fstat(fd)
        _check_source(st, named, InvalidArguments)
        return Source(path, st, os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size)
    finally:
        os.close(fd)


def check_blocklist(blocklist: Optional[Tuple[int, Sequence[Sequence[int]]]], size: int) -> Optional[Blocklist]:
    """Check a blocklist decoded by :func:`xapi_storage_tasks.wire.codec.decode_blocklist`
    (positive, sorted, non-overlapping ranges in blocks) against a source of
    ``size`` bytes; return ``[blocksize, ranges]`` with adjacent ranges
    merged, or None (copy everything)."""
    if blocklist is None:
        return None
    blocksize, ranges = blocklist
    blocks = -(-size // blocksize)  # the last block may be partial
    out: List[List[int]] = []
    for start, length in ranges:
        if start + length > blocks:
            raise InvalidArguments(
                "blocklist range [%d, %d] is out of range: blocks %d..%d of %d bytes, "
                "but the source is %d bytes (%d blocks)" % (
                    start, length, start, start + length - 1, blocksize, size, blocks))
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length  # fewer, larger ranges: fewer seeks, smaller task file
        else:
            out.append([start, length])
    return [blocksize, out]


def byte_ranges(blocklist: Optional[Blocklist], size: int) -> Iterator[Tuple[int, int]]:
    """Yield the ``(offset, length)`` byte ranges to copy: the whole source
    for None, else the checked blocklist's ranges clipped to ``size``."""
    if blocklist is None:
        if size:
            yield 0, size
        return
    blocksize, ranges = blocklist
    for start, n in ranges:
        yield start * blocksize, min((start + n) * blocksize, size) - start * blocksize


def needed_bytes(blocklist: Optional[Blocklist], size: int) -> int:
    """How large the target must be: the source, or up to the end of the
    last listed block (clipped to the source)."""
    if blocklist is None:
        return size
    if not blocklist[1]:
        return 0
    start, n = blocklist[1][-1]
    return int(min((start + n) * blocklist[0], size))


def plan(uri: object, remote: object, blocklist: Optional[Tuple[int, Sequence[Sequence[int]]]]) -> dict:
    """Validate a copy of ``uri`` onto ``remote`` and return the keyword
    arguments of :func:`run` (JSON-able). ``blocklist`` is None (everything)
    or ``(blocksize, [(start, length), ...])`` in blocks, sorted and
    non-overlapping. Raises InvalidArguments; never connects to a server."""
    if is_nbd_uri(uri):
        raise InvalidArguments("source %r: NBD sources are not supported" % uri)
    source = _examine_source(uri)
    checked = check_blocklist(blocklist, source.size)
    target = targets.plan(remote, source, needed_bytes(checked, source.size))
    args = {"source": source.path, "source_size": source.size, "blocklist": checked, "target": target}
    # The args live in the task file, which the store refuses to read back
    # past its size limit: say so now rather than leave a corrupt task.
    if len(json.dumps(args, separators=(",", ":"))) > settings.MAX_TASK_FILE - PLAN_HEADROOM:
        raise InvalidArguments("blocklist too large: %d ranges would not fit in a task record" % (
            len(checked[1]) if checked else 0))
    return args


# ---- run: in the worker ----------------------------------------------------


def _open_source(path: str, size: int) -> int:
    try:
        # O_NOFOLLOW: the plan resolved every link; one swapped in since is refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise OperationFailed("source %s no longer exists" % path) from None
        raise OperationFailed(_open_error("source", path, e)) from None
    try:
        st = os.fstat(fd)
        _check_source(st, path, OperationFailed)
        now = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        if now != size:
            raise OperationFailed("source %s changed size since the copy was planned: %d, now %d bytes" % (path, size, now))
        os.set_blocking(fd, True)  # O_NONBLOCK was only for the open
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        except OSError:
            pass  # only a hint
    except BaseException:
        os.close(fd)
        raise
    return fd


def _to_zero(offset: int, length: int, zero_from: Optional[int]) -> int:
    """How much of a hole at ``offset`` must be zeroed on the target."""
    if zero_from is None:
        return length
    return max(0, min(offset + length, zero_from) - offset)


def _work(fd: int, blocklist: Optional[Blocklist], size: int, zero_from: Optional[int]) -> Iterator[Tuple[int, int, bool]]:
    """The copy's steps, lazily: ``(offset, length, is_data)`` where every
    hole is one that must be zeroed."""
    for start, length in byte_ranges(blocklist, size):
        for offset, n, is_data in extents.segments(fd, start, start + length):
            if not is_data:
                n = _to_zero(offset, n, zero_from)
            if n:
                yield offset, n, is_data


def run(ctx: "Context", source: str, source_size: int, blocklist: Optional[Blocklist], target: Spec) -> None:
    """Copy as planned by :func:`plan` (these are its keys), reporting
    progress to ``ctx`` by bytes handled (data copied plus holes zeroed).
    Returns None; raises OperationFailed / NbdError on failure."""
    began = time.monotonic()
    fd = _open_source(source, source_size)
    try:
        needed = needed_bytes(blocklist, source_size)
        dest: Target = targets.open_target(ctx, target, needed, exact=blocklist is None)
        try:
            total = sum(n for _, n, _ in _work(fd, blocklist, source_size, dest.zero_from))
            ctx.log("copy %s (%d bytes, %s) to %s: %d bytes to copy or zero" % (
                source, source_size, "whole" if blocklist is None else "%d range(s)" % len(blocklist[1]),
                Target.describe(target), total))
            done = copied = 0
            for offset, length, is_data in _work(fd, blocklist, source_size, dest.zero_from):
                step = CHUNK if is_data else ZERO_CHUNK
                for pos in range(offset, offset + length, step):
                    n = min(step, offset + length - pos)
                    if is_data:
                        dest.write(fd, pos, n)
                        copied += n
                    else:
                        dest.zero(pos, n)
                    done += n
                    ctx.progress(done / max(total, done))  # the source may have changed since counting
            dest.finish(ctx)
        except BaseException:
            with ctx.critical():  # a cancel must not cut the undo short
                dest.abort()
            raise
    finally:
        os.close(fd)
    ctx.progress(1.0, force=True)
    seconds = time.monotonic() - began
    ctx.log("copy done: %d bytes copied, %d zeroed, in %.2fs (%.0f MiB/s of data)" % (
        copied, done - copied, seconds, copied / (1 << 20) / max(seconds, 1e-6)))
