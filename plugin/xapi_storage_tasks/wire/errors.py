"""The plugin's one error tree.

Every failure a caller can see is a :class:`PluginError`. Each subclass has a
stable ``name`` that becomes the first element of ``params`` in the XAPI
error record; the rest of ``params`` are human-readable details. Translation
to the wire happens only in :mod:`xapi_storage_tasks.entry` (and the daemon boundary).

The last three belong to the socket transport: the daemon's refusals of a
connection (``Permission_denied``, ``Service_unavailable``) and the
client's failure to reach the daemon at all (``Daemon_unavailable``).
"""

CODE = "SR_BACKEND_FAILURE"


class PluginError(Exception):
    """Base class: an error with an XAPI ``code`` and ``params``."""

    name = "Internal_error"
    code = CODE

    def __init__(self, *details):
        super().__init__(*details)
        self.details = tuple(str(d) for d in details)

    @property
    def params(self):
        """The error record's ``params``: the stable name, then details."""
        return [self.name, *self.details]

    def __str__(self):
        return ": ".join(self.params)


class InternalError(PluginError):
    """Anything unexpected; the detail says what happened."""

    name = "Internal_error"


class InvalidArguments(PluginError):
    """The request is malformed: not JSON, wrong types, bad ids, bad ranges."""

    name = "Invalid_arguments"


class Unimplemented(PluginError):
    """The method exists in the interface but this plugin does not do it."""

    name = "Unimplemented"


class TaskDoesNotExist(PluginError):
    """No task with this id is in the store."""

    name = "Task_does_not_exist"


class TaskInProgress(PluginError):
    """The task is still Pending, so it cannot be destroyed."""

    name = "Task_in_progress"


class TaskCorrupt(PluginError):
    """The task's file exists but cannot be read or parsed."""

    name = "Task_corrupt"


class TaskBusy(PluginError):
    """The task's lock stayed held by another process for the whole bounded
    wait (``TASK_LOCK_WAIT``); nothing changed. Retry."""

    name = "Task_busy"


class StateDirInvalid(PluginError):
    """The state directory is missing, unsafe (foreign owner, writable by
    others, a symlink) or otherwise unusable."""

    name = "State_directory_invalid"


class OperationFailed(PluginError):
    """A long-running operation failed; the detail is the Failed message."""

    name = "Operation_failed"


class NbdError(OperationFailed):
    """The NBD server refused, dropped the connection, or answered an error."""

    name = "Nbd_error"


# -- the socket transport --------------------------------------------------------


class PermissionDenied(PluginError):
    """The daemon refused the peer: its uid or group is not allowed."""

    name = "Permission_denied"


class ServiceUnavailable(PluginError):
    """The daemon is at its connection limit; try again shortly."""

    name = "Service_unavailable"


class DaemonUnavailable(PluginError):
    """The daemon could not be reached, or broke the connection without an
    answer. Raised by the client only; never on the wire. ``absent`` is
    true when nothing listens at the socket (no such file, or connection
    refused): the request was certainly not served."""

    name = "Daemon_unavailable"
    absent = False
