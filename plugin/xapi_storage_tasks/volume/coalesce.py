"""Destroyed images go, and a destroyed snapshot that a disk still stands
on is merged into its child, so nightly snapshot-and-destroy never grows
a chain.

:func:`collect` (under the SR's lock, every call that destroys) removes
every destroyed or base image nothing stands on. An image ``G`` with
exactly one child ``C`` left is merged into it by a task (:func:`start`;
``Task.stat`` shows it), one per SR at a time:

1. ``G``'s record names ``C`` (``merge_into``): the intent;
2. ``C`` is made to stand on ``G``'s backing with ``G``'s data copied in
   first: QEMU's ``block-stream`` into ``C`` while a daemon serves it (only
   into the disk's top image), else a safe ``qemu-img rebase``;
3. a live merge is flushed through the daemon's export (the job changed
   ``C``'s header; the data it copied may still sit in QEMU's tables);
4. ``G``'s image and record go.

A crash between the header's change and the flush would leave ``C``
reading through nothing where its tables are not yet on disk. So until
step 4 ``G``'s image stays, and :func:`recover` settles an interrupted
merge: ``C`` still standing on ``G`` is as before (the merge runs again);
``C`` served by a live daemon is flushed and the merge finished; ``C``
that nobody serves gets ``G`` written back as its backing, which is always
right (what the merge copied is ``G``'s own data), and is merged again.
"""

import fcntl
import os
import time
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from xapi_storage_tasks.datapath import qsd
from xapi_storage_tasks.sr import chain, images
from xapi_storage_tasks.sr.directory import SR, VolumeRecord
from xapi_storage_tasks.volume import live
from xapi_storage_tasks.volume.live import Served
from xapi_storage_tasks.wire.errors import InternalError, PluginError

if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.worker import Context

POLL = 0.05
STREAM_TIMEOUT = 3600.0
FLUSH_TIMEOUT = 60.0


class Postponed(Exception):
    """This image cannot be merged now (deep in a served disk's chain); the
    next ``Volume.destroy`` in the SR or ``SR.attach`` tries again."""


def _gone(record: VolumeRecord) -> bool:
    """Not a volume the toolstack sees any more (its image may still be needed)."""
    return record.state == "destroyed" or (record.kind == "base" and record.state == "ready")


def collect(sr: SR) -> List[VolumeRecord]:
    """Remove every gone image nothing stands on (under the SR's lock);
    returns the gone images that have exactly one child (to merge)."""
    while True:
        standing = sr.standing()
        below = set(standing.values())
        lone = [r for r in sr.records() if _gone(r) and r.merge_into is None and r.image not in below]
        for record in lone:
            _remove(sr, record)
        if not lone:
            return [r for r in sr.records() if _gone(r) and r.merge_into is None and len(sr.children(r, standing)) == 1]


def _remove(sr: SR, record: VolumeRecord) -> None:
    if os.path.lexists(sr.file(record.image)):
        os.unlink(sr.file(record.image))
    sr.forget(record.uuid)
    _event("SR %s: image %s removed (nothing stands on it)", sr.path, record.image)


def _event(fmt: str, *args: Any) -> None:
    from xapi_storage_tasks.tasks import log
    from xapi_storage_tasks.tasks.store import Store

    with Store() as store:
        log.store_event(store, "volume: " + fmt % args)


def _merging_lock(sr: SR) -> int:
    # Not close-on-exec: qemu-img holds it too (see images.rebase), so a
    # rebase that outlives a killed task still keeps others out.
    return os.open("merging", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=sr.admin)


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
    with SR(sr_path) as sr:
        fd = _merging_lock(sr)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                ctx.log("another task merges SR %s" % sr_path)
                return None
            while True:
                with sr.locked():
                    todo = collect(sr)
                for gone in todo:
                    try:
                        _merge(ctx, sr, gone, fd)
                        break
                    except Postponed:
                        continue
                else:
                    return None
        finally:
            os.close(fd)


