"""The plugin's one error tree.

Every failure a caller can see is a :class:`PluginError`. Each subclass has a
stable ``name`` that becomes the first element of ``params`` in the XAPI
error record; the rest of ``params`` are human-readable details. An error
that is naturally a built-in kind also subclasses it
(``InvalidArguments`` is a ValueError, ``TaskDoesNotExist`` a LookupError,
``DaemonUnavailable`` a ConnectionError...), so ``except ValueError`` in
ordinary Python code catches it too, and it carries its data as
attributes. The translation of any exception to what a caller sees (the
error record, a task's Failed message, a JSON-RPC error) is
:mod:`xapi_storage_tasks.wire.boundary`.

The last three belong to the socket transport: the daemon's refusals of a
connection (``Permission_denied``, ``Service_unavailable``) and the
client's failure to reach the daemon at all (``Daemon_unavailable``).

This module imports nothing: every layer may raise these.
"""

from __future__ import annotations

CODE = "SR_BACKEND_FAILURE"


class PluginError(Exception):
    """Base class: an error with an XAPI ``code`` and ``params``."""

    name = "Internal_error"
    code = CODE

    def __init__(self, *details: object) -> None:
        super().__init__(*details)
        self.details = tuple(str(d) for d in details)

    @property
    def params(self) -> list[str]:
        """The error record's ``params``: the stable name, then details."""
        return [self.name, *self.details]

    def _detail(self, index: int) -> str | None:
        return self.details[index] if len(self.details) > index else None

    def __str__(self) -> str:
        return ": ".join(self.params)


class InternalError(PluginError):
    """Anything unexpected; the detail says what happened."""

    name = "Internal_error"


class InvalidArguments(PluginError, ValueError):
    """The request is malformed: not JSON, wrong types, bad ids, bad ranges.
    ``reason`` says what is wrong."""

    name = "Invalid_arguments"

    @property
    def reason(self) -> str | None:
        """What is wrong with the request."""
        return self._detail(0)


class Unimplemented(PluginError, NotImplementedError):
    """The method exists in the interface but this plugin does not do it
    (or no such method exists): ``method`` names it."""

    name = "Unimplemented"

    @property
    def method(self) -> str | None:
        """The method asked for."""
        return self._detail(0)


class _AboutTask(PluginError):
    """An error about one task: its id is the first detail."""

    @property
    def task_id(self) -> str | None:
        """The task's id."""
        return self._detail(0)


class TaskDoesNotExist(_AboutTask, LookupError):
    """No task with this id is in the store."""

    name = "Task_does_not_exist"


class TaskInProgress(_AboutTask):
    """The task is still Pending, so it cannot be destroyed."""

    name = "Task_in_progress"


class TaskCorrupt(_AboutTask):
    """The task's file exists but cannot be read or parsed; ``reason``
    says why."""

    name = "Task_corrupt"

    @property
    def reason(self) -> str | None:
        """Why the task file is unreadable."""
        return self._detail(1)


class TaskBusy(PluginError):
    """The task's lock stayed held by another process for the whole bounded
    wait (``TASK_LOCK_WAIT``); nothing changed. Retry."""

    name = "Task_busy"


class StateDirInvalid(PluginError):
    """The state directory is missing, unsafe (foreign owner, writable by
    others, a symlink) or otherwise unusable: ``path``, then ``reason``."""

    name = "State_directory_invalid"

    @property
    def path(self) -> str | None:
        """The state directory (or the part of it) at fault."""
        return self._detail(0)

    @property
    def reason(self) -> str | None:
        """What is wrong with it."""
        return self._detail(1)


class OperationFailed(PluginError):
    """A long-running operation failed; the detail is the Failed message."""

    name = "Operation_failed"


class NbdError(OperationFailed):
    """The NBD server refused, dropped the connection, or answered an error."""

    name = "Nbd_error"


# -- the datapath -------------------------------------------------------------


class VolumeBusy(PluginError):
    """Another call held the volume's lock for longer than the bounded wait."""

    name = "Volume_busy"


class NotAttached(PluginError):
    """The call needs the volume attached (for this domain, or at all)."""

    name = "Volume_not_attached"


class StorageDaemonFailed(PluginError):
    """qemu-storage-daemon could not be started, or refused a command."""

    name = "Storage_daemon_failed"


class StorageDaemonLost(PluginError):
    """The volume's qemu-storage-daemon died behind our back; noticed and
    reported by the first call that looked."""

    name = "Storage_daemon_lost"


class MirrorFailed(PluginError):
    """A mirror could not be started, or could not be drained in time."""

    name = "Mirror_failed"


class VolumeInUse(PluginError):
    """The operation conflicts with what the volume is doing (e.g. a copy
    of a volume being mirrored)."""

    name = "Volume_in_use"


# -- the volume plugin (the names are the volume interface's own) ------------------


class SRDoesNotExist(PluginError, LookupError):
    """The ``sr`` handle names no SR of this plugin (never created, or
    destroyed)."""

    name = "SR_does_not_exist"


class VolumeDoesNotExist(PluginError, LookupError):
    """The SR holds no volume with that key."""

    name = "Volume_does_not_exist"


# -- the socket transport --------------------------------------------------------


class PermissionDenied(PluginError):
    """The daemon refused the peer: its uid or group is not allowed."""

    name = "Permission_denied"


class ServiceUnavailable(PluginError):
    """The daemon is at its connection limit; try again shortly."""

    name = "Service_unavailable"


class DaemonUnavailable(PluginError, ConnectionError):
    """The daemon could not be reached, or broke the connection without an
    answer. Raised by the client only; never on the wire. ``path`` is the
    daemon's socket; ``absent`` is true when nothing listens there (no such
    file, or connection refused): the request was certainly not served."""

    name = "Daemon_unavailable"

    def __init__(self, *details: object, path: str | None = None, absent: bool = False) -> None:
        super().__init__(*details)
        self.path = path
        self.absent = absent
