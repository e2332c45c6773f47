"""What ``Plugin.Query``, ``Plugin.diagnostics`` and ``Datapath.*`` do
(their interface functions are in :mod:`xapi_storage_tasks.datapath.api`).

Each volume in use is served by one qemu-storage-daemon
(:mod:`xapi_storage_tasks.datapath.qsd`) through an NBD export on a Unix
socket; which domains have it attached or active is durable in the
volume's record (:mod:`xapi_storage_tasks.datapath.volume`). Every call
takes the volume's lock (bounded wait), finishes any detach queued
earlier, then does its part; every call is idempotent.

=================== ==========================================================
attach              record the domain; start the daemon if none runs; answer
                    ``{"implementations": [["Nbd", {"uri": "nbd:unix:S:exportname=E"}]]}``
activate(_readonly) record the domain active (read-write / read-only)
deactivate          drain the domain's mirror, if one runs (bounded), flush
                    the volume, record the domain inactive
detach              forget the domain; stop the daemon after the last one.
                    Never fails: what it cannot do now is queued, finished by
                    a detached process or by the next call, and logged
=================== ==========================================================
"""

import os
import sys
import time
from typing import Any, Dict, List, Optional

import xapi_storage_tasks
from xapi_storage_tasks.datapath import qsd, schemes
from xapi_storage_tasks.datapath.volume import Record, Volumes, check_domain, key_of
from xapi_storage_tasks.tasks import log
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import DaemonFailed, InvalidArguments, NotAttached, PluginError, VolumeBusy, VolumeInUse

NAME = "xapi-storage-tasks"
FINISH_WAIT = 600.0  # how long a queued detach waits for a busy volume


def _log(store: Store, fmt: str, *args: Any) -> None:
    log.store_event(store, "datapath: " + fmt % args)


# -- Plugin.* -------------------------------------------------------------------------


def query(dbg: str) -> Dict[str, Any]:
    """The registration record the toolstack requires (every field)."""
    here = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0]))) if sys.argv and sys.argv[0] else ""
    return {
        "plugin": here if here in schemes.SCHEMES else NAME,
        "name": "qemu-storage-daemon datapath",
        "description": "Serves %s volumes to guests and dom0 over NBD through one qemu-storage-daemon per "
                       "volume in use; live Data.mirror (blockdev-mirror, active mode) and Data.copy as tasks"
                       % " and ".join(sorted(schemes.SCHEMES)),
        "vendor": "xapi-storage-tasks contributors",
        "copyright": "(C) xapi-storage-tasks contributors, LGPL-2.1-only",
        "version": xapi_storage_tasks.__version__,
        "required_api_version": "5.0",
        "features": [],
        "configuration": {},
        "required_cluster_stack": [],
    }


def diagnostics(dbg: str) -> str:
    """A readable dump: every volume in use with its domains, its storage
    daemon (psutil's view of the process) and its mirror, and every running
    mirror task."""
    import json

    from xapi_storage_tasks.tasks import lifecycle

    volumes: List[Dict[str, Any]] = []
    mirrors: List[Dict[str, Any]] = []
    with Store() as store:
        vols = Volumes(store)
        for key in vols.keys():
            entry: Dict[str, Any] = {"key": key}
            try:
                record = vols.load(key)
                daemon = qsd.load(vols, key)
            except PluginError as e:
                entry["error"] = str(e)
                volumes.append(entry)
                continue
            if record is not None:
                entry.update(uri=record.uri, domains=record.domains, mirror=record.mirror)
            entry["daemon"] = qsd.describe(daemon) if daemon is not None else None
            entry["queued_detaches"] = len(vols.queued_detaches(key))
            volumes.append(entry)
        for task_id in store.pending_ids():
            try:
                task = lifecycle.reconcile(store, task_id)
            except PluginError:
                continue
            if task.kind == "MirrorV1" and not task.state.terminal and task.operation:
                args = task.operation.get("args", {})
                mirrors.append({"task": task.id, "uri": args.get("uri"), "remote": args.get("remote"),
                                "progress": getattr(task.state, "progress", None), "ready": bool(task.operation.get("ready"))})
    return json.dumps({"plugin": NAME, "version": xapi_storage_tasks.__version__, "state_dir": store.path,
                       "volumes": volumes, "mirrors": mirrors}, indent=2, sort_keys=True)


