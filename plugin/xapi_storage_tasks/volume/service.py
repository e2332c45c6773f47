"""What ``SR.*`` and ``Volume.*`` do (their interface functions are in
:mod:`xapi_storage_tasks.volume.api`), on an SR directory
(:mod:`xapi_storage_tasks.sr.directory`).

The ``sr`` handle every call after ``SR.attach`` gets is the SR's
directory path. Every change of records holds the SR's lock (bounded
wait), and first finishes or undoes what a crash interrupted
(:func:`~xapi_storage_tasks.volume.snapshots.repair`).
"""

import contextlib
import os
from typing import Any, Dict, Iterator, List

import xapi_storage_tasks
from xapi_storage_tasks.sr import images
from xapi_storage_tasks.sr.directory import SR, TYPE, SRRecord, VolumeRecord, new_uuid, now
from xapi_storage_tasks.volume import coalesce, snapshots
from xapi_storage_tasks.volume.live import Served
from xapi_storage_tasks.wire.errors import InvalidArguments, SRDoesNotExist, VolumeDoesNotExist, VolumeInUse

MAX_SIZE = 64 << 40  # 64 TiB: a volume larger than this is refused before qemu-img is asked
MAX_TEXT = 4096  # a name or description, in characters
# Not VDI_RESIZE_ONLINE: qemu-storage-daemon's NBD export does not share
# the resize permission (its clients are told a size once), so a served
# image cannot grow (QEMU 7.2: block_resize is refused).
FEATURES = ["VDI_MIRROR", "VDI_ACTIVATE_READONLY"]


# -- Plugin.Query ------------------------------------------------------------------


def query(dbg: str) -> Dict[str, Any]:
    """The volume plugin's registration record (its features beyond the
    ones xapi derives from the scripts present)."""
    return {
        "plugin": TYPE,
        "name": "qcow2 file SR",
        "description": "A directory of qcow2 images on any mounted filesystem, served by the qcow2+file datapath: "
                       "live snapshots and clones, coalescing, resize, live storage migration",
        "vendor": "xapi-storage-tasks contributors",
        "copyright": "(C) xapi-storage-tasks contributors, LGPL-2.1-only",
        "version": xapi_storage_tasks.__version__,
        "required_api_version": "5.0",
        "features": list(FEATURES),
        "configuration": {"path": "an existing directory on a mounted filesystem, for the SR's images"},
        "required_cluster_stack": [],
    }


# -- SR.* ---------------------------------------------------------------------------


def _path(configuration: Dict[str, str]) -> str:
    path = configuration.get("path") if isinstance(configuration, dict) else None
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise InvalidArguments("device-config:path must be an absolute directory path")
    return os.path.normpath(path)


def _text(value: str, what: str) -> str:
    if len(value) > MAX_TEXT:
        raise InvalidArguments("%s is longer than %d characters" % (what, MAX_TEXT))
    return value


def sr_probe(dbg: str, configuration: Dict[str, str]) -> List[Dict[str, Any]]:
    """The SR at ``path``, if there is one; else where one can be made."""
    path = _path(configuration)
    try:
        with SR(path) as sr:
            record = sr.record()
            return [{"configuration": dict(configuration, uuid=record.uuid), "complete": True,
                     "sr": _stat(sr, record), "extra_info": {}}]
    except SRDoesNotExist:
        usable = os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
        return [{"configuration": configuration, "complete": False, "extra_info": {}}] if usable else []


def sr_create(dbg: str, uuid: str, configuration: Dict[str, str], name: str, description: str) -> Dict[str, str]:
    """Make the directory an SR; answers the configuration to keep."""
    path = _path(configuration)
    SR.create(path, SRRecord(uuid, _text(name, "name"), _text(description, "description"), now())).close()
    return dict(configuration, path=path, uuid=uuid)


def sr_attach(dbg: str, configuration: Dict[str, str]) -> str:
    """The SR's handle (its path); idempotent. What a crash interrupted is
    finished or undone, and a merge left undone is started again."""
    path = _path(configuration)
    with SR(path) as sr, sr.locked():
        snapshots.repair(sr)
        coalesce.recover(sr)
        merge = coalesce.collect(sr)
    if merge:
        coalesce.start(dbg, path)
    return path


def sr_detach(dbg: str, sr: str) -> None:
    """Nothing to undo: an attach keeps nothing open or mounted. Never
    fails (a PBD unplug must go through, even of a directory gone)."""


def sr_destroy(dbg: str, sr: str) -> None:
    """Remove the SR's records; refused while it holds volumes."""
    with SR(sr) as s:
        with s.locked():
            snapshots.repair(s)
            coalesce.recover(s)
            coalesce.collect(s)
            left = [r.uuid for r in s.records()]
            if left:
                raise VolumeInUse("SR %s still holds %d volume(s) (%s): destroy them first"
                                  % (sr, len(left), ", ".join(left[:5])))
        s.destroy()


def _stat(sr: SR, record: SRRecord) -> Dict[str, Any]:
    st = os.statvfs(sr.path)
    return {"sr": sr.path, "name": record.name, "uuid": record.uuid or None, "description": record.description,
            "free_space": st.f_bavail * st.f_frsize, "total_space": st.f_blocks * st.f_frsize,
            "datasources": [], "clustered": False, "health": ["Healthy", ""]}


def sr_stat(dbg: str, sr: str) -> Dict[str, Any]:
    """Space, name and health of the SR."""
    with SR(sr) as s:
        return _stat(s, s.record())


def sr_ls(dbg: str, sr: str) -> List[Dict[str, Any]]:
    """Every volume the toolstack sees, with its keys (one left out would
    be deleted from its database)."""
    with SR(sr) as s:
        return [_volume(s, r) for r in s.records() if r.state == "ready" and r.kind != "base"]


