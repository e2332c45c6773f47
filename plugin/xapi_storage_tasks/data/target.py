"""The one interface every copy target kind implements, both halves of it.

A kind is one subclass of :class:`Target`, listed once in
:data:`xapi_storage_tasks.data.targets.KINDS`:

- **plan**, in the calling executable, before any task exists:
  :meth:`Target.plan` looks at the examined ``remote`` (a :class:`Remote`)
  and returns None (not this kind), a JSON-able spec (``{"kind": ...}``
  plus what the worker needs), or raises InvalidArguments. Only cheap
  imports and local checks here: no sockets, no ctypes, no connecting.
- **open**, in the worker: :meth:`Target.open` turns the spec back into a
  target, rechecking what may have changed since the plan; then any number
  of :meth:`~Target.write` (source bytes to the same offset) and
  :meth:`~Target.zero` calls, then :meth:`~Target.finish` (durable) or
  :meth:`~Target.abort` (never blocks, never raises an ordinary exception).

``zero_from`` is the offset from which the target is known to read as
zeros (None: nowhere), so the copy skips zeroing there.
"""

import abc
import os
import stat
from typing import TYPE_CHECKING, Any, ClassVar, Dict, NamedTuple, Optional

from xapi_storage_tasks.data import paths
from xapi_storage_tasks.nbd.uri import is_nbd_uri
from xapi_storage_tasks.wire.errors import InvalidArguments, OperationFailed

if TYPE_CHECKING:  # the worker's side only
    from xapi_storage_tasks.tasks.worker import Context

Spec = Dict[str, Any]
"""A planned target: ``{"kind": name, ...}``, JSON-able (it is stored in the
task file)."""


class Source(NamedTuple):
    """The planned source: its resolved path, its stat and its size."""

    path: str
    st: os.stat_result
    size: int


class Remote:
    """The ``remote`` argument, examined once for every kind to look at.

    ``value`` is the argument as given. For a local path, ``named`` is the
    path it names, ``path`` the same with symbolic links resolved and ``st``
    the resolved file's stat (None if it does not exist); for an NBD URI
    all three are None.
    """

    def __init__(self, value: object) -> None:
        self.value = value
        self.named: Optional[str] = None
        self.path: Optional[str] = None
        self.st: Optional[os.stat_result] = None
        if is_nbd_uri(value):
            return
        named = paths.local_path(value, "target")
        if named.endswith("/"):
            raise InvalidArguments("target %s names a directory" % named)
        path = paths.resolve(named, "target")
        try:
            self.st = os.stat(path)
        except FileNotFoundError:
            if os.path.lexists(named):  # only a link can be there and not resolve
                raise InvalidArguments("target %s is a dangling symbolic link" % named) from None
        except OSError as e:
            raise InvalidArguments("cannot examine target %s: %s" % (named, e.strerror)) from None
        if self.st is not None and stat.S_ISREG(self.st.st_mode):
            fstype = paths.pseudo_filesystem(self.st)
            if fstype is not None:
                raise InvalidArguments("target %s is on a %s pseudo-filesystem, not storage" % (named, fstype))
        self.named, self.path = named, path

    @property
    def is_local(self) -> bool:
        """Whether ``remote`` names a local path (else an NBD URI)."""
        return self.path is not None

    def spec(self, kind: str) -> Spec:
        """A local kind's spec: the resolved path, and the name as given
        when a symbolic link made them differ (the task log shows both)."""
        out: Spec = {"kind": kind, "path": self.path}
        if self.named is not None and os.path.normpath(self.named) != self.path:
            out["named"] = self.named
        return out


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of the same file or the same block device."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode) and a.st_rdev == b.st_rdev:
        return True
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def source_ended(offset: int) -> OperationFailed:
    """The error for a source that shrank during the copy."""
    return OperationFailed("the source ended at offset %d: it shrank during the copy" % offset)


class Target(abc.ABC):
    """Where a copy writes; subclasses are the target kinds."""

    kind: ClassVar[str]
    """The kind's name in a spec (stored in task files: never rename one)."""

    zero_from: Optional[int] = None

    @classmethod
    @abc.abstractmethod
    def plan(cls, remote: Remote, source: Source, needed: int) -> Optional[Spec]:
        """In the caller: None if ``remote`` is not of this kind, else its
        spec for a copy writing up to byte ``needed``; InvalidArguments if
        it is of this kind but cannot take the copy."""

    @classmethod
    @abc.abstractmethod
    def open(cls, ctx: "Context", spec: Spec, needed: int, exact: bool) -> "Target":
        """In the worker: open the planned target for a copy writing up to
        byte ``needed``. ``exact``: a full copy (an existing file gets
        exactly that size; a blocklist copy only grows it)."""

    @staticmethod
    def describe(spec: Spec) -> str:
        """How logs and messages name a planned target."""
        name = spec.get("uri") or spec.get("path") or "?"
        if spec.get("named"):
            return "%s (via the symbolic link %s)" % (name, spec["named"])
        return str(name)

    @abc.abstractmethod
    def write(self, src: int, offset: int, length: int) -> None:
        """Copy ``length`` bytes of the source descriptor ``src`` at
        ``offset`` to the same offset."""

    @abc.abstractmethod
    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros."""

    @abc.abstractmethod
    def finish(self, ctx: "Context") -> None:
        """Make everything written durable and close."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close without finishing, promptly; the target keeps what was
        written so far. Never raises an ordinary exception."""
