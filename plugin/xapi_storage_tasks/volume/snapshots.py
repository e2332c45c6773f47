"""New images: ``Volume.create``, ``Volume.snapshot`` and ``Volume.clone``,
live or offline, and the repair of one a crash interrupted.

Freezing a disk ``D`` (for a snapshot, or as the base of a clone of it)
takes a new record ``F`` and, in this order, each step durable:

1. the record of ``F``, state ``creating``, naming ``D``'s current image
   ``D.n``: the intent;
2. ``D.n+1``, a new empty image standing on ``D.n``;
3. if a daemon serves ``D``: ``blockdev-snapshot`` puts ``D.n+1`` on top
   of its chain, atomically for the guest's I/O: the instant of the
   snapshot;
4. ``D``'s name (a link) pointed at ``D.n+1``;
5. ``D``'s record names ``D.n+1``, ``F`` is ``ready``: ``D.n`` is now the
   frozen content of ``F``.

No image is ever renamed, so a daemon's open images keep their names.
:func:`repair` finishes or undoes a freeze from whatever step it stopped
at: ``D``'s name already moved is done; ``D.n+1`` on top of a live
daemon's chain, or with no daemon serving ``D``, is pointed at (its
content is ``D``'s either way, and may hold writes acknowledged after the
switch); otherwise ``D.n+1`` goes. Nothing the guest wrote is ever
dropped.
"""

import os
from typing import Optional

from xapi_storage_tasks.sr import chain, images
from xapi_storage_tasks.sr.directory import SR, VolumeRecord, image_name, new_uuid, next_image, now
from xapi_storage_tasks.volume.live import Served


def create(sr: SR, record: VolumeRecord, backing: Optional[VolumeRecord] = None) -> VolumeRecord:
    """Make the new disk or snapshot ``record`` (state ``creating``, under
    the SR's lock): its image, empty or standing on ``backing``'s, and for
    a disk its name."""
    record = record._replace(image=image_name(record.uuid, 0), state="creating")
    sr.save(record)
    images.create(sr.file(record.image), record.virtual_size, None if backing is None else backing.image)
    if record.kind == "disk":
        sr.point(record.uuid, record.image)
    record = record._replace(state="ready")
    sr.save(record)
    return record


def freeze(sr: SR, disk: VolumeRecord, kind: str) -> VolumeRecord:
    """Freeze ``disk``'s content now under a new ``kind`` record (under the
    SR's lock); the disk goes on, writable, under its own name."""
    frozen = VolumeRecord(new_uuid(), kind, "creating", name=disk.name, description=disk.description,
                          virtual_size=disk.virtual_size, parent=disk.uuid, created=now(), image=disk.image)
    sr.save(frozen)
    top = next_image(disk.image)
    images.create(sr.file(top), disk.virtual_size, disk.image)
    with Served(sr.uri(disk)) as served:
        if served.daemon is not None:
            served.snapshot(sr.file(top), "img-%s-%s" % (disk.uuid[:8], top.split(".")[1]))  # node names: < 32 bytes
        sr.point(disk.uuid, top)
    sr.save(disk._replace(image=top))
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
    return create(sr, _new(source, "snapshot", source.name, source.description), backing=source)


def clone(sr: SR, key: str) -> VolumeRecord:
    """A new writable volume whose content is ``key``'s as of this call
    (under the SR's lock). No keys are copied (the toolstack sets its own)."""
    source = sr.visible(key)
    base = freeze(sr, source, "base") if source.kind == "disk" else source
    return create(sr, _new(base, "disk", source.name, source.description), backing=base)


def _new(base: VolumeRecord, kind: str, name: str, description: str) -> VolumeRecord:
    return VolumeRecord(new_uuid(), kind, "creating", name=name, description=description,
                        virtual_size=base.virtual_size, parent=base.parent or base.uuid, created=now())


def repair(sr: SR) -> None:
    """Finish or undo every operation a crash interrupted (under the SR's
    lock): see the module docstring."""
    for record in sr.records():
        if record.state != "creating":
            continue
        if record.kind != "disk" and record.parent is not None and record.image.startswith(record.parent + "."):
            _repair_freeze(sr, record)
        else:
            _undo_create(sr, record)


def _repair_freeze(sr: SR, frozen: VolumeRecord) -> None:
    assert frozen.parent is not None
    disk = sr.load(frozen.parent)
    top = next_image(frozen.image)
    with Served(sr.uri(disk)) as served:
        if sr.current(disk.uuid) == frozen.image:  # the name has not moved yet
            made = os.path.exists(sr.file(top)) and chain.backing_of(sr.file(top)) == frozen.image
            if not made or (served.daemon is not None and not _serves(served, sr.file(top))):
                if os.path.exists(sr.file(top)):
                    os.unlink(sr.file(top))
                sr.forget(frozen.uuid)
                return
            sr.point(disk.uuid, top)
    current = sr.current(disk.uuid)
    if current is None:  # the disk has no name: nothing to finish
        sr.forget(frozen.uuid)
        return
    sr.save(disk._replace(image=current))
    sr.save(frozen._replace(state="ready"))


def _serves(served: Served, path: str) -> bool:
    """The daemon's top image is the file ``path``."""
    nodes = served.run(lambda top: [("query-named-block-nodes", {"flat": True})])[0]
    top = served.chain_nodes()[0]
    return any(n.get("node-name") == top and n.get("file") == path for n in nodes)


def _undo_create(sr: SR, record: VolumeRecord) -> None:
    """A new image that was never handed out: nothing stands on it, so it
    goes, with its name."""
    if record.kind == "disk" and sr.current(record.uuid) is not None:
        os.unlink(sr.link(record.uuid))
    if record.image and record.image not in sr.images() and os.path.lexists(sr.file(record.image)):
        os.unlink(sr.file(record.image))  # never an image another record names
    sr.forget(record.uuid)
