"""The local target kinds: a new file, an existing file, a block device.

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
=========  ==================================================================

Local I/O takes the fastest route the kernel allows: ``copy_file_range``
(in-kernel, reflinks where the filesystem can), else ``sendfile``, else
``pread``/``pwrite`` through one reused 1 MiB buffer. Holes are punched
with ``fallocate(PUNCH_HOLE)`` in files and ``BLKZEROOUT`` on block
devices, else written as zeros from one shared buffer. Writeback of each
chunk is started as soon as it is written (``sync_file_range``), so the
final fsync is short. OS errors become :class:`OperationFailed` with the
path, offset and reason.

The plan half imports nothing heavy: libc (ctypes) is loaded by the
worker on first use.
"""

import errno
import os
import stat
import struct
from typing import TYPE_CHECKING, Optional

from xapi_storage_tasks.data import paths
from xapi_storage_tasks.data.target import Remote, Source, Spec, Target, source_ended
from xapi_storage_tasks.wire.errors import InvalidArguments, OperationFailed

if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.worker import Context

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


class _Libc:
    """The few libc calls Python does not wrap, loaded once by the worker."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
        if self.fallocate is not None:
            self.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        self.sync_file_range = getattr(libc, "sync_file_range", None)
        if self.sync_file_range is not None:
            self.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        self.renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
        if self.renameat2 is not None:
            self.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

    def errno(self) -> int:
        """The errno of the last failed call."""
        return int(self.ctypes.get_errno())


_LIBC: Optional[_Libc] = None


def libc() -> _Libc:
    """The loaded libc calls (loaded on first use)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


