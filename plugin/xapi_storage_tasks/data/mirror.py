"""Live mirroring of an attached volume to an NBD target, as a task.

``Data.mirror`` validates in the calling process, records the mirror in
the volume's record and starts a worker (:mod:`xapi_storage_tasks.tasks.worker`);
the call answers ``["MirrorV1", id]`` at once. The worker, on the
daemon's own QMP socket:

1. ``blockdev-add`` an ``nbd`` node for the target: ONE connection, never
   re-opened (``reconnect-delay`` 0; the toolstack's proxy accepts once);
2. ``blockdev-mirror sync=full copy-mode=write-blocking auto-dismiss=false``:
   active mirroring, so a guest writing faster than the target takes data
   cannot keep the mirror from converging (each guest write reaches the
   target before it is acknowledged);
3. follows the job (events, ``query-jobs``): progress goes to the task
   file, and ``ready`` (existing data synchronised) is recorded in the
   task's operation, which is all ``Data.stat`` reads;
4. when the job concludes: dismisses it and deletes the target node
   (closing it flushes the target), and notes ``job_ended`` in the task's
   operation. Concluded without error after ``ready`` is a drained mirror:
   Completed. With an error: Failed with QEMU's message. A cancel (SIGTERM
   from ``Task.cancel``/``Data.cancel``) force-cancels the job: Failed
   ``Cancelled``; the volume keeps serving. A mirror that copies nothing
   for ``TASK_MIRROR_STALL_TIMEOUT`` seconds before it is synchronised (a
   frozen target: QEMU's NBD client has no I/O timeout) fails, so the
   toolstack, which polls ``Data.stat`` with no time limit, is told.

A task that ended without ``job_ended`` (its worker killed, or a job that
would not conclude) may have left its job in the daemon: the next call on
the volume ends it (:func:`orphaned`, :func:`abort`).

Every QMP command is bounded (:data:`xapi_storage_tasks.datapath.qmp.TIMEOUT`).

The drain itself is asked for by ``Datapath.deactivate`` of the mirror's
domain (:func:`drain`): ``block-job-cancel`` of the ready job on the
control socket, then wait, bounded, for the worker to finish.
"""

import time
from typing import Any, Dict, Optional

from xapi_storage_tasks.tasks.record import Task
from xapi_storage_tasks.tasks.state import Completed
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import DaemonFailed, MirrorFailed, NotAttached, PluginError, VolumeInUse

KIND = "MirrorV1"
FUNC = "xapi_storage_tasks.data.mirror:run"
POLL = 0.2
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_STALL_TIMEOUT = 60.0
STALL_END = 2.0  # seconds a stalled mirror's worker waits for its job to end


def running_task(store: Store, mirror: Optional[Dict[str, str]]) -> Optional[Task]:
    """The Pending task of a volume record's mirror, or None."""
    if mirror is None:
        return None
    from xapi_storage_tasks.tasks import lifecycle

    try:
        task = lifecycle.reconcile(store, mirror["task"])
    except PluginError:
        return None  # destroyed or unreadable: no mirror runs under it
    return None if task.state.terminal else task


def orphaned(store: Store, mirror: Dict[str, str]) -> bool:
    """The mirror's task ended (or is gone) without its worker having
    ended its job (the worker was killed, or the job would not conclude):
    the job may still run in the daemon, and nobody else will end it."""
    try:
        task = store.get(mirror["task"])
    except PluginError:
        return True
    return task.state.terminal and not (task.operation or {}).get("job_ended")


# -- Data.mirror: in the calling process ----------------------------------------