def _merge(ctx: "Context", sr: SR, gone: VolumeRecord, hold: int) -> None:
    """Merge the image of ``gone`` into its one child (``hold``: the merging
    lock, passed on to qemu-img)."""
    with sr.locked():
        (child,) = sr.children(gone)
        base = sr.backing(gone)
        disk = _disk_above(sr, child)
        sr.save(gone._replace(merge_into=child.image))
    postponed = False
    ctx.log("merging image %s into %s (its child), which then stands on %s"
            % (gone.image, child.image, base.image if base else "nothing"))
    with Served(sr.uri(disk)) as served:
        if served.daemon is not None and child.uuid != disk.uuid:
            ctx.log("image %s is below a served disk's top: merged once the disk is detached" % child.image)
            postponed = True
        elif served.daemon is None:  # offline: the lock keeps any daemon from opening the chain meanwhile
            images.rebase(sr.file(child.image), None if base is None else base.image, hold=hold)
        else:
            daemon, job, node = served.daemon, *_start_stream(sr, served, disk, child, gone)
    if postponed:
        with sr.locked():
            sr.save(gone._replace(merge_into=None))
        raise Postponed()
    if served.daemon is not None:  # live: followed without the lock, the guest's calls go on
        _follow(ctx, daemon.ctl, job, node, gone.image)
        qsd.flush(daemon, FLUSH_TIMEOUT)
    with sr.locked():
        if chain.backing_of(sr.file(child.image)) == gone.image:
            raise InternalError("image %s still stands on %s after the merge" % (child.image, gone.image))
        _remove(sr, gone)
        collect(sr)
    ctx.log("merged image %s" % gone.image)


def recover(sr: SR) -> None:
    """Settle every merge a crash interrupted (under the SR's lock; see the
    module docstring). A merge still running is left to its task."""
    fd = _merging_lock(sr)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a merging task (or its qemu-img) runs: it finishes its own
        for gone in sr.records():
            if gone.merge_into is not None:
                _settle(sr, gone)
    finally:
        os.close(fd)


def _settle(sr: SR, gone: VolumeRecord) -> None:
    assert gone.merge_into is not None
    if not os.path.exists(sr.file(gone.image)):  # removed only once the merge was durable: done
        sr.forget(gone.uuid)
        return
    child = sr.images().get(gone.merge_into)
    if child is None or chain.backing_of(sr.file(child.image)) == gone.image:
        sr.save(gone._replace(merge_into=None))  # the header never changed: merged again later
        _event("SR %s: the interrupted merge of %s had not changed %s yet", sr.path, gone.image, gone.merge_into)
        return
    with Served(sr.uri(_disk_above(sr, child))) as served:
        if served.daemon is not None:
            qsd.flush(served.daemon, FLUSH_TIMEOUT)  # the daemon's tables are whole: now on disk too
            _event("SR %s: the interrupted merge of %s into %s finished (flushed)", sr.path, gone.image, child.image)
            _remove(sr, gone)
            return
        images.restore_backing(sr.file(child.image), gone.image)
    sr.save(gone._replace(merge_into=None))
    _event("SR %s: %s stands on %s again after an interrupted merge", sr.path, child.image, gone.image)


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


def _start_stream(sr: SR, served: Served, disk: VolumeRecord, child: VolumeRecord,
                  gone: VolumeRecord) -> Tuple[str, str]:
    """Live: start ``block-stream`` into the child's node, its base the
    node below ``gone`` (or none); the job's id and the node of ``gone``."""
    names, nodes = _chain(sr, disk), served.chain_nodes()
    if len(names) != len(nodes):
        raise InternalError("the daemon serves %d images of %s, its headers name %d" % (len(nodes), disk.uuid, len(names)))
    at = names.index(gone.image)
    ended = [j["id"] for j in served.run(lambda top: [("query-jobs", None)])[0]  # a killed task's, finished since
             if str(j.get("id", "")).startswith("merge-") and j.get("status") == "concluded"]
    if ended:
        served.run(lambda top: [("job-dismiss", {"id": job_id}) for job_id in ended])
    job = "merge-%x" % time.time_ns()
    args = {"job-id": job, "device": nodes[names.index(child.image)], "auto-dismiss": False}
    if at + 1 < len(nodes):
        args["base-node"] = nodes[at + 1]
    served.run(lambda top: [("block-stream", args)])
    return job, nodes[at]


def _follow(ctx: "Context", ctl: str, job: str, node: str, image: str) -> None:
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
            raise InternalError("merging %s did not finish within %.0fs" % (image, STREAM_TIMEOUT))
        time.sleep(POLL)
    live.run(ctl, lambda top: [("job-dismiss", {"id": job})])
    if state is not None and state.get("error"):
        raise InternalError("merging %s failed: %s" % (image, state["error"]))
    try:
        live.run(ctl, lambda top: [("blockdev-del", {"node-name": node})])
    except PluginError:
        pass  # an implicit node: it closed with the job