def _failed(what: str, path: str, offset: int, err: OSError) -> OperationFailed:
    return OperationFailed("%s %s at offset %d failed: %s" % (what, path, offset, err.strerror or err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` keeping the size; OSError
    (ENOSYS without a libc wrapper) if it cannot be done."""
    lib = libc()
    if lib.fallocate is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    while lib.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = lib.errno()
        if e != errno.EINTR:  # ctypes calls get no PEP 475 retry: do it here
            raise OSError(e, os.strerror(e))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range out now, without waiting.
    The final fsync then finds little left to do, disk writes overlap the
    copy, and dirty memory stays small. Only a hint: errors are ignored."""
    lib = libc()
    if lib.sync_file_range is not None and length > 0:  # 0 would mean "to the end"
        lib.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), so
    a file someone else created meanwhile is never clobbered. Filesystems
    without RENAME_NOREPLACE get a check then a plain rename."""
    lib = libc()
    if lib.renameat2 is not None:
        if lib.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        e = lib.errno()
        if e not in UNSUPPORTED:
            raise OSError(e, os.strerror(e), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OperationFailed("syncing directory %s failed: %s" % (path, e.strerror)) from None


def _open_existing(path: str) -> int:
    """Open a planned existing target for writing, never through a link
    swapped in since the plan resolved them all."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise OperationFailed("cannot open target %s: %s" % (path, e.strerror)) from None


class Local(Target):
    """The worker half shared by local targets: a file or block device,
    written in place through ``fd``."""

    def __init__(self, path: str, fd: int, label: Optional[str] = None) -> None:
        self.path: str = path
        self.fd: Optional[int] = fd
        self.label = label or path  # the name errors give (not a temporary's)
        self._route = "copy_file_range"
        self._buf: Optional[memoryview] = None
        self._fast = True  # until the fast way of zeroing proves unsupported

    def _fd(self) -> int:
        if self.fd is None:
            raise OperationFailed("target %s is closed" % self.label)
        return self.fd

    def write(self, src: int, offset: int, length: int) -> None:
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
                raise source_ended(offset)
            offset += n
        start_writeback(self._fd(), start, length)

    def _copy(self, src: int, offset: int, n: int) -> int:
        fd = self._fd()
        if self._route == "copy_file_range":
            return os.copy_file_range(src, fd, n, offset, offset)
        if self._route == "sendfile":
            os.lseek(fd, offset, os.SEEK_SET)  # sendfile writes at the fd's position
            return os.sendfile(fd, src, offset, n)
        if self._buf is None:
            self._buf = memoryview(bytearray(BUF_SIZE))
        got = os.preadv(src, [self._buf[:min(n, BUF_SIZE)]], offset)
        self._pwrite_all(self._buf[:got], offset)
        return got

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        fd = self._fd()
        while len(view):
            k = os.pwrite(fd, view, offset)
            view, offset = view[k:], offset + k

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros (a hole if possible)."""
        try:
            if not self._fast or not self._fast_zero(offset, length):
                self._write_zeroes(offset, length)
        except OSError as e:
            raise _failed("zeroing", self.label, offset, e) from None

    def _fast_zero(self, offset: int, length: int) -> bool:
        try:
            punch_hole(self._fd(), offset, length)
            return True
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self._fast = False  # remember: don't ask again for every hole
            return False

    def _write_zeroes(self, offset: int, length: int) -> None:
        start, end = offset, offset + length
        while offset < end:
            n = min(BUF_SIZE, end - offset)
            self._pwrite_all(_ZEROES[:n], offset)
            offset += n
        start_writeback(self._fd(), start, length)

    def finish(self, ctx: "Context") -> None:
        """fsync (for a block device this also flushes its write cache)."""
        try:
            os.fsync(self._fd())
        except OSError as e:
            raise OperationFailed("flushing %s failed: %s" % (self.label, e.strerror)) from None
        self._close()

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def abort(self) -> None:
        """Close without finishing: the target keeps what was written."""
        self._close()


class ExistingFile(Local):
    """``file``: an existing regular file, written in place."""

    kind = "file"

    @classmethod
    def plan(cls, remote: Remote, source: Source, needed: int) -> Optional[Spec]:
        """An existing regular file the caller may write."""
        if remote.st is None or not stat.S_ISREG(remote.st.st_mode):
            return None
        if not os.access(str(remote.path), os.W_OK):
            raise InvalidArguments("target %s is not writable" % remote.named)
        return remote.spec(cls.kind)

    @classmethod
    def open(cls, ctx: "Context", spec: Spec, needed: int, exact: bool) -> "ExistingFile":
        """Open it and size it: exactly ``needed`` if ``exact``, else at least."""
        path = spec["path"]
        fd = _open_existing(path)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OperationFailed("target %s is no longer a regular file" % path)
            target = cls(path, fd)
            old = os.fstat(fd).st_size
            if old != needed and (exact or old < needed):
                try:
                    os.ftruncate(fd, needed)
                except OSError as e:
                    raise OperationFailed("cannot resize %s to %d bytes: %s" % (path, needed, e.strerror)) from None
            if old < needed:
                target.zero_from = old  # the extension reads as zeros already
            return target
        except BaseException:
            os.close(fd)
            raise


class BlockDevice(Local):
    """``block``: a block device; holes are zeroed with BLKZEROOUT where
    aligned."""

    kind = "block"

    @classmethod
    def plan(cls, remote: Remote, source: Source, needed: int) -> Optional[Spec]:
        """A writable block device of at least ``needed`` bytes."""
        if remote.st is None or not stat.S_ISBLK(remote.st.st_mode):
            return None
        try:
            fd = os.open(str(remote.path), os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidArguments("target %s cannot be opened for writing: %s" % (remote.named, e.strerror)) from None
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if size < needed:
            raise InvalidArguments("target %s is %d bytes, the copy needs %d" % (remote.named, size, needed))
        return remote.spec(cls.kind)

    @classmethod
    def open(cls, ctx: "Context", spec: Spec, needed: int, exact: bool) -> "BlockDevice":
        """Open it; it must still be a block device of ``needed`` bytes."""
        path = spec["path"]
        fd = _open_existing(path)
        try:
            if not stat.S_ISBLK(os.fstat(fd).st_mode):
                raise OperationFailed("target %s is no longer a block device" % path)
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < needed:
                raise OperationFailed("target %s is %d bytes, the copy needs %d" % (path, size, needed))
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def _fast_zero(self, offset: int, length: int) -> bool:
        start = -(-offset // SECTOR) * SECTOR
        stop = (offset + length) // SECTOR * SECTOR
        if stop <= start:
            return False
        import fcntl

        try:
            fcntl.ioctl(self._fd(), BLKZEROOUT, struct.pack("QQ", start, stop - start))
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self._fast = False
            return False
        self._write_zeroes(offset, start - offset)
        self._write_zeroes(stop, offset + length - stop)
        return True


class NewFile(Local):
    """``new``: a file that does not exist yet, a temporary sibling until
    finished."""

    kind = "new"
    zero_from = 0  # created empty and extended: all zeros, all holes

    @classmethod
    def plan(cls, remote: Remote, source: Source, needed: int) -> Optional[Spec]:
        """A local path that does not exist, in a directory we may write."""
        if not remote.is_local or remote.st is not None:
            return None
        parent = os.path.dirname(str(remote.path))
        if not os.path.isdir(parent):
            raise InvalidArguments("target directory %s does not exist" % os.path.dirname(str(remote.named)))
        fstype = paths.pseudo_filesystem(os.stat(parent))
        if fstype is not None:
            raise InvalidArguments("target %s would be on a %s pseudo-filesystem, not storage" % (remote.named, fstype))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InvalidArguments("target directory %s is not writable" % parent)
        return remote.spec(cls.kind)

    @classmethod
    def open(cls, ctx: "Context", spec: Spec, needed: int, exact: bool) -> "NewFile":
        """Create the temporary, sized ``needed`` (all holes)."""
        return cls(ctx, spec["path"], needed)

    def __init__(self, ctx: "Context", path: str, size: int) -> None:
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

    def finish(self, ctx: "Context") -> None:
        """fsync, rename into place, fsync the directory; then ``tmp`` is no
        longer an artifact while the final name stays one until the worker
        records Completed (so a crash before that still removes it)."""
        with ctx.critical():
            try:
                os.fsync(self._fd())
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

    def abort(self) -> None:
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