def start(dbg: str, uri: str, domain: str, remote: str) -> str:
    """Start mirroring volume ``uri`` to ``remote``; returns the task id.
    Asked again for the same remote while that mirror runs, returns the
    same task (the call is idempotent)."""
    from xapi_storage_tasks.datapath import qsd, schemes
    from xapi_storage_tasks.datapath.volume import Volumes, check_domain, key_of
    from xapi_storage_tasks.nbd.uri import parse_uri
    from xapi_storage_tasks.tasks import worker

    vol = schemes.parse(uri)
    check_domain(domain)
    address = parse_uri(remote)
    with Store() as store:
        vols = Volumes(store)
        key = key_of(vol.path)
        with vols.locked(key):
            record = vols.load(key)
            daemon = qsd.load(vols, key)
            if record is None or not record.domains or daemon is None:
                raise NotAttached("volume %s is not attached: attach it before mirroring it" % uri)
            if not qsd.alive(daemon):
                raise qsd.lost(vols, key, daemon)
            running = running_task(store, record.mirror)
            if running is not None:
                if running.operation and running.operation.get("args", {}).get("remote") == remote:
                    return running.id
                raise VolumeInUse("volume %s is already being mirrored by task %s" % (uri, running.id))
            if record.mirror is not None and orphaned(store, record.mirror):
                abort(daemon.ctl, record.mirror)  # its worker was lost: end its job first
            suffix = "%x" % time.time_ns()
            job, node = "mirror-" + suffix, "target-" + suffix
            target: Dict[str, Any] = {"driver": "nbd", "node-name": node, "export": address.export, "reconnect-delay": 0}
            if address.socket_path is not None:
                target["server"] = {"type": "unix", "path": address.socket_path}
            else:
                target["server"] = {"type": "inet", "host": address.host, "port": str(address.port)}
            args = {"qmp": daemon.qmp, "job": job, "target": target, "remote": remote, "uri": uri}
            # The record names the task before its worker exists: killed
            # here, the task is reconciled as lost and the record with it.
            task = store.create(dbg, operation={"kind": KIND, "func": FUNC, "args": args})
            record.mirror = {"task": task.id, "domain": domain, "job": job, "node": node}
            vols.save(record)
            worker.launch(store, task.id, run, args)
            return task.id


def refuse_copy(uri: str, remote: str) -> None:
    """Data.copy of (or onto) an image that is being mirrored would undo
    or race the mirror's writes: refuse it with a clear error."""
    import os
    import urllib.parse

    from xapi_storage_tasks.datapath.schemes import SCHEMES
    from xapi_storage_tasks.datapath.volume import DIR, Volumes, key_of

    paths = []
    for value in (uri, remote):
        parts = urllib.parse.urlsplit(value) if isinstance(value, str) else None
        if parts is not None and (parts.scheme.lower() in SCHEMES or parts.scheme == "file") and parts.path.startswith("/"):
            paths.append(urllib.parse.unquote(parts.path))
        elif isinstance(value, str) and value.startswith("/"):
            paths.append(value)
    if not paths:
        return
    with Store() as store:
        if not os.path.isdir(os.path.join(store.path, DIR)):
            return
        vols = Volumes(store)
        for path in paths:
            try:
                record = vols.load(key_of(path))
            except PluginError:
                continue
            if record is not None and record.mirror is not None and running_task(store, record.mirror) is not None:
                raise VolumeInUse("volume %s is being mirrored by task %s: a copy could undo the mirror's writes; "
                                  "copy it once the mirror has ended" % (record.uri, record.mirror["task"]))


# -- Datapath.deactivate: the drain -------------------------------------------------


def stall_timeout() -> float:
    """Seconds a mirror may copy nothing before it is synchronised
    (``TASK_MIRROR_STALL_TIMEOUT``)."""
    from xapi_storage_tasks import settings

    return settings.seconds(settings.MIRROR_STALL_TIMEOUT, DEFAULT_STALL_TIMEOUT)


def drain_timeout() -> float:
    """Seconds a drain may take (``TASK_MIRROR_DRAIN_TIMEOUT``)."""
    from xapi_storage_tasks import settings

    return settings.seconds(settings.MIRROR_DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT)


