"""Where the volume plugin meets the datapath: a disk's image under the
datapath's lock for it, and its storage daemon when one serves it.

The one lock discipline: the SR's lock first (records), then the
datapath's lock of the image (the lock every ``Datapath.*`` call takes),
so no attach starts a daemon while an image is being changed under it,
and an image a daemon serves is changed only through that daemon (QMP),
which keeps serving the guest meanwhile.
"""

import asyncio
import time
from typing import Any, Callable, List, Optional

from xapi_storage_tasks.datapath import qmp, qsd, schemes
from xapi_storage_tasks.datapath.session import Locked
from xapi_storage_tasks.wire.errors import VolumeInUse

TIMEOUT = 30.0  # one QMP session, all of its commands


class Served:
    """``with Served(uri) as served:`` the image of ``uri`` under the
    datapath's lock. ``served.daemon`` is its live storage daemon, or None:
    then nothing has the image open, and nothing opens it until the block
    ends."""

    def __init__(self, uri: str) -> None:
        self._locked = Locked(schemes.parse(uri, must_exist=False))
        self.daemon: Optional[qsd.StorageDaemon] = None
        self.mirroring = False

    def __enter__(self) -> "Served":
        v = self._locked.__enter__()
        try:
            daemon = qsd.load(v.vols, v.key)
            if daemon is not None and not qsd.alive(daemon):
                raise qsd.lost(v.vols, v.key, daemon)
            record = v.vols.load(v.key)
        except BaseException:
            self._locked.__exit__(None, None, None)
            raise
        self.daemon = daemon
        self.mirroring = record is not None and record.mirror is not None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._locked.__exit__(*exc)

    def run(self, commands: Callable[[str], List[qmp.Command]]) -> List[Any]:
        """Run on the daemon (see :func:`run`)."""
        assert self.daemon is not None
        return run(self.daemon.ctl, commands)

    def snapshot(self, overlay: str, node: str) -> None:
        """Put the empty image ``overlay`` on top of the disk's chain in one
        step the guest's I/O cannot straddle: every write acknowledged
        before it stays below, every later one goes to ``overlay``."""
        if self.mirroring:
            raise VolumeInUse("the volume is being mirrored: snapshot it once the mirror has ended")
        self.run(lambda top: [
            ("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": None,
                              "file": {"driver": "file", "filename": overlay, "aio": "threads"}}),
            ("blockdev-snapshot", {"node": top, "overlay": node})])

    def chain_nodes(self) -> List[str]:
        """The nodes of the served chain, top first: image ``i`` of the
        chain its headers describe is node ``i`` (the graph's backing edges,
        from the export's current top)."""
        captured: List[str] = []

        def commands(top: str) -> List[qmp.Command]:
            captured.append(top)
            return [("x-debug-query-block-graph", None)]

        graph = self.run(commands)[0]
        by_name = {n["name"]: n["id"] for n in graph["nodes"] if n.get("type") == "block-driver"}
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        backing = {e["parent"]: e["child"] for e in graph["edges"] if e.get("name") == "backing"}
        chain, node = [], by_name.get(captured[0])
        while node is not None:
            chain.append(names[node])
            node = backing.get(node)
        return chain


def run(ctl: str, commands: Callable[[str], List[qmp.Command]]) -> List[Any]:
    """Run on the daemon whose control socket is ``ctl``, in one bounded
    session, the QMP commands ``commands(top)`` makes for the export's
    current top node; their results."""
    return asyncio.run(_run(ctl, commands))


async def _run(ctl: str, commands: Callable[[str], List[qmp.Command]]) -> List[Any]:
    deadline = time.monotonic() + TIMEOUT
    client = await qmp.connect(ctl, "volume", TIMEOUT)
    try:
        top = await qsd.top_node(client)
        return [await qmp.execute(client, name, args, max(0.1, deadline - time.monotonic()))
                for name, args in commands(top)]
    finally:
        await qmp.close(client)
