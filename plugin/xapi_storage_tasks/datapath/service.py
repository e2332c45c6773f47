"""What ``Plugin.Query``, ``Plugin.diagnostics`` and ``Datapath.*`` do
(their interface functions are in :mod:`xapi_storage_tasks.datapath.api`).

Each volume in use is served by one qemu-storage-daemon
(:mod:`xapi_storage_tasks.datapath.qsd`) through a kernel block device
(:mod:`xapi_storage_tasks.datapath.blockdev`) and an NBD export on a Unix
socket; which domains have it attached or active is durable in the
volume's record (:mod:`xapi_storage_tasks.datapath.volume`). Every call
takes the volume's lock (bounded wait), finishes any detach queued
earlier, then does its part; every call is idempotent.

=================== ==========================================================
attach              record the domain; start the daemon and make its block
                    device DEV if none runs; answer ``XenDisk`` (blkback,
                    ``vbd``, on DEV), ``BlockDevice`` DEV, ``Nbd`` (last)
activate(_readonly) record the domain active (read-write / read-only); DEV
                    is writable only while a domain has it read-write
deactivate          flush DEV, drain the domain's mirror, if one runs
                    (bounded), flush the volume, record the domain inactive
detach              forget the domain; after the last one, release DEV and
                    stop the daemon.
                    Never fails: what it cannot do now is queued, finished by
                    a detached process or by the next call, and logged
=================== ==========================================================
"""

import sys
import time
from typing import Any, Dict, List, Optional

import xapi_storage_tasks
from xapi_storage_tasks import settings
from xapi_storage_tasks.datapath import mirror as mirrors
from xapi_storage_tasks.datapath import blockdev, qsd, schemes
from xapi_storage_tasks.datapath.session import Locked, apply_queue, detach_locked, drop_mirror, event, finish_queued
from xapi_storage_tasks.datapath.volume import Mirror, Volumes, check_domain, key_of
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import InvalidArguments, MirrorFailed, NotAttached, PluginError, VolumeBusy, VolumeInUse

NAME = "xapi-storage-tasks"
FLUSH_TIMEOUT = 5.0  # the source's flush at deactivate: local, and in the migration's downtime


# -- Plugin.* -------------------------------------------------------------------------


def query(dbg: str) -> Dict[str, Any]:
    """The registration record the toolstack requires (every field)."""
    here = settings.plugin_directory()
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
    """A readable dump: how block devices are made here (``block_device``,
    the ``TASK_BLOCK_DEVICE`` setting or its automatic choice), every volume
    in use with its domains, its storage daemon (psutil's view of the
    process, its block device) and its mirror, and every running mirror
    task."""
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
                       "block_device": blockdev.kind(), "volumes": volumes, "mirrors": mirrors}, indent=2, sort_keys=True)


# -- Datapath.* ---------------------------------------------------------------------------


def nbd_uri(daemon: qsd.StorageDaemon) -> str:
    """The Nbd implementation's URI, in the exact form the toolstack parses."""
    return "nbd:unix:%s:exportname=%s" % (daemon.nbd, daemon.export)


def implementations(daemon: qsd.StorageDaemon) -> List[Any]:
    """What attach answers, the same for every domain: blkback on the block
    device for a guest, the device itself, and the NBD export last (the
    toolstack takes the last of a kind)."""
    return [["XenDisk", {"backend_type": "vbd", "params": daemon.device, "extra": {}}],
            ["BlockDevice", {"path": daemon.device}],
            ["Nbd", {"uri": nbd_uri(daemon)}]]


def attach(dbg: str, uri: str, domain: str) -> Dict[str, Any]:
    """Attach the volume for ``domain``: its daemon runs and serves it
    through its block device and its NBD export."""
    vol = schemes.parse(uri)
    check_domain(domain)
    with Locked(vol) as v:
        record = v.record()
        new = domain not in record.domains
        if new:
            record.domains[domain] = "attached"
            v.vols.save(record)  # first: a daemon is never started for nobody
        try:
            daemon = v.serving()
            v.guard(record, daemon)
        except PluginError:
            if new:
                record.domains.pop(domain, None)
                v.vols.save(record)
            raise
        return {"implementations": implementations(daemon)}


def _activate(uri: str, domain: str, mode: str) -> None:
    vol = schemes.parse(uri)
    check_domain(domain)
    with Locked(vol) as v:
        record = v.record()
        if domain not in record.domains:
            raise NotAttached("volume %s is not attached for domain %s" % (uri, domain))
        daemon = v.serving()
        if record.domains[domain] != mode:
            record.domains[domain] = mode
            v.vols.save(record)
        v.guard(record, daemon)


def activate(dbg: str, uri: str, domain: str) -> None:
    """Mark the volume active (read-write) for ``domain``."""
    _activate(uri, domain, "rw")


