"""The datapath's errors, in the plugin's one error tree (each has a
stable ``name``, the first element of the error record's ``params``)."""

from xapi_storage_tasks.wire.errors import PluginError


class VolumeBusy(PluginError):
    """Another call held the volume's lock for longer than the bounded wait."""

    name = "Volume_busy"


class NotAttached(PluginError):
    """The call needs the volume attached (for this domain, or at all)."""

    name = "Volume_not_attached"


class DaemonFailed(PluginError):
    """qemu-storage-daemon could not be started, or refused a command."""

    name = "Storage_daemon_failed"


class DaemonLost(PluginError):
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