# -- the volume's lock and queue -------------------------------------------------------


class _Locked:
    """A volume under its lock, with queued detaches already applied."""

    def __init__(self, vol: schemes.Volume) -> None:
        self.vol = vol
        self.key = key_of(vol.path)
        self.store = Store()
        self.vols = Volumes(self.store)
        self._lock = self.vols.locked(self.key)

    def __enter__(self) -> "_Locked":
        try:
            self._lock.__enter__()
        except BaseException:
            self.store.close()
            raise
        _apply_queue(self.vols, self.key)
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
        # The key is the image's real path: another spelling of it is the same volume.
        if record.driver != self.vol.driver or os.path.realpath(record.path) != os.path.realpath(self.vol.path):
            raise VolumeInUse("image %s is in use as %s" % (self.vol.path, record.uri))
        return record

    def serving(self) -> qsd.StorageDaemon:
        """The live daemon of the volume, started if none runs. A daemon
        that served and died is reported (and forgotten, so the next call
        starts anew); one never seen serving (its starter died midway) is
        finished or cleared silently: nobody was given its export."""
        daemon = qsd.load(self.vols, self.key)
        if daemon is not None and not daemon.served:
            pid = daemon.identity.get("pid")
            daemon = qsd.finish_start(self.vols, self.key, daemon)
            _log(self.store, "a start of qemu-storage-daemon pid %s for %s was interrupted: %s", pid, self.vol.uri,
                 "cleared" if daemon is None else "it serves")
        if daemon is None:
            try:
                daemon = qsd.start(self.vols, self.record())
            except DaemonFailed as e:
                _log(self.store, "%s", e)
                raise
            _log(self.store, "started qemu-storage-daemon pid %d for %s", daemon.identity["pid"], self.vol.uri)
        elif not qsd.alive(daemon):
            error = qsd.lost(self.vols, self.key, daemon)
            _log(self.store, "%s", error)
            raise error
        return daemon


def _apply_queue(vols: Volumes, key: str) -> None:
    """Finish the detaches queued for the volume (under its lock). The
    volume's lock file goes with the last one if nothing else is left
    (:func:`_detach_locked` keeps it while a queue entry exists)."""
    names = vols.queued_detaches(key)
    for name in names:
        try:
            queued = vols.read_json(name)
        except PluginError:
            queued = None
        if isinstance(queued, dict) and isinstance(queued.get("domain"), str):
            _detach_locked(vols, key, queued["domain"])
            _log(vols.store, "finished the queued detach of domain %s from volume %s", queued["domain"], key)
        vols.unlink(name)
    if names and not vols.queued_detaches(key) and vols.load(key) is None and qsd.load(vols, key) is None:
        vols.release(key)


def _forget_ended_mirror(vols: Volumes, key: str) -> None:
    """Drop the record's mirror once its task has ended (or is gone): a
    mirror that failed while its volume stays active is otherwise named by
    the record until the next deactivate, long after retention destroyed
    its task (under the volume's lock)."""
    from xapi_storage_tasks.data import mirror as mirrors

    record = vols.load(key)
    if record is None or record.mirror is None or mirrors.running_task(vols.store, record.mirror) is not None:
        return
    _drop_mirror(vols, record, qsd.load(vols, key))
    vols.save(record)


def _finish_queued(path: str, key: str) -> None:
    """In a detached process: wait for the busy volume, then finish its
    queued detaches."""
    with Store(path) as store:
        vols = Volumes(store)
        try:
            with vols.locked(key, FINISH_WAIT):
                _apply_queue(vols, key)
        except PluginError as e:
            _log(store, "queued detach of volume %s not finished: %s (the next call on it will)", key, e)