def activate_readonly(dbg: str, uri: str, domain: str) -> None:
    """Mark the volume active read-only for ``domain``."""
    _activate(uri, domain, "ro")


def deactivate(dbg: str, uri: str, domain: str) -> None:
    """Deactivate for ``domain``: flush its block device, so every write
    acknowledged through it is in the daemon, drain its running mirror
    (within ``TASK_MIRROR_DRAIN_TIMEOUT``), then flush the volume. A drain that
    fails fails the mirror and this call, with the reason; the domain is
    deactivated anyway. The image may be gone from its directory: the
    daemon still holds it open, and flushes it."""
    vol = schemes.parse(uri, must_exist=False)
    check_domain(domain)
    with Locked(vol) as v:
        record = v.vols.load(v.key)
        if record is None or record.domains.get(domain, "attached") == "attached":
            return
        daemon = qsd.load(v.vols, v.key)
        if daemon is not None and daemon.device and qsd.alive(daemon):
            blockdev.flush(daemon.device, FLUSH_TIMEOUT)
        problem: Optional[str] = None
        mirror = record.mirror
        if mirror is not None and mirror.domain == domain and daemon is not None and mirrors.running_task(v.store, mirror):
            started = time.monotonic()
            problem = mirrors.drain(v.store, daemon.ctl, mirror, mirrors.drain_timeout())
            event(v.store, "deactivate of %s for domain %s: mirror task %s %s after %.3fs", uri, domain,
                  mirror.task, "not drained: " + problem if problem else "drained", time.monotonic() - started)
        if record.mirror is not None and mirrors.running_task(v.store, record.mirror) is None:
            drop_mirror(v.vols, record, daemon)
        record.domains[domain] = "attached"
        v.vols.save(record)
        if daemon is not None:
            if not qsd.alive(daemon):
                error = qsd.lost(v.vols, v.key, daemon)
                event(v.store, "%s", error)
                raise error
            v.guard(record, daemon)
            qsd.flush(daemon, FLUSH_TIMEOUT)
        if problem:
            raise MirrorFailed(problem)


def mirror(dbg: str, uri: str, domain: str, remote: str) -> str:
    """Start mirroring volume ``uri``, active for guest ``domain``, to
    ``remote``; returns the task id at once. Asked again for the same
    domain and remote while that mirror runs, returns the same task."""
    from xapi_storage_tasks.datapath import mirror_worker
    from xapi_storage_tasks.nbd.uri import parse_uri
    from xapi_storage_tasks.tasks import worker

    vol = schemes.parse(uri)
    check_domain(domain)
    parse_uri(remote)
    with Locked(vol) as v:
        record = v.vols.load(v.key)
        daemon = qsd.load(v.vols, v.key)
        if record is None or daemon is None or record.domains.get(domain, "attached") == "attached":
            raise NotAttached("volume %s is not active for domain %s: attach and activate it before mirroring it"
                              % (uri, domain))
        if not qsd.alive(daemon):
            raise qsd.lost(v.vols, v.key, daemon)
        running = mirrors.running_task(v.store, record.mirror)
        if running is not None and record.mirror is not None:
            if record.mirror.domain == domain and (running.operation or {}).get("args", {}).get("remote") == remote:
                return running.id
            raise VolumeInUse("volume %s is already being mirrored by task %s" % (uri, running.id))
        placeholder = Mirror.new("", domain)
        relay = v.vols.file(v.key, placeholder.relay)
        qsd.check_socket_path(relay)
        args = {"key": v.key, "qmp_path": daemon.qmp, "relay_path": relay, "job": placeholder.job,
                "node": placeholder.node, "remote": remote, "stall": mirrors.stall_timeout(), "uri": uri}
        # The record names the task before its worker exists: killed here,
        # the task is reconciled as lost and the record with it.
        task = v.store.create(dbg, operation={"kind": mirrors.KIND, "func": mirror_worker.FUNC, "args": args})
        record.mirror = placeholder._replace(task=task.id)
        v.vols.save(record)
        worker.launch(v.store, task.id, mirror_worker.run, args)
        return task.id


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
            event(store, "detach of %r for domain %r ignored: %s", uri, domain, e)
        return
    key = key_of(vol.path)
    with Store() as store:
        vols = Volumes(store)
        try:
            with vols.locked(key):
                apply_queue(vols, key)
                if detach_locked(vols, key, domain):
                    return
                why = "its storage daemon would not stop"
        except VolumeBusy as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - detach never fails; the queue retries
            why = "%s: %s" % (type(e).__name__, e)
        vols.queue_detach(key, domain)
        event(store, "detach of %s for domain %s queued (%s); it finishes later", uri, domain, why)
        from xapi_storage_tasks.process.spawn import spawn

        spawn(lambda: finish_queued(store.path, key))
