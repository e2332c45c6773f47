"""``Volume.snapshot`` and ``Volume.clone``, live or offline, and the
repair of one that a crash interrupted.

Freezing a disk ``D`` (a snapshot, or the base of a clone of it) takes a
new record ``N`` and, in this order, each step durable:

1. the record of ``N``, state ``creating``: the intent;
2. ``N.qcow2``, a second name of ``D``'s current image (a hard link);
3. ``D.next.qcow2``, a new empty image standing on ``N.qcow2``;
4. if a daemon serves ``D``: ``blockdev-snapshot`` puts ``D.next`` on top
   of its chain, atomically for the guest's I/O: the instant of the
   snapshot;
5. ``D.next.qcow2`` renamed over ``D.qcow2``: ``D``'s name now holds the
   new top, ``N.qcow2`` alone the frozen content (its URI never changed);
6. ``N`` marked ``ready``.

The daemon holds its images open, so renaming them under it changes
nothing it does. :func:`repair` finishes or undoes a freeze from whatever
step it stopped at: ``D.qcow2`` already standing on ``N`` is done;
``D.next`` on top of a live daemon's chain, or with no daemon serving
``D``, is renamed into place (its content is ``D``'s either way);
otherwise the new names go. Nothing the guest wrote is ever dropped.
"""

import os
from typing import Optional

from xapi_storage_tasks.sr import images
from xapi_storage_tasks.sr.directory import SR, VolumeRecord, new_uuid, now
from xapi_storage_tasks.volume.live import Served


def _next(sr: SR, key: str) -> str:
    return os.path.join(sr.path, key + ".next.qcow2")


def freeze(sr: SR, disk: VolumeRecord, kind: str) -> VolumeRecord:
    """Freeze ``disk``'s content now under a new ``kind`` record (under the
    SR's lock); the disk goes on, writable, under its own name."""
    frozen = VolumeRecord(new_uuid(), kind, "creating", name=disk.name, description=disk.description,
                          virtual_size=disk.virtual_size, parent=disk.uuid, created=now())
    sr.save(frozen)
    top, nxt = sr.image(disk.uuid), _next(sr, disk.uuid)
    with Served(sr.uri(disk.uuid)) as served:
        os.link(top, sr.image(frozen.uuid))
        images.create(nxt, disk.virtual_size, backing=os.path.basename(sr.image(frozen.uuid)))
        if served.daemon is not None:
            served.snapshot(nxt, "top-%x" % os.getpid() + frozen.uuid[:8])
        os.rename(nxt, top)
        images.sync(top)
    frozen = frozen._replace(state="ready")
    sr.save(frozen)
    return frozen


def snapshot(sr: SR, key: str) -> VolumeRecord:
    """A read-only volume holding ``key``'s content as of this call (under
    the SR's lock). Of a snapshot: a new snapshot volume on the same
    frozen content."""
    source = sr.visible(key)
    if source.kind == "disk":
        return freeze(sr, source, "snapshot")
    return _stand_on(sr, source, "snapshot")


def clone(sr: SR, key: str) -> VolumeRecord:
    """A new writable volume whose content is ``key``'s as of this call
    (under the SR's lock). No keys are copied (the toolstack sets its own)."""
    source = sr.visible(key)
    base = freeze(sr, source, "base") if source.kind == "disk" else source
    return _stand_on(sr, base, "disk", name=source.name, description=source.description)


def _stand_on(sr: SR, base: VolumeRecord, kind: str, name: Optional[str] = None,
              description: Optional[str] = None) -> VolumeRecord:
    """A new image standing on the frozen ``base``."""
    record = VolumeRecord(new_uuid(), kind, "creating", name=base.name if name is None else name,
                          description=base.description if description is None else description,
                          virtual_size=base.virtual_size, parent=base.parent or base.uuid, created=now())
    sr.save(record)
    images.create(sr.image(record.uuid), base.virtual_size, backing=os.path.basename(sr.image(base.uuid)))
    record = record._replace(state="ready")
    sr.save(record)
    return record


def repair(sr: SR) -> None:
    """Finish or undo every operation a crash interrupted (under the SR's
    lock): see the module docstring."""
    for record in sr.records():
        if record.state != "creating":
            continue
        if record.kind != "disk" and record.parent is not None and os.path.exists(sr.image(record.parent)) \
                and os.path.lexists(sr.image(record.uuid)) and _is_freeze(sr, record):
            _repair_freeze(sr, record)
        else:
            _undo_create(sr, record)


def _is_freeze(sr: SR, record: VolumeRecord) -> bool:
    """The record is a freeze of its parent (not a new image over it)."""
    assert record.parent is not None
    try:
        return sr.backing(record.parent) == record.uuid or os.path.samefile(sr.image(record.uuid), sr.image(record.parent))
    except OSError:
        return False


def _repair_freeze(sr: SR, record: VolumeRecord) -> None:
    assert record.parent is not None
    disk, frozen, nxt = sr.image(record.parent), sr.image(record.uuid), _next(sr, record.parent)
    with Served(sr.uri(record.parent)) as served:
        if sr.backing(record.parent) != record.uuid:
            switched = os.path.exists(nxt) and (served.daemon is None or _serves(served, nxt))
            if not switched:
                for path in (nxt, frozen):
                    if os.path.lexists(path) and (path == nxt or os.path.samefile(path, disk)):
                        os.unlink(path)
                sr.forget(record.uuid)
                return
            os.rename(nxt, disk)
            images.sync(disk)
    sr.save(record._replace(state="ready"))


def _serves(served: Served, path: str) -> bool:
    """The daemon's top image is the file ``path``."""
    nodes = served.run(lambda top: [("query-named-block-nodes", {"flat": True})])[0]
    top = served.chain_nodes()[0]
    return any(n.get("node-name") == top and n.get("file") == path for n in nodes)


def _undo_create(sr: SR, record: VolumeRecord) -> None:
    """A new image (volume, clone, snapshot of a snapshot) that was never
    handed out: nothing stands on it, so it goes."""
    image = sr.image(record.uuid)
    if os.path.lexists(image) and not sr.children(record.uuid):
        os.unlink(image)
    sr.forget(record.uuid)