# -- Datapath.* ---------------------------------------------------------------------------


def nbd_uri(daemon: qsd.StorageDaemon) -> str:
    """The Nbd implementation's URI, in the exact form the toolstack parses."""
    return "nbd:unix:%s:exportname=%s" % (daemon.nbd, daemon.export)


def attach(dbg: str, uri: str, domain: str) -> Dict[str, Any]:
    """Attach the volume for ``domain``: its daemon runs and serves it."""
    vol = schemes.parse(uri)
    check_domain(domain)
    with _Locked(vol) as v:
        record = v.record()
        new = domain not in record.domains
        if new:
            record.domains[domain] = "attached"
            v.vols.save(record)  # first: a daemon is never started for nobody
        try:
            daemon = v.serving()
        except PluginError:
            if new:
                record.domains.pop(domain, None)
                v.vols.save(record)
            raise
        return {"implementations": [["Nbd", {"uri": nbd_uri(daemon)}]]}


def _activate(uri: str, domain: str, mode: str) -> None:
    vol = schemes.parse(uri)
    check_domain(domain)
    with _Locked(vol) as v:
        record = v.record()
        if domain not in record.domains:
            raise NotAttached("volume %s is not attached for domain %s" % (uri, domain))
        v.serving()
        if record.domains[domain] != mode:
            record.domains[domain] = mode
            v.vols.save(record)


def activate(dbg: str, uri: str, domain: str) -> None:
    """Mark the volume active (read-write) for ``domain``."""
    _activate(uri, domain, "rw")


def activate_readonly(dbg: str, uri: str, domain: str) -> None:
    """Mark the volume active read-only for ``domain``."""
    _activate(uri, domain, "ro")


def deactivate(dbg: str, uri: str, domain: str) -> None:
    """Deactivate for ``domain``: drain its running mirror first (bounded
    in time), then flush the volume. A drain that fails fails the mirror
    and this call, with the reason; the domain is deactivated anyway."""
    from xapi_storage_tasks.data import mirror as mirrors

    vol = schemes.parse(uri)
    check_domain(domain)
    with _Locked(vol) as v:
        record = v.vols.load(v.key)
        if record is None or record.domains.get(domain, "attached") == "attached":
            return
        daemon = qsd.load(v.vols, v.key)
        problem: Optional[str] = None
        mirror = record.mirror
        if mirror is not None and mirror["domain"] == domain and daemon is not None and mirrors.running_task(v.store, mirror):
            started = time.monotonic()
            problem = mirrors.drain(v.store, daemon.ctl, mirror, mirrors.drain_timeout())
            _log(v.store, "deactivate of %s for domain %s: mirror task %s %s after %.3fs", uri, domain,
                 mirror["task"], "not drained: " + problem if problem else "drained", time.monotonic() - started)
        if record.mirror is not None and mirrors.running_task(v.store, record.mirror) is None:
            _drop_mirror(v.vols, record, daemon)
        record.domains[domain] = "attached"
        v.vols.save(record)
        if daemon is not None:
            if not qsd.alive(daemon):
                error = qsd.lost(v.vols, v.key, daemon)
                _log(v.store, "%s", error)
                raise error
            _flush(daemon)
        if problem:
            from xapi_storage_tasks.wire.errors import MirrorFailed

            raise MirrorFailed(problem)


def _flush(daemon: qsd.StorageDaemon) -> None:
    """Flush the volume: NBD_CMD_FLUSH through its export makes
    qemu-storage-daemon write back everything acknowledged so far."""
    from xapi_storage_tasks.nbd.protocol import Client, Timeouts
    from xapi_storage_tasks.nbd.uri import Address

    # Bounded: deactivate sits in the migration's downtime window.
    timeouts = Timeouts(connect=10.0, handshake=10.0, io=30.0, flush=30.0)
    with Client.connect(Address(daemon.nbd, None, 0, daemon.export), timeouts) as client:
        client.flush()


