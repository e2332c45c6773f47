"""The one way into a volume: under its lock, with what earlier calls left
to do done first.

Every call on a volume (``Datapath.*``, ``Data.mirror``) enters through
:class:`Locked`, which takes the volume's lock (bounded wait), finishes the
detaches queued earlier and forgets a mirror whose task has ended (ending
its job first if its worker could not). Detaching the last domain, which
also ends any mirror and stops the storage daemon, is here too: a queued
detach runs the same code.
"""

from typing import Any, Optional

from xapi_storage_tasks.datapath import mirror as mirrors
from xapi_storage_tasks.datapath import blockdev, qsd, schemes
from xapi_storage_tasks.datapath.volume import Mirror, Record, Volumes, canonical, key_of
from xapi_storage_tasks.tasks import lifecycle, log
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import StorageDaemonFailed, PluginError, VolumeInUse

FINISH_WAIT = 600.0  # how long a queued detach waits for a busy volume


def event(store: Store, fmt: str, *args: Any) -> None:
    """Log a datapath event."""
    log.store_event(store, "datapath: " + fmt % args)


class Locked:
    """A volume under its lock, with queued detaches applied and an ended
    mirror forgotten."""

    def __init__(self, vol: schemes.Volume) -> None:
        self.vol = vol
        self.key = key_of(vol.path)
        self.store = Store()
        self.vols = Volumes(self.store)
        self._lock = self.vols.locked(self.key)

    def __enter__(self) -> "Locked":
        try:
            self._lock.__enter__()
        except BaseException:
            self.store.close()
            raise
        apply_queue(self.vols, self.key)
        _forget_ended_mirror(self.vols, self.key)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._lock.__exit__(*exc)
        finally:
            self.store.close()

    def record(self) -> Record:
        """The volume's record, new if it has none; a record of the same
        image under another format is refused."""
        record = self.vols.load(self.key) or Record.new(self.vol)
        # The key is the volume's canonical path: another spelling of it is the same volume.
        if record.driver != self.vol.driver or canonical(record.path) != canonical(self.vol.path):
            raise VolumeInUse("image %s is in use as %s" % (self.vol.path, record.uri))
        return record

    def serving(self) -> qsd.StorageDaemon:
        """The live daemon of the volume, started if none runs, with its
        block device. A daemon that served and died is reported (and
        forgotten with its device, so the next call starts anew); one never
        seen serving (its starter died midway) is finished or cleared
        silently: nobody was given its export."""
        daemon = qsd.load(self.vols, self.key)
        if daemon is not None and not daemon.served:
            pid = daemon.identity.get("pid")
            daemon = qsd.finish_start(self.vols, self.key, daemon)
            event(self.store, "a start of qemu-storage-daemon pid %s for %s was interrupted: %s", pid, self.vol.uri,
                  "cleared" if daemon is None else "it serves")
        if daemon is None:
            try:
                daemon = qsd.start(self.vols, self.record())
            except StorageDaemonFailed as e:
                event(self.store, "%s", e)
                raise
            event(self.store, "started qemu-storage-daemon pid %d for %s", daemon.identity["pid"], self.vol.uri)
        elif not qsd.alive(daemon):
            error = qsd.lost(self.vols, self.key, daemon)
            event(self.store, "%s", error)
            raise error
        made = qsd.with_device(self.vols, self.key, daemon)  # an existing device is found again
        if made.device != daemon.device:
            event(self.store, "block device %s (%s) serves %s", made.device, made.blockdev, self.vol.uri)
        return made

    def guard(self, record: Record, daemon: qsd.StorageDaemon) -> None:
        """The block device refuses writes unless a domain has the volume
        active read-write (attached only, or ``activate_readonly`` only:
        read-only)."""
        if daemon.device:
            blockdev.set_readonly(daemon.device, "rw" not in record.domains.values())


