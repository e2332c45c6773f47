"""Where a copy writes: the four target kinds behind one interface.

=========  ==================================================================
``new``    a local path that does not exist yet. Written as a hidden
           temporary sibling (mode 0600: the worker's umask is 077), which
           is fsynced and renamed into place at the very end. The task
           records the temporary's identity as it creates it (and carries
           it to the final name just before the rename), so a failed,
           cancelled or lost copy leaves neither behind, and never removes
           a file someone else put at either name.
``file``   an existing regular file, written in place. A full copy sets its
           size to the source's first; a blocklist copy only ever grows it
           (to the end of the last range).
``block``  a block device, written in place; it must be large enough.
``nbd``    an NBD export, written in place; it must be large enough and
           writable.
=========  ==================================================================

Every target is used as: :func:`open_target`, then any number of
:meth:`write` (copy source bytes to the same offset) and :meth:`zero`
calls, then :meth:`finish` (durable; for ``new``, renamed into place) or
:meth:`abort` (closes, never raises an ordinary exception). ``zero_from``
is the offset from which the target is already known to read as zeros
(None: nowhere), so the caller can skip zeroing there.

Local I/O takes the fastest route the kernel allows: ``copy_file_range``
(in-kernel, reflinks where the filesystem can), else ``sendfile``, else
``pread``/``pwrite`` through one reused 1 MiB buffer. Holes are punched
with ``fallocate(PUNCH_HOLE)`` in files and ``BLKZEROOUT`` on block
devices, else written as zeros from one shared buffer. Writeback of each
chunk is started as soon as it is written (``sync_file_range``), so the
final fsync is short. OS errors become :class:`OperationFailed` with the
path, offset and reason.
"""

import ctypes
import errno
import fcntl
import os
import stat
import struct

from xapi_storage_tasks.nbd import protocol as nbd
from xapi_storage_tasks.wire.errors import NbdError, OperationFailed

BUF_SIZE = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
BLKZEROOUT = 0x127F         # _IO(0x12, 127)
SYNC_FILE_RANGE_WRITE = 2   # start writeback, don't wait
RENAME_NOREPLACE = 1
AT_FDCWD = -100
SECTOR = 512                # BLKZEROOUT wants 512-byte aligned ranges
# errnos meaning "this call does not work on this file": use the next route
UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOTTY)

_ZEROES = memoryview(bytes(BUF_SIZE))
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _failed(what, path, offset, err):
    return OperationFailed("%s %s at offset %d failed: %s" % (what, path, offset, err.strerror or err))


def _source_ended(offset):
    return OperationFailed("the source ended at offset %d: it shrank during the copy" % offset)