def drain(store: Store, ctl: str, mirror: Dict[str, str], timeout: float) -> Optional[str]:
    """End a running mirror so that every acknowledged write is on the
    target, flushed: wait for the job to be ready, ``block-job-cancel``
    it (a ready mirror then completes cleanly) and wait for the worker to
    record the outcome. Returns None when the mirror drained (or had
    already ended), else why it could not: the mirror is then failed with
    that message, within ``timeout`` seconds."""
    from xapi_storage_tasks.datapath import qmp
    from xapi_storage_tasks.tasks import lifecycle
    from xapi_storage_tasks.tasks.state import Failed

    task_id = mirror["task"]
    deadline = time.monotonic() + timeout
    asked = False
    why = "the mirror did not drain within %.0fs" % timeout
    while time.monotonic() < deadline:
        try:
            task = lifecycle.reconcile(store, task_id)
        except PluginError:
            return None  # destroyed: nothing left to drain
        if isinstance(task.state, Completed):
            return None
        if task.state.terminal:  # failed: reported by Data.stat already, unless we asked
            return "the mirror failed while draining: %s" % getattr(task.state, "message", "") if asked else None
        if not asked and task.operation and task.operation.get("ready"):
            try:
                qmp.run(ctl, [("block-job-cancel", {"device": mirror["job"]})], timeout=max(0.1, deadline - time.monotonic()))
            except PluginError as e:
                why = "could not ask the mirror to drain: %s" % e
                break
            asked = True
        time.sleep(0.005)
    message = "Mirror drain failed: %s" % why
    ended: Optional[Task]
    try:
        ended = store.transition(task_id, lambda t: None if t.state.terminal else lifecycle.fail_and_undo(store, t, message))
    except PluginError:
        ended = None
    abort(ctl, mirror)
    if ended is not None and isinstance(ended.state, Completed):
        return None  # drained just in time
    return ended.state.message if ended is not None and isinstance(ended.state, Failed) else message


def abort(ctl: str, mirror: Dict[str, str], timeout: float = 5.0) -> None:
    """Best effort, bounded: force-cancel a mirror job, wait for it to
    conclude, dismiss it and remove its target node (after its worker
    died, when a drain gave up, or when the volume is detached)."""
    import asyncio

    try:
        asyncio.run(_abort(ctl, mirror, timeout))
    except (PluginError, asyncio.TimeoutError) as e:
        from xapi_storage_tasks.tasks import log

        with Store() as store:
            log.store_event(store, "datapath: could not end mirror job %s: %s" % (mirror["job"], e))


async def _abort(ctl: str, mirror: Dict[str, str], timeout: float) -> None:
    from xapi_storage_tasks.datapath import qmp

    client = await qmp.connect(ctl, "abort", timeout)
    try:
        await _end_job(client, mirror["job"], mirror["node"], timeout)
    finally:
        await qmp.close(client)


async def _end_job(client: Any, job: str, node: str, timeout: float) -> None:
    """Force-cancel ``job``, wait (at most ``timeout`` seconds) for it to
    conclude, dismiss it and delete its target ``node``."""
    import asyncio

    from xapi_storage_tasks.datapath import qmp

    deadline = time.monotonic() + timeout
    try:
        await qmp.execute(client, "block-job-cancel", {"device": job, "force": True}, timeout)
    except DaemonFailed:
        pass  # no such job any more, or already cancelled
    while True:
        state = next((j for j in await qmp.execute(client, "query-jobs", None, timeout) if j.get("id") == job), None)
        if state is None or state["status"] == "concluded":
            break
        if time.monotonic() >= deadline:
            raise asyncio.TimeoutError("job %s did not conclude within %.0fs" % (job, timeout))
        await asyncio.sleep(0.01)
    for name, args in (("job-dismiss", {"id": job}), ("blockdev-del", {"node-name": node})):
        try:
            await qmp.execute(client, name, args, timeout)
        except DaemonFailed:
            pass  # already gone


# -- the worker -------------------------------------------------------------------


def run(ctx: Any, qmp: str, job: str, target: Dict[str, Any], remote: str, uri: str) -> Any:
    """The mirror task's operation (see the module docstring)."""
    import asyncio

    from xapi_storage_tasks.wire.codec import UNIT_RESULT

    # SIGTERM only flags the cancel while QMP I/O runs; the loop honours it
    # within POLL seconds and leaving critical() raises Cancelled.
    with ctx.critical():
        asyncio.run(_follow(ctx, qmp, job, target, remote))
    return UNIT_RESULT


