"""Destroyed images go, and a destroyed snapshot that a disk still stands
on is merged into its child, so nightly snapshot-and-destroy never grows
a chain.

:func:`collect` (under the SR's lock, every call that destroys) removes
every destroyed or base image nothing stands on, up the chain. An image
with exactly one child left is merged into it by a task
(:func:`start`, ``Task.stat`` shows it): the child is made to stand on the
image's own backing with its data copied in first, by QEMU's
``block-stream`` into the child's node while a daemon serves it, else by a
safe ``qemu-img rebase`` (under the datapath's lock of the disk above, so
no daemon opens the chain meanwhile). Either way the child's header
changes only once the data is in, so a crash at any instant leaves a
valid chain; the next call merges again. An image with several children
(a clone's base) stays until they are fewer.
"""

import os
import time
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from xapi_storage_tasks.sr import chain, images
from xapi_storage_tasks.sr.directory import SR, VolumeRecord
from xapi_storage_tasks.volume import live
from xapi_storage_tasks.volume.live import Served
from xapi_storage_tasks.wire.errors import InternalError, PluginError

if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.worker import Context

POLL = 0.05
STREAM_TIMEOUT = 3600.0


def _gone(record: VolumeRecord) -> bool:
    """Not a volume the toolstack sees any more (its image may still be needed)."""
    return record.state == "destroyed" or (record.kind == "base" and record.state == "ready")


def collect(sr: SR) -> List[VolumeRecord]:
    """Remove every gone image nothing stands on (under the SR's lock);
    returns the gone images that have exactly one child (to merge)."""
    while True:
        removed = False
        for record in sr.records():
            if _gone(record) and not sr.children(record):
                if os.path.lexists(sr.file(record.image)):
                    os.unlink(sr.file(record.image))
                sr.forget(record.uuid)
                removed = True
        if not removed:
            break
    return [r for r in sr.records() if _gone(r) and len(sr.children(r)) == 1]


def start(dbg: str, sr_path: str) -> Optional[str]:
    """Start the merging task of the SR if there is something to merge;
    its id, or None."""
    from xapi_storage_tasks.tasks import worker

    with SR(sr_path) as sr, sr.locked():
        if not collect(sr):
            return None
    return worker.start(dbg, run, {"sr_path": sr_path}, kind="Task")


def run(ctx: "Context", sr_path: str) -> Any:
    """The task: merge until nothing is left to merge. One merging task
    per SR at a time (a flock held for its life): another one started
    meanwhile leaves at once, its work done by this one's loop."""
    import fcntl

    with SR(sr_path) as sr:
        fd = os.open("merging", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=sr.admin)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                ctx.log("another task merges SR %s" % sr_path)
                return None
            while True:
                with sr.locked():
                    todo = collect(sr)
                if not todo:
                    return None
                _merge(ctx, sr, todo[0])
        finally:
            os.close(fd)


def _merge(ctx: "Context", sr: SR, gone: VolumeRecord) -> None:
    """Merge the image of ``gone`` into its one child."""
    with sr.locked():
        (child,) = sr.children(gone)
        base = sr.backing(gone)
        disk = _disk_above(sr, child)
    ctx.log("merging image %s into %s (its child), which then stands on %s"
            % (gone.image, child.image, base.image if base else "nothing"))
    with Served(sr.uri(disk)) as served:
        if served.daemon is None:  # offline: the lock keeps any daemon from opening the chain meanwhile
            images.rebase(sr.file(child.image), None if base is None else base.image)
        else:
            ctl, job, node = served.daemon.ctl, *_start_stream(sr, served, disk, child, gone)
    if served.daemon is not None:  # live: followed without the lock, the guest's calls go on
        _follow(ctx, ctl, job, node, gone.image)
    with sr.locked():
        if chain.backing_of(sr.file(child.image)) == gone.image:
            raise InternalError("image %s still stands on %s after the merge" % (child.image, gone.image))
        collect(sr)
    ctx.log("merged image %s" % gone.image)


def _disk_above(sr: SR, record: VolumeRecord) -> VolumeRecord:
    """The disk whose chain holds ``record``'s image (an image with one
    child has one disk above it)."""
    while not (record.kind == "disk" and not _gone(record)):
        children = sr.children(record)
        if len(children) != 1:
            raise InternalError("image %s has %d children: no single disk above it" % (record.image, len(children)))
        record = children[0]
    return record


def _chain(sr: SR, disk: VolumeRecord) -> List[str]:
    """The images of ``disk``'s chain, top first."""
    out, images = [], sr.images()
    record: Optional[VolumeRecord] = disk
    while record is not None:
        out.append(record.image)
        record = sr.backing(record, images)
    return out


def _start_stream(sr: SR, served: Served, disk: VolumeRecord, child: VolumeRecord, gone: VolumeRecord) -> Tuple[str, str]:
    """Live: start ``block-stream`` into the child's node, its base the
    node below ``gone`` (or none); the job's id and the node of ``gone``."""
    names, nodes = _chain(sr, disk), served.chain_nodes()
    if len(names) != len(nodes):
        raise InternalError("the daemon serves %d images of %s, its headers name %d" % (len(nodes), disk.uuid, len(names)))
    at = names.index(gone.image)
    job = "merge-%x" % time.time_ns()
    args = {"job-id": job, "device": nodes[names.index(child.image)], "auto-dismiss": False}
    if at + 1 < len(nodes):
        args["base-node"] = nodes[at + 1]
    served.run(lambda top: [("block-stream", args)])
    return job, nodes[at]


def _follow(ctx: "Context", ctl: str, job: str, node: str, key: str) -> None:
    """Follow the merging job to its end, then close the merged image's
    node (if the daemon opened it by name; else it closed with the job)."""
    deadline = time.monotonic() + STREAM_TIMEOUT
    while True:
        state = next((j for j in live.run(ctl, lambda top: [("query-jobs", None)])[0] if j.get("id") == job), None)
        if state is None or state["status"] == "concluded":
            break
        if state.get("total-progress"):
            ctx.progress(min(0.99, state.get("current-progress", 0) / state["total-progress"]))
        if time.monotonic() >= deadline:
            live.run(ctl, lambda top: [("block-job-cancel", {"device": job, "force": True})])
            raise InternalError("merging %s did not finish within %.0fs" % (key, STREAM_TIMEOUT))
        time.sleep(POLL)
    live.run(ctl, lambda top: [("job-dismiss", {"id": job})])
    if state is not None and state.get("error"):
        raise InternalError("merging %s failed: %s" % (key, state["error"]))
    try:
        live.run(ctl, lambda top: [("blockdev-del", {"node-name": node})])
    except PluginError:
        pass  # an implicit node: it closed with the job