def sr_set_name(dbg: str, sr: str, new_name: str) -> None:
    """Rename the SR."""
    with SR(sr) as s, s.locked():
        s.save_record(s.record()._replace(name=_text(new_name, "name")))


def sr_set_description(dbg: str, sr: str, new_description: str) -> None:
    """Describe the SR."""
    with SR(sr) as s, s.locked():
        s.save_record(s.record()._replace(description=_text(new_description, "description")))


# -- Volume.* --------------------------------------------------------------------------


def _volume(sr: SR, record: VolumeRecord) -> Dict[str, Any]:
    try:
        used = os.stat(sr.file(record.image)).st_blocks * 512
    except OSError:
        used = 0
    return {"key": record.uuid, "uuid": record.uuid, "name": record.name, "description": record.description,
            "read_write": record.read_write, "sharable": record.sharable, "virtual_size": record.virtual_size,
            "physical_utilisation": used, "uri": [sr.uri(record)], "keys": dict(record.keys)}


@contextlib.contextmanager
def _changing(sr: str) -> Iterator[SR]:
    """The SR, locked, with interrupted operations repaired first."""
    with SR(sr) as s, s.locked():
        snapshots.repair(s)
        coalesce.recover(s)
        yield s


def _size(size: int) -> int:
    if not isinstance(size, int) or size <= 0 or size > MAX_SIZE:
        raise InvalidArguments("size must be a positive number of bytes up to 64 TiB, not %r" % (size,))
    return -(-size // 512) * 512  # qcow2 sizes are whole sectors


def volume_create(dbg: str, sr: str, name: str, description: str, size: int, sharable: bool) -> Dict[str, Any]:
    """A new, empty disk of at least ``size`` bytes."""
    size = _size(size)
    with _changing(sr) as s:
        record = VolumeRecord(new_uuid(), "disk", "creating", _text(name, "name"), _text(description, "description"),
                              bool(sharable), size, {}, None, now())
        return _volume(s, snapshots.create(s, record))


def volume_stat(dbg: str, sr: str, key: str) -> Dict[str, Any]:
    """The volume, its URI (the same for its whole life) and its keys."""
    with SR(sr) as s:
        return _volume(s, s.visible(key))


def _update(sr: str, key: str, **changes: Any) -> None:
    with _changing(sr) as s:
        s.save(s.visible(key)._replace(**changes))


def volume_set(dbg: str, sr: str, key: str, k: str, v: str) -> None:
    """Keep ``k = v`` in the volume's keys."""
    with _changing(sr) as s:
        record = s.visible(key)
        s.save(record._replace(keys=dict(record.keys, **{_text(k, "key"): _text(v, "value")})))


def volume_unset(dbg: str, sr: str, key: str, k: str) -> None:
    """Forget key ``k`` (absent already: nothing to do)."""
    with _changing(sr) as s:
        record = s.visible(key)
        if k in record.keys:
            s.save(record._replace(keys={a: b for a, b in record.keys.items() if a != k}))


def volume_set_name(dbg: str, sr: str, key: str, new_name: str) -> None:
    """Rename the volume."""
    _update(sr, key, name=_text(new_name, "name"))


def volume_set_description(dbg: str, sr: str, key: str, new_description: str) -> None:
    """Describe the volume."""
    _update(sr, key, description=_text(new_description, "description"))


def volume_snapshot(dbg: str, sr: str, key: str) -> Dict[str, Any]:
    """A read-only volume of ``key``'s content at this instant, also while
    a guest writes to it (through its storage daemon)."""
    with _changing(sr) as s:
        return _volume(s, snapshots.snapshot(s, key))


def volume_clone(dbg: str, sr: str, key: str) -> Dict[str, Any]:
    """A new writable volume with ``key``'s content at this instant."""
    with _changing(sr) as s:
        return _volume(s, snapshots.clone(s, key))


def volume_resize(dbg: str, sr: str, key: str, new_size: int) -> None:
    """Grow the volume while nothing serves it; shrinking is refused."""
    new_size = _size(new_size)
    with _changing(sr) as s:
        record = s.visible(key)
        if record.kind != "disk":
            raise InvalidArguments("volume %s is a read-only snapshot: it cannot be resized" % key)
        if new_size < record.virtual_size:
            raise InvalidArguments("volume %s is %d bytes: shrinking it to %d would lose data"
                                   % (key, record.virtual_size, new_size))
        if new_size == record.virtual_size:
            return
        with Served(s.uri(record)) as served:
            if served.daemon is not None:
                raise VolumeInUse("volume %s is attached: its export's size is fixed while served; resize it "
                                  "with its VM halted" % key)
            images.resize(s.file(record.image), new_size)
        s.save(record._replace(virtual_size=new_size))


def volume_destroy(dbg: str, sr: str, key: str) -> None:
    """Destroy the volume (already gone: nothing to do). A disk in use is
    refused; a snapshot that a disk stands on is merged into it by a task."""
    with _changing(sr) as s:
        try:
            record = s.visible(key)
        except VolumeDoesNotExist:
            return
        if record.kind == "disk":
            with Served(s.uri(record)) as served:
                if served.daemon is not None:
                    raise VolumeInUse("volume %s is attached: detach it before destroying it" % key)
                s.save(record._replace(state="destroyed"))
                os.unlink(s.link(key))
                os.unlink(s.file(record.image))  # a disk's image is a leaf: nothing stands on it
        else:
            s.save(record._replace(state="destroyed"))
        merge = coalesce.collect(s)
    if merge:
        coalesce.start(dbg, sr)
