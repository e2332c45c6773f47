"""Local paths as copies name them, and the filesystems they live on.

Cheap to import (``os``, ``stat``, ``urllib.parse``): the calling
executable validates with it before any task exists.

Policies, checked when the call is made and again by the worker on the
descriptor it opens:

- A path is absolute, or a ``file://``, ``raw+file://``, ``loop+blkback://``
  or ``raw+block://`` URI (the spellings SMAPIv3 volume plugins hand out).
- A regular file on a pseudo-filesystem (``/proc``, ``/sys``, ...) is
  neither a source nor a target: ``/proc/self/mem`` looks like a regular
  file and is the worker's own memory. Block devices are device nodes and
  may live on ``devtmpfs`` as usual.
- Symbolic links are resolved when the call is made (LVM volumes and
  ``/dev/disk/by-*`` names are links): the plan records the resolved path,
  the worker opens that path without following a link in its last
  component, and the task log names both.
"""

import os
import urllib.parse
from typing import Optional

from xapi_storage_tasks.wire.errors import InvalidArguments

LOCAL_SCHEMES = ("file", "raw+file", "loop+blkback", "raw+block")

# Filesystems whose regular files are kernel interfaces, not storage.
PSEUDO_FILESYSTEMS = frozenset((
    "proc", "sysfs", "debugfs", "tracefs", "securityfs", "configfs", "efivarfs", "pstore",
    "bpf", "cgroup", "cgroup2", "devpts", "mqueue", "binfmt_misc", "fusectl", "selinuxfs",
    "nsfs", "rpc_pipefs", "autofs", "hugetlbfs",
))


def local_path(value: object, what: str) -> str:
    """The absolute path named by ``value`` (a path or a local URI);
    InvalidArguments naming ``what`` if it is not one."""
    if not isinstance(value, str) or not value:
        raise InvalidArguments("%s must be a non-empty string" % what)
    if "\0" in value:
        raise InvalidArguments("%s %r contains a NUL byte" % (what, value))
    path = value
    if not value.startswith("/"):
        try:
            parts = urllib.parse.urlsplit(value)
            path = urllib.parse.unquote(parts.path, errors="strict")
        except ValueError as e:
            raise InvalidArguments("%s %r is not a valid URI: %s" % (what, value, e)) from None
        if not parts.scheme:
            raise InvalidArguments("%s %r is neither an absolute path nor a URI" % (what, value))
        if parts.scheme not in LOCAL_SCHEMES:
            raise InvalidArguments("%s %r: unsupported scheme '%s' (use an absolute path or %s)" % (
                what, value, parts.scheme, ", ".join(s + "://" for s in LOCAL_SCHEMES)))
        if parts.netloc not in ("", "localhost"):
            raise InvalidArguments("%s %r names host '%s': only local paths are supported" % (what, value, parts.netloc))
        if parts.query or parts.fragment:
            raise InvalidArguments("%s %r has a query or fragment (percent-encode '?' and '#')" % (what, value))
        if not path.startswith("/") or "\0" in path:
            raise InvalidArguments("%s %r does not name an absolute path" % (what, value))
    return "/" + path.lstrip("/")


def filesystem_type(device: int) -> Optional[str]:
    """The type of the mounted filesystem whose device number is ``device``
    (a ``st_dev``), from ``/proc/self/mountinfo``; None if none matches
    (e.g. btrfs subvolumes, whose ``st_dev`` is their own)."""
    wanted = "%d:%d" % (os.major(device), os.minor(device))
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        return None
    return None


def pseudo_filesystem(st: os.stat_result) -> Optional[str]:
    """The type of the pseudo-filesystem holding the file of ``st``, or
    None if it is on anything else."""
    fstype = filesystem_type(st.st_dev)
    return fstype if fstype in PSEUDO_FILESYSTEMS else None


def resolve(path: str, what: str) -> str:
    """``path`` with every symbolic link resolved (an absolute, normalised
    path; the last component need not exist); InvalidArguments for a loop."""
    try:
        return os.path.realpath(path)
    except OSError as e:  # ELOOP (Python >= 3.13 raises it even when not strict)
        raise InvalidArguments("cannot resolve %s %s: %s" % (what, path, e.strerror)) from None
