"""Directories of the state directory, opened so that no symlink is ever
followed: the root one component at a time from ``/``, every
subdirectory relative to its parent with ``O_NOFOLLOW``."""

from __future__ import annotations

import errno
import os
import stat

from xapi_storage_tasks.wire.errors import InternalError, StateDirInvalid

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_dir(fd: int, path: str) -> None:
    """Refuse a directory that is not ours alone (StateDirInvalid)."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirInvalid(path, "not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirInvalid(path, "owned by uid %d, not by uid %d" % (st.st_uid, os.geteuid()))
    if st.st_mode & 0o022:
        raise StateDirInvalid(path, "writable by group or others (mode %o)" % (st.st_mode & 0o777))


def open_dir(name: str, dir_fd: int, label: str) -> int:
    """Open (creating with 0700 if needed) subdirectory ``name`` of
    ``dir_fd``, never via a symlink."""
    for attempt in (1, 2):
        try:
            fd = os.open(name, O_DIR, dir_fd=dir_fd)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise StateDirInvalid(label, "vanished while being created") from None
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise StateDirInvalid(label, "cannot create: %s" % e.strerror) from None
        except OSError as e:
            why = e.strerror
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and is_symlink(name, dir_fd):
                why = "is a symlink"
            raise StateDirInvalid(label, why) from None
    try:
        check_dir(fd, label)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_root(path: str) -> int:
    """Open the state directory ``path`` (absolute) one component at a
    time from ``/``, never through a symlink: a symlink anywhere in the
    path (not only its last component) could send the store elsewhere, so
    it is refused, naming the component. Missing components are created
    (mode 0700)."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", O_DIR)
    try:
        for i in range(len(parts)):
            here = "/" + "/".join(parts[: i + 1])
            try:
                child = os.open(parts[i], O_DIR, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(parts[i], 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as e:
                    raise StateDirInvalid(path, "cannot create %s: %s" % (here, e.strerror)) from None
                try:
                    child = os.open(parts[i], O_DIR, dir_fd=fd)
                except OSError as e:
                    raise StateDirInvalid(path, "%s: %s" % (here, e.strerror)) from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and is_symlink(parts[i], fd):
                    why = "is a symlink" if i == len(parts) - 1 else "its parent %s is a symlink" % here
                elif i == len(parts) - 1:
                    why = e.strerror or str(e)
                else:
                    why = "%s: %s" % (here, e.strerror)
                raise StateDirInvalid(path, why) from None
            os.close(fd)
            fd = child
        check_dir(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_symlink(name: str, dir_fd: int | None) -> bool:
    """True when ``name`` (in ``dir_fd``) is a symlink."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def unlink(name: str, dir_fd: int) -> None:
    """Remove file ``name`` of ``dir_fd`` if it exists; damage (an empty
    directory in its place) goes too."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError:
            pass


class as_internal:
    """``with as_internal(what):`` reports a failed file operation (an
    OSError) as an InternalError naming it. (A class, not contextlib: task
    calls import this module.)"""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: object, e: BaseException | None, tb: object) -> None:
        if isinstance(e, OSError):
            raise InternalError("%s: %s" % (self.what, e.strerror or e)) from None
