"""Live mirroring of an attached volume to an NBD target: what the calling
processes do (the worker's side is :mod:`xapi_storage_tasks.datapath.mirror_worker`).

A mirror is a task (``MirrorV1``) whose worker runs the daemon's
``blockdev-mirror`` job over a connection the worker holds
(:mod:`xapi_storage_tasks.datapath.relay`), and owns every command about
its job: the volume's record names the mirror (:class:`Mirror`), the
task's operation carries its :class:`Flags`. Other calls ask the worker
for something by recording it (a drain: :func:`drain`; a cancel: the
task's cancel request) and wait for the task's outcome, within one
deadline; a worker that does not answer in time is killed, which cuts its
connection, so its job ends within a bound too.

A task that ended without ``job_ended`` (its worker killed) may have left
its job in the daemon, concluded: the next call on the volume dismisses it
(:func:`orphaned`, :func:`abort`), and keeps the mirror in the volume's
record until that succeeded.
"""

import time
from typing import Any, NamedTuple, Optional

from xapi_storage_tasks.datapath.volume import Mirror
from xapi_storage_tasks.tasks.record import Task
from xapi_storage_tasks.tasks.state import CANCELLED, Completed, Failed
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import StorageDaemonFailed, PluginError, VolumeInUse

KIND = "MirrorV1"
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_STALL_TIMEOUT = 5.0
ABORT_TIMEOUT = 2.0  # a job whose connection is gone concludes in milliseconds
RESERVE = 0.5  # of a drain's time, kept for the worker to record the outcome


class Flags(NamedTuple):
    """What a mirror's task records about its job beside its state
    (``Data.stat`` reads ``ready`` straight from the task file)."""

    ready: bool = False  # the existing data is synchronised
    drain_by: Optional[float] = None  # a drain is asked for, to end by this time.time()
    job_ended: bool = False  # the job is gone from the daemon

    @classmethod
    def of(cls, task: Task) -> "Flags":
        """The flags recorded in ``task``'s operation."""
        op = task.operation or {}
        drain_by = op.get("drain_by")
        return cls(op.get("ready") is True, float(drain_by) if isinstance(drain_by, (int, float)) else None,
                   op.get("job_ended") is True)


def set_flags(store: Store, task_id: str, **changes: Any) -> Task:
    """Record flags in the task's operation (see :class:`Flags`)."""
    unknown = set(changes) - set(Flags._fields)
    if unknown:
        raise ValueError("no such mirror flags: %s" % ", ".join(sorted(unknown)))

    def update(task: Task) -> None:
        if task.operation is not None:
            task.operation.update(changes)

    return store.annotate(task_id, update)


def stall_timeout() -> float:
    """Seconds a mirror may complete nothing while work is outstanding
    (``TASK_MIRROR_STALL_TIMEOUT``): the longest a target can hold a guest
    write before the mirror is failed and the write completes."""
    from xapi_storage_tasks import settings

    return settings.seconds(settings.MIRROR_STALL_TIMEOUT, DEFAULT_STALL_TIMEOUT)


def drain_timeout() -> float:
    """Seconds a drain may take (``TASK_MIRROR_DRAIN_TIMEOUT``)."""
    from xapi_storage_tasks import settings

    return settings.seconds(settings.MIRROR_DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT)


def running_task(store: Store, mirror: Optional[Mirror]) -> Optional[Task]:
    """The Pending task of a volume record's mirror, or None."""
    if mirror is None:
        return None
    from xapi_storage_tasks.tasks import lifecycle

    try:
        task = lifecycle.reconcile(store, mirror.task)
    except PluginError:
        return None  # destroyed or unreadable: no mirror runs under it
    return None if task.state.terminal else task


def orphaned(store: Store, mirror: Mirror) -> bool:
    """The mirror's task ended (or is gone) without its worker having
    ended its job: the job may still be in the daemon."""
    try:
        task = store.get(mirror.task)
    except PluginError:
        return True
    return task.state.terminal and not Flags.of(task).job_ended


