"""The mirror task's operation, run by its worker: one loop that follows
the job through its phases, each with its own deadline.

============ ================================================ ==============================
phase        what the worker does                             its deadline, then
============ ================================================ ==============================
connecting   connect to the target and see its greeting       the stall bound; the mirror
             (:mod:`~xapi_storage_tasks.datapath.relay`),     fails
             ``blockdev-add`` the target node on the relay,
             ``blockdev-mirror sync=full
             copy-mode=write-blocking``
syncing      report progress; a drain asked for now waits     the stall rule (below)
             for ``ready``
ready        ``ready`` recorded (Data.stat: complete); new    the stall rule
             guest writes are mirrored synchronously
draining     ``block-job-cancel`` of the ready job: it ends   the drain's ``drain_by``:
             with the target a point-in-time copy             the connection is cut
cancelling   ``block-job-cancel force``                       the stall bound: cut
============ ================================================ ==============================

The stall rule: while the job has work outstanding (``current-progress``
below ``total-progress``: guest writes waiting for the target included)
and neither its progress nor any byte from the target has moved for
``stall`` seconds, the target is stalled: the connection is cut, which
fails every request in flight (guest writes complete against the source)
and the job. So no target, frozen or gone, holds a guest write much longer
than ``stall`` seconds.

When the job concludes, the worker dismisses it and deletes the target
node (closing it flushes the target), bounded the same way, and notes
``job_ended`` in its task. Concluded while draining, without error and
without a cut: drained, Completed. A cancel: Failed ``Cancelled``. Anything
else: Failed with the reason.
"""

import asyncio
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from xapi_storage_tasks.datapath import mirror as mirrors
from xapi_storage_tasks.datapath import qmp, qsd
from xapi_storage_tasks.datapath.relay import Relay
from xapi_storage_tasks.wire.errors import StorageDaemonFailed, MirrorFailed, PluginError

if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.worker import Context

FUNC = "xapi_storage_tasks.datapath.mirror_worker:run"
POLL = 0.05  # seconds between looks at the job and the task, unless an event comes first
CUT_GRACE = 2.0  # seconds a daemon has to answer once the connection is cut

CONNECTING, SYNCING, READY, DRAINING, CANCELLING = "connecting", "syncing", "ready", "draining", "cancelling"


def run(ctx: "Context", key: str, qmp_path: str, relay_path: str, job: str, node: str, remote: str,
        stall: float, uri: str) -> Any:
    """Mirror volume ``uri`` (served by the daemon on ``qmp_path``) to
    ``remote`` (see the module docstring)."""
    from xapi_storage_tasks.wire.codec import UNIT_RESULT

    # SIGTERM only flags the cancel while the loop runs; it honours the flag
    # within POLL seconds, and leaving critical() raises Cancelled.
    with ctx.critical():
        asyncio.run(_Follower(ctx, key, qmp_path, relay_path, job, node, remote, stall).run())
    return UNIT_RESULT