async def _follow(ctx: Any, path: str, job: str, target: Dict[str, Any], remote: str) -> None:
    import asyncio

    from xapi_storage_tasks.datapath import qmp, qsd

    client = await qmp.connect(path, "mirror")
    try:
        await qmp.execute(client, "blockdev-add", target, timeout=30.0)
        ctx.log("target %s connected as node %s" % (remote, target["node-name"]))
        await qmp.execute(client, "blockdev-mirror", {
            "job-id": job, "device": qsd.NODE, "target": target["node-name"], "sync": "full",
            "copy-mode": "write-blocking", "auto-dismiss": False})
        ctx.log("job %s started (sync=full, copy-mode=write-blocking)" % job)
        ready = cancelling = False
        best = 0.0  # offset/len dips while guests write (len grows): progress never goes back
        stall, last_done, moved = stall_timeout(), -1, time.monotonic()
        while True:
            try:
                await asyncio.wait_for(client.events.get(), POLL)
                client.events.clear()
            except asyncio.TimeoutError:
                pass
            if ctx.cancel_requested and not cancelling:
                cancelling = True
                await qmp.execute(client, "block-job-cancel", {"device": job, "force": True})
            state = next((j for j in await qmp.execute(client, "query-jobs") if j.get("id") == job), None)
            if state is None:
                raise MirrorFailed("mirror job %s vanished from qemu-storage-daemon" % job)
            if state["status"] == "concluded":
                await qmp.execute(client, "job-dismiss", {"id": job})
                await qmp.execute(client, "blockdev-del", {"node-name": target["node-name"]})
                _job_ended(ctx)
                error = state.get("error")
                if cancelling:
                    ctx.log("job %s cancelled" % job)
                    return
                if error:
                    raise MirrorFailed("mirror to %s failed: %s" % (remote, error))
                if not ready:
                    raise MirrorFailed("mirror to %s ended before it was synchronised" % remote)
                ctx.log("job %s drained: the target holds every acknowledged write, flushed" % job)
                return
            total, done = state.get("total-progress") or 0, state.get("current-progress") or 0
            if state["status"] == "ready" and not ready:
                ready = True
                ctx.progress(1.0, force=True)
                ctx.store.annotate(ctx.task_id, lambda t: t.operation.__setitem__("ready", True))
                ctx.log("job %s ready: the existing data is synchronised; new writes keep being mirrored" % job)
            elif not ready and total:
                best = max(best, min(done / total, 0.99))
                ctx.progress(best)
            if not ready and not cancelling:
                if done != last_done:
                    last_done, moved = done, time.monotonic()
                elif time.monotonic() - moved >= stall:
                    why = "mirror to %s copied nothing for %.0fs: the target stalled" % (remote, stall)
                    ctx.log(why + "; ending job %s" % job)
                    try:
                        # Briefly: a job with requests in flight to a frozen target does
                        # not conclude; the next call on the volume ends it (no job_ended).
                        await _end_job(client, job, target["node-name"], STALL_END)
                        _job_ended(ctx)
                    except (DaemonFailed, asyncio.TimeoutError) as e:
                        ctx.log("job %s not ended (%s): the next call on the volume ends it" % (job, e))
                    raise MirrorFailed(why)
    except DaemonFailed as e:
        raise MirrorFailed("mirror to %s failed: %s" % (remote, ": ".join(e.details))) from None
    finally:
        await qmp.close(client)


def _job_ended(ctx: Any) -> None:
    """Note in the task that its job is gone from the daemon (nothing is
    left for :func:`abort` to end). Not recorded (lock busy, a full
    disk), the next call on the volume merely ends the job again."""
    try:
        ctx.store.annotate(ctx.task_id, lambda t: t.operation.__setitem__("job_ended", True))
    except PluginError:
        pass