def apply_queue(vols: Volumes, key: str) -> None:
    """Finish the detaches queued for the volume (under its lock). The
    volume's lock file goes with the last one if nothing else is left
    (:func:`detach_locked` keeps it while a queue entry exists)."""
    names = vols.queued_detaches(key)
    for name in names:
        try:
            queued = vols.read_json(name)
        except PluginError:
            queued = None
        if isinstance(queued, dict) and isinstance(queued.get("domain"), str):
            detach_locked(vols, key, queued["domain"])
            event(vols.store, "finished the queued detach of domain %s from volume %s", queued["domain"], key)
        vols.unlink(name)
    if names and not vols.queued_detaches(key) and vols.load(key) is None and qsd.load(vols, key) is None:
        vols.release(key)


def _forget_ended_mirror(vols: Volumes, key: str) -> None:
    """Drop the record's mirror once its task has ended (or is gone): a
    mirror that failed while its volume stays active is otherwise named by
    the record until the next deactivate, long after retention destroyed
    its task."""
    record = vols.load(key)
    if record is None or record.mirror is None or mirrors.running_task(vols.store, record.mirror) is not None:
        return
    if drop_mirror(vols, record, qsd.load(vols, key)):
        vols.save(record)


def finish_queued(path: str, key: str) -> None:
    """In a detached process: wait for the busy volume, then finish its
    queued detaches."""
    with Store(path) as store:
        vols = Volumes(store)
        try:
            with vols.locked(key, FINISH_WAIT):
                apply_queue(vols, key)
        except PluginError as e:
            event(store, "queued detach of volume %s not finished: %s (the next call on it will)", key, e)


def detach_locked(vols: Volumes, key: str, domain: str) -> bool:
    """Forget ``domain``; after the last one, end any mirror and stop the
    daemon. False if the daemon would not stop (its record stays)."""
    record = vols.load(key)
    daemon = qsd.load(vols, key)
    if record is not None:
        record.domains.pop(domain, None)
        mirror = record.mirror
        if mirror is not None and (mirror.domain == domain or not record.domains):
            if mirrors.running_task(vols.store, mirror) is not None:
                # Killing the worker cuts its connection: the job then ends at once.
                try:
                    lifecycle.fail_unless_ended(vols.store, mirror.task,
                                                "Mirror failed: volume detached for domain %s while mirroring" % domain)
                except PluginError:
                    pass  # gone or busy: killing the worker ends the mirror all the same
                lifecycle.kill(vols.store, mirror.task)
            drop_mirror(vols, record, daemon)
        vols.save(record)
        if record.domains:
            return True
    if daemon is not None and not qsd.alive(daemon):
        event(vols.store, "%s", qsd.lost(vols, key, daemon))
    elif daemon is not None:
        if not qsd.stop(vols, key, daemon):
            return False
        event(vols.store, "stopped qemu-storage-daemon pid %s of %s", daemon.identity["pid"], daemon.uri)
    if record is not None and record.mirror is not None:  # its job went with the daemon
        record.mirror = None
        vols.save(record)
    if not vols.queued_detaches(key):
        vols.release(key)
    return True


def drop_mirror(vols: Volumes, record: Record, daemon: Optional[qsd.StorageDaemon]) -> bool:
    """Forget a volume's ended mirror (the record is saved by the caller).
    A job its worker did not end is ended first; one that will not end yet
    keeps the mirror in the record, so the next call tries again. True if
    the record changed."""
    mirror: Optional[Mirror] = record.mirror
    if mirror is None:
        return False
    if daemon is not None and qsd.alive(daemon) and mirrors.orphaned(vols.store, mirror):
        event(vols.store, "ending the job of mirror task %s, which its worker did not end", mirror.task)
        if not mirrors.abort(daemon.ctl, mirror):
            return False
        try:
            mirrors.set_flags(vols.store, mirror.task, job_ended=True)
        except PluginError:
            pass  # the task is gone: the record forgets the mirror below anyway
    vols.unlink("%s.%s" % (record.key, mirror.relay))  # a killed worker's listening socket
    record.mirror = None
    return True