def _succeeded(state: Any) -> bool:
    """Drained, or cancelled on purpose: the mirror is over either way."""
    return isinstance(state, Completed) or (isinstance(state, Failed) and state.message == CANCELLED)


def drain(store: Store, ctl: str, mirror: Mirror, timeout: float) -> Optional[str]:
    """End a running mirror so that every acknowledged write is on the
    target, flushed, within ``timeout`` seconds: ask its worker (the task's
    ``drain_by`` flag), wait for the task's outcome. Returns None when the
    mirror drained (or had already ended, or was cancelled meanwhile), else
    why not. A worker that has not recorded an outcome by the deadline is
    killed (its connection goes with it) and its job dismissed."""
    from xapi_storage_tasks.tasks import lifecycle

    deadline = time.monotonic() + timeout
    try:
        task = set_flags(store, mirror.task, drain_by=time.time() + max(0.0, timeout - min(RESERVE, timeout / 4)))
    except PluginError:
        return None  # gone: nothing left to drain
    while not task.state.terminal and time.monotonic() < deadline:
        time.sleep(0.005)
        try:
            task = lifecycle.reconcile(store, mirror.task)
        except PluginError:
            return None
    if not task.state.terminal:
        try:
            task = lifecycle.fail_unless_ended(store, mirror.task, "Mirror drain failed: its worker did not answer in time")
        except PluginError:
            pass  # gone or busy: killing the worker below ends it all the same
        # Past the deadline already: briefly. A job left (its connection went
        # with the worker, so it concludes at once) is ended by the next call.
        lifecycle.kill(store, mirror.task)
        abort(ctl, mirror, RESERVE)
    if _succeeded(task.state):
        return None
    why = task.state.message if isinstance(task.state, Failed) else "it ended unexpectedly"
    return "the mirror did not drain within %gs: %s" % (timeout, why)


def abort(ctl: str, mirror: Mirror, timeout: float = ABORT_TIMEOUT) -> bool:
    """Bounded: force-cancel the mirror's job, wait for it to conclude,
    dismiss it and delete its target node (after its worker died, or when
    the volume is detached under it). True once nothing of it is left."""
    import asyncio

    try:
        asyncio.run(_abort(ctl, mirror, timeout))
        return True
    except (PluginError, asyncio.TimeoutError) as e:
        from xapi_storage_tasks.tasks import log

        with Store() as store:
            log.store_event(store, "datapath: mirror job %s not ended yet (the next call on the volume "
                                   "tries again): %s" % (mirror.job, e))
        return False


async def _abort(ctl: str, mirror: Mirror, timeout: float) -> None:
    from xapi_storage_tasks.datapath import qmp

    deadline = time.monotonic() + timeout
    client = await qmp.connect(ctl, "abort", timeout)
    try:
        await _end_job(client, mirror.job, mirror.node, deadline)
    finally:
        await qmp.close(client, max(0.1, deadline - time.monotonic()))


async def _end_job(client: Any, job: str, node: str, deadline: float) -> None:
    """Force-cancel ``job``, wait for it to conclude, dismiss it and delete
    its target ``node``, all by ``deadline`` (asyncio.TimeoutError after)."""
    import asyncio

    from xapi_storage_tasks.datapath import qmp

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError("job %s did not end in time" % job)
        return remaining

    try:
        await qmp.execute(client, "block-job-cancel", {"device": job, "force": True}, left())
    except StorageDaemonFailed:
        pass  # no such job any more, or already ending
    while True:
        state = next((j for j in await qmp.execute(client, "query-jobs", None, left()) if j.get("id") == job), None)
        if state is None or state["status"] == "concluded":
            break
        left()
        await asyncio.sleep(0.01)
    for name, args in (("job-dismiss", {"id": job}), ("blockdev-del", {"node-name": node})):
        try:
            await qmp.execute(client, name, args, left())
        except StorageDaemonFailed:
            pass  # already gone


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
                                  "copy it once the mirror has ended" % (record.uri, record.mirror.task))