def detach(dbg: str, uri: str, domain: str) -> None:
    """Detach for ``domain``; stop the daemon after the last domain.
    Never fails: a busy volume or a daemon that will not stop is queued
    and finished later (by a detached process, or by the next call), and
    the log says so; what cannot even be queued (an unusable state
    directory) is written to stderr, which the toolstack logs."""
    try:
        _detach(uri, domain)
    except Exception as e:  # noqa: BLE001 - the one call that must never fail
        sys.stderr.write("Datapath.detach of %r for domain %r could not be recorded: %s\n" % (uri, domain, e))


def _detach(uri: str, domain: str) -> None:
    try:
        vol = schemes.parse(uri, must_exist=False)
        check_domain(domain)
    except InvalidArguments as e:
        with Store() as store:
            _log(store, "detach of %r for domain %r ignored: %s", uri, domain, e)
        return
    key = key_of(vol.path)
    with Store() as store:
        vols = Volumes(store)
        try:
            with vols.locked(key):
                _apply_queue(vols, key)
                if _detach_locked(vols, key, domain):
                    return
                why = "its storage daemon would not stop"
        except VolumeBusy as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - detach never fails; the queue retries
            why = "%s: %s" % (type(e).__name__, e)
        vols.queue_detach(key, domain)
        _log(store, "detach of %s for domain %s queued (%s); it finishes later", uri, domain, why)
        from xapi_storage_tasks.process.spawn import spawn

        spawn(lambda: _finish_queued(store.path, key))


def _detach_locked(vols: Volumes, key: str, domain: str) -> bool:
    """Forget ``domain``; after the last one, end any mirror and stop the
    daemon. False if the daemon would not stop (its record stays)."""
    from xapi_storage_tasks.data import mirror as mirrors

    record = vols.load(key)
    daemon = qsd.load(vols, key)
    if record is not None:
        record.domains.pop(domain, None)
        mirror = record.mirror
        if mirror is not None and (mirror["domain"] == domain or not record.domains):
            if mirrors.running_task(vols.store, mirror) is not None:
                _fail_mirror(vols.store, mirror, "Mirror failed: volume detached for domain %s while mirroring" % domain)
                if daemon is not None and qsd.alive(daemon):
                    mirrors.abort(daemon.ctl, mirror)
                record.mirror = None
            else:
                _drop_mirror(vols, record, daemon)
        vols.save(record)
        if record.domains:
            return True
    if daemon is not None and not qsd.alive(daemon):
        _log(vols.store, "%s", qsd.lost(vols, key, daemon))
    elif daemon is not None:
        if not qsd.stop(vols, key, daemon):
            return False
        _log(vols.store, "stopped qemu-storage-daemon pid %s of %s", daemon.identity["pid"], daemon.uri)
    if not vols.queued_detaches(key):
        vols.release(key)
    return True


def _drop_mirror(vols: Volumes, record: Record, daemon: Optional[qsd.StorageDaemon]) -> None:
    """Forget a volume's finished mirror. One whose worker was lost may
    have left its job running in the daemon (see mirror.orphaned): that
    job is ended first."""
    from xapi_storage_tasks.data import mirror as mirrors

    if record.mirror is not None and daemon is not None and qsd.alive(daemon) and mirrors.orphaned(vols.store, record.mirror):
        _log(vols.store, "ending the job of mirror task %s, which its worker did not end", record.mirror["task"])
        mirrors.abort(daemon.ctl, record.mirror)
    record.mirror = None


def _fail_mirror(store: Store, mirror: Dict[str, str], message: str) -> None:
    from xapi_storage_tasks.tasks import lifecycle

    try:
        store.transition(mirror["task"], lambda t: None if t.state.terminal else lifecycle.fail_and_undo(store, t, message))
    except PluginError:
        pass