class _Follower:
    """The loop's state: its phase, the phase's deadline, the stall clock."""

    def __init__(self, ctx: "Context", key: str, qmp_path: str, relay_path: str, job: str, node: str,
                 remote: str, stall: float) -> None:
        self.ctx, self.key, self.qmp_path, self.relay_path = ctx, key, qmp_path, relay_path
        self.job, self.node, self.remote, self.stall = job, node, remote, stall
        self.phase = CONNECTING
        self.deadline: Optional[float] = None  # of the phase, monotonic
        self.relay: Optional[Relay] = None
        self.client: Any = None
        self.cut: Optional[str] = None  # why we cut the connection, once we did
        self.best = 0.0  # offset/len dips while guests write (len grows): progress never goes back
        self.done, self.moved = -1, time.monotonic()

    async def run(self) -> None:
        from xapi_storage_tasks.nbd.uri import parse_uri

        deadline = time.monotonic() + self.stall
        try:
            self.relay = Relay.open(parse_uri(self.remote), self.relay_path, deadline)
            self.client = await qmp.connect(self.qmp_path, "mirror", max(0.1, deadline - time.monotonic()))
            target = {"driver": "nbd", "node-name": self.node, "export": parse_uri(self.remote).export,
                      "server": {"type": "unix", "path": self.relay_path}, "reconnect-delay": 0}
            await self._command("blockdev-add", target, deadline, "the target did not complete its handshake")
            self.ctx.log("target %s connected through the relay as node %s" % (self.remote, self.node))
            top = await qsd.top_node(self.client)
            await self._command("blockdev-mirror", {
                "job-id": self.job, "device": top, "target": self.node, "sync": "full",
                "copy-mode": "write-blocking", "auto-dismiss": False}, deadline, "the job did not start")
            self.ctx.log("job %s started (sync=full, copy-mode=write-blocking, stall bound %gs)" % (self.job, self.stall))
            self.phase = SYNCING
            await self._follow()
        except StorageDaemonFailed as e:
            raise MirrorFailed("mirror to %s failed: %s" % (self.remote, self._daemon_gone() or ": ".join(e.details))) from None
        finally:
            if self.client is not None:
                await qmp.close(self.client, CUT_GRACE)
            if self.relay is not None:
                self.relay.close()

    async def _command(self, name: str, args: Optional[Dict[str, Any]], deadline: float, why: str) -> Any:
        """Run a QMP command by ``deadline``; past it, cut the connection
        (a daemon waiting on a frozen target is released by that) and give
        the daemon :data:`CUT_GRACE` seconds more to answer."""
        bound = max(0.1, deadline - time.monotonic()) + CUT_GRACE
        pending = asyncio.ensure_future(qmp.execute(self.client, name, args, timeout=bound))
        done, _ = await asyncio.wait({pending}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            self._cut("%s in time" % why)
            done, _ = await asyncio.wait({pending}, timeout=CUT_GRACE)
        if not done:
            pending.cancel()
            raise MirrorFailed("qemu-storage-daemon did not answer %s, even with the target cut off" % name)
        return pending.result()

    def _cut(self, why: str) -> None:
        if self.cut is None:
            self.cut = "mirror to %s failed: %s; the connection was cut" % (self.remote, why)
            self.ctx.log(self.cut)
            assert self.relay is not None
            self.relay.cut(why)

    async def _follow(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.client.events.get(), POLL)
                self.client.events.clear()
            except asyncio.TimeoutError:
                pass
            await self._requests()
            now = time.monotonic()
            state = next((j for j in await self._command("query-jobs", None, now + self.stall, "the daemon stopped answering")
                          if j.get("id") == self.job), None)
            if state is None:
                raise MirrorFailed("mirror job %s vanished from qemu-storage-daemon" % self.job)
            if state["status"] == "concluded":
                return await self._concluded(state)
            if state["status"] == "ready" and self.phase == SYNCING:
                self._ready()
                await self._requests()  # a drain asked for while syncing starts now
            self._track(state, now)

    async def _requests(self) -> None:
        """Honour a cancel or a drain asked for since the last look."""
        if self.ctx.cancel_requested and self.phase != CANCELLING:
            self.phase, self.deadline = CANCELLING, time.monotonic() + self.stall
            self.ctx.log("cancel requested: force-cancelling job %s" % self.job)
            await self._end_request("block-job-cancel", {"device": self.job, "force": True})
            return
        if self.phase not in (SYNCING, READY):
            return
        try:
            drain_by = mirrors.Flags.of(self.ctx.store.get(self.ctx.task_id)).drain_by
        except PluginError:
            return  # unreadable now: looked at again within POLL
        if drain_by is None:
            return
        self.deadline = time.monotonic() + max(0.0, drain_by - time.time())
        if self.phase == READY:
            self.phase = DRAINING
            self.ctx.log("drain requested: ending ready job %s (it completes with the target up to date)" % self.job)
            await self._end_request("block-job-cancel", {"device": self.job})

    async def _end_request(self, name: str, args: Dict[str, Any]) -> None:
        try:
            await self._command(name, args, time.monotonic() + self.stall, "the daemon did not take the request")
        except StorageDaemonFailed:
            pass  # the job is already ending: it concludes, which the loop sees

    def _ready(self) -> None:
        self.phase = READY
        self.ctx.progress(1.0, force=True)
        mirrors.set_flags(self.ctx.store, self.ctx.task_id, ready=True)
        self.ctx.log("job %s ready: the existing data is synchronised; new writes keep being mirrored" % self.job)

    def _track(self, state: Dict[str, Any], now: float) -> None:
        """Progress, the stall rule and the phase's deadline."""
        total, done = state.get("total-progress") or 0, state.get("current-progress") or 0
        if self.phase == SYNCING and total:
            self.best = max(self.best, min(done / total, 0.99))
            self.ctx.progress(self.best)
        if done != self.done:
            self.done, self.moved = done, now
        assert self.relay is not None
        if done < total and now - self.moved >= self.stall and now - self.relay.last_reply >= self.stall:
            self._cut("the target completed nothing for %gs while %d bytes waited for it" % (self.stall, total - done))
        elif self.deadline is not None and now >= self.deadline:
            self._cut("the %s phase did not end in time" % self.phase if self.phase != SYNCING
                      else "it was not synchronised by the drain's deadline")

    async def _concluded(self, state: Dict[str, Any]) -> None:
        deadline = time.monotonic() + self.stall
        if self.phase == DRAINING and self.deadline is not None:
            deadline = min(deadline, self.deadline)  # the flush below is part of the drain
        await self._command("job-dismiss", {"id": self.job}, deadline, "the job would not go")
        # Deleting the node closes it, which flushes the target: bounded too.
        await self._command("blockdev-del", {"node-name": self.node}, deadline, "the target did not flush")
        try:
            mirrors.set_flags(self.ctx.store, self.ctx.task_id, job_ended=True)
        except PluginError:
            pass  # not recorded: the next call on the volume finds no job to end
        if self.phase == CANCELLING:
            self.ctx.log("job %s cancelled" % self.job)
            return
        if self.cut is not None:
            raise MirrorFailed(self.cut)
        if state.get("error"):
            assert self.relay is not None
            why = "%s (%s)" % (self.relay.ended, state["error"]) if self.relay.ended else state["error"]
            raise MirrorFailed("mirror to %s failed: %s" % (self.remote, why))
        if self.phase != DRAINING:
            raise MirrorFailed("mirror to %s ended before it was drained" % self.remote)
        self.ctx.log("job %s drained: the target holds every acknowledged write, flushed" % self.job)

    def _daemon_gone(self) -> Optional[str]:
        """Why the volume's daemon is gone, if it is."""
        from xapi_storage_tasks.datapath.volume import Volumes

        try:
            vols = Volumes(self.ctx.store)
            daemon = qsd.load(vols, self.key)
            if daemon is not None and qsd.alive(daemon):
                return None
            tail = qsd.log_tail(vols, self.key)
        except PluginError:
            return None
        return "the storage daemon serving the volume died" + (": " + tail if tail else "")