def punch_hole(fd, offset, length):
    """Deallocate ``[offset, offset+length)`` keeping the size; OSError
    (ENOSYS without a libc wrapper) if it cannot be done."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    while _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        if e != errno.EINTR:  # ctypes calls get no PEP 475 retry: do it here
            raise OSError(e, os.strerror(e))


def start_writeback(fd, offset, length):
    """Ask the kernel to start writing a range out now, without waiting.
    The final fsync then finds little left to do, disk writes overlap the
    copy, and dirty memory stays small. Only a hint: errors are ignored."""
    if _sync_file_range is not None and length > 0:  # 0 would mean "to the end"
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def rename_noreplace(src, dst):
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), so
    a file someone else created meanwhile is never clobbered. Filesystems
    without RENAME_NOREPLACE get a check then a plain rename."""
    if _renameat2 is not None:
        if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in UNSUPPORTED:
            raise OSError(e, os.strerror(e), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


class Local:
    """A local file or block device, written in place through ``fd``."""

    zero_from = None

    def __init__(self, path, fd, label=None):
        self.path, self.fd = path, fd
        self.label = label or path  # the name errors give (not a temporary's)
        self._route = "copy_file_range"
        self._buf = None
        self._fast = True  # until the fast way of zeroing proves unsupported

    def write(self, src, offset, length):
        """Copy ``length`` source bytes at ``offset`` to the same offset."""
        start, end = offset, offset + length
        while offset < end:
            try:
                n = self._copy(src, offset, end - offset)
            except OSError as e:
                if e.errno in UNSUPPORTED and self._route != "readwrite":
                    # Nothing was copied by the failed call: retry another way.
                    self._route = "sendfile" if self._route == "copy_file_range" else "readwrite"
                    continue
                raise _failed("copying to", self.label, offset, e) from None
            if n == 0:
                raise _source_ended(offset)
            offset += n
        start_writeback(self.fd, start, length)

    def _copy(self, src, offset, n):
        if self._route == "copy_file_range":
            return os.copy_file_range(src, self.fd, n, offset, offset)
        if self._route == "sendfile":
            os.lseek(self.fd, offset, os.SEEK_SET)  # sendfile writes at the fd's position
            return os.sendfile(self.fd, src, offset, n)
        if self._buf is None:
            self._buf = memoryview(bytearray(BUF_SIZE))
        got = os.preadv(src, [self._buf[:min(n, BUF_SIZE)]], offset)
        self._pwrite_all(self._buf[:got], offset)
        return got

    def _pwrite_all(self, view, offset):
        while len(view):
            k = os.pwrite(self.fd, view, offset)
            view, offset = view[k:], offset + k

    def zero(self, offset, length):
        """Make ``[offset, offset+length)`` read as zeros (a hole if possible)."""
        try:
            if not self._fast or not self._fast_zero(offset, length):
                self._write_zeroes(offset, length)
        except OSError as e:
            raise _failed("zeroing", self.label, offset, e) from None

    def _fast_zero(self, offset, length):
        try:
            punch_hole(self.fd, offset, length)
            return True
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self._fast = False  # remember: don't ask again for every hole
            return False

    def _write_zeroes(self, offset, length):
        start, end = offset, offset + length
        while offset < end:
            n = min(BUF_SIZE, end - offset)
            self._pwrite_all(_ZEROES[:n], offset)
            offset += n
        start_writeback(self.fd, start, length)

    def finish(self, ctx):
        """fsync (for a block device this also flushes its write cache)."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise OperationFailed("flushing %s failed: %s" % (self.label, e.strerror)) from None
        self._close()

    def _close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def abort(self):
        """Close without finishing: the target keeps what was written."""
        self._close()


class BlockDevice(Local):
    """A block device: holes are zeroed with BLKZEROOUT where aligned."""

    def _fast_zero(self, offset, length):
        start = -(-offset // SECTOR) * SECTOR
        stop = (offset + length) // SECTOR * SECTOR
        if stop <= start:
            return False
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", start, stop - start))
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self._fast = False
            return False
        self._write_zeroes(offset, start - offset)
        self._write_zeroes(stop, offset + length - stop)
        return True


class NewFile(Local):
    """A file that does not exist yet: a temporary sibling until finished."""

    zero_from = 0  # created empty and extended: all zeros, all holes

    def __init__(self, ctx, path, size):
        directory, name = os.path.split(path)
        # Hidden, unique, and within NAME_MAX however long the final name is.
        tmp = os.path.join(directory, ".%s.%s.part" % (name[:200], os.urandom(6).hex()))
        if os.path.lexists(path):
            raise OperationFailed("target %s appeared after the copy was planned; left alone" % path)
        self.ctx, self.final, self.renamed = ctx, path, False
        try:
            fd = ctx.create_artifact(tmp, 0o600)
        except OSError as e:
            raise OperationFailed("cannot create a file next to %s: %s" % (path, e.strerror)) from None
        super().__init__(tmp, fd, label=path)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            self.abort()
            raise OperationFailed("cannot size %s to %d bytes: %s" % (path, size, e.strerror)) from None

    def finish(self, ctx):
        """fsync, rename into place, fsync the directory; then ``tmp`` is no
        longer an artifact while the final name stays one until the worker
        records Completed (so a crash before that still removes it)."""
        with ctx.critical():
            try:
                os.fsync(self.fd)
                self._close()
                ctx.moving_artifact(self.path, self.final)
                rename_noreplace(self.path, self.final)
            except FileExistsError:
                ctx.forget_artifact(self.final)  # someone else's file: keep it
                raise OperationFailed("target %s appeared during the copy; left alone" % self.final) from None
            except OSError as e:
                raise OperationFailed("finishing %s failed: %s" % (self.final, e.strerror)) from None
            self.renamed = True
            _fsync_dir(os.path.dirname(self.final))
            ctx.forget_artifact(self.path)

    def abort(self):
        """Close; remove the temporary (the worker would too, but a worker
        whose task vanished does not), and never let the worker remove a
        final name that some other process created meanwhile."""
        self._close()
        if self.renamed:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        if os.path.lexists(self.final):
            try:
                self.ctx.forget_artifact(self.final)
            except Exception:
                pass  # the task store failed too; nothing better to do here


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OperationFailed("syncing directory %s failed: %s" % (path, e.strerror)) from None


class Nbd:
    """An NBD export; every failure is an :class:`NbdError`."""

    zero_from = None  # an export's contents are unknown

    def __init__(self, uri, needed):
        self.client = nbd.Client.connect(nbd.parse_uri(uri))
        export = self.client.address.export
        if self.client.read_only:
            self.abort()
            raise NbdError("export '%s' on %s is read-only: cannot copy onto it" % (export, self.client.address))
        if self.client.size < needed:
            self.abort()
            raise NbdError("export '%s' is %d bytes, the copy needs %d" % (export, self.client.size, needed))

    def write(self, src, offset, length):
        """Send source bytes with sendfile; a source that shrank is its own
        error, not the server's."""
        st = os.fstat(src)
        if stat.S_ISREG(st.st_mode) and st.st_size < offset + length:
            raise _source_ended(st.st_size)
        self.client.pwrite_from_fd(src, offset, length, offset)

    def zero(self, offset, length):
        """NBD_CMD_WRITE_ZEROES (trimming allowed), or written zeros."""
        self.client.write_zeroes(offset, length)

    def finish(self, ctx):
        """Wait for every reply, NBD_CMD_FLUSH, disconnect."""
        if not self.client.can_flush:  # say so: Completed then promises less
            ctx.log("the NBD server offers no flush: the data was written but may not be durable yet")
        self.client.flush()
        self.client.close()

    def abort(self):
        """Disconnect without waiting for replies."""
        try:
            self.client.close(drain=False)
        except NbdError:
            pass


def open_target(ctx, spec, needed, exact):
    """Open the plan's target ``spec`` for a copy writing up to byte
    ``needed``. ``exact``: a full copy, so an existing file gets exactly
    that size (a blocklist copy only grows it)."""
    kind = spec["kind"]
    if kind == "nbd":
        return Nbd(spec["uri"], needed)
    path = spec["path"]
    if kind == "new":
        return NewFile(ctx, path, needed)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OperationFailed("cannot open target %s: %s" % (path, e.strerror)) from None
    try:
        mode = os.fstat(fd).st_mode
        if kind == "file" and stat.S_ISREG(mode):
            return _existing_file(path, fd, needed, exact)
        if kind == "block" and stat.S_ISBLK(mode):
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < needed:
                raise OperationFailed("target %s is %d bytes, the copy needs %d" % (path, size, needed))
            return BlockDevice(path, fd)
        raise OperationFailed("target %s is no longer a %s" % (path, "regular file" if kind == "file" else "block device"))
    except BaseException:
        os.close(fd)
        raise


def _existing_file(path, fd, needed, exact):
    target = Local(path, fd)
    old = os.fstat(fd).st_size
    if old != needed and (exact or old < needed):
        try:
            os.ftruncate(fd, needed)
        except OSError as e:
            raise OperationFailed("cannot resize %s to %d bytes: %s" % (path, needed, e.strerror)) from None
    if old < needed:
        target.zero_from = old  # the extension reads as zeros already
    return target
