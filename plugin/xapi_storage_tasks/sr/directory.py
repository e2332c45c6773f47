"""An SR's directory, its records and its lock.

An SR is a directory on any mounted filesystem::

    <path>/<uuid>.qcow2              a disk's name, for ever: a symbolic link
                                     to its current image (its URI)
    <path>/<uuid>.<n>.qcow2          the images: a disk's n-th, which later
                                     holds a snapshot's or a base's content
    <path>/.sr/sr.json               the SR record
    <path>/.sr/lock                  the SR's lock (every change of records)
    <path>/.sr/volumes/<uuid>.json   one record per volume or base

Every image lives beside the others, so a backing file is a plain name in
the same directory (the datapath opens only such chains); an image is
never renamed, so what a storage daemon has open keeps its name (QEMU
reopens images by name). Records are plain versioned JSON, written
atomically (:mod:`xapi_storage_tasks.files.jsonfile`), each naming its
image. A volume's key, for the toolstack, is its record's uuid.

Kinds of record:

- ``disk``: a writable volume. Its name (the link) never changes, whatever
  snapshots are taken: a snapshot leaves the frozen content in the image
  it is in and points the link at a new, empty image on top of it.
- ``snapshot``: a read-only volume, the frozen content of a disk; its URI
  names its image.
- ``base``: a frozen image that children still stand on but the toolstack
  does not see (the content a clone of a running disk was taken from; a
  destroyed snapshot not yet merged into its child).

A record in state ``creating`` is an intent: the operation that wrote it
finishes or undoes it after a crash (:mod:`xapi_storage_tasks.volume.snapshots`).
A ``destroyed`` one is gone for the toolstack, its image kept until no
other image stands on it.
"""

import os
import re
import time
import urllib.parse
import uuid as uuidlib
from typing import Any, Dict, List, NamedTuple, Optional

from xapi_storage_tasks import settings
from xapi_storage_tasks.files import jsonfile
from xapi_storage_tasks.files.lock import Held
from xapi_storage_tasks.sr import chain
from xapi_storage_tasks.wire.errors import InternalError, InvalidArguments, SRDoesNotExist, VolumeBusy, VolumeDoesNotExist

VERSION = 1
ADMIN = ".sr"
TYPE = "qcow2-file"  # the SR type: xe sr-create type=qcow2-file
SCHEME = "qcow2+file"  # the datapath serving its images
KINDS = ("disk", "snapshot", "base")
STATES = ("creating", "ready", "destroyed")
MAX_RECORD = 1 << 20
LOCK_WAIT = 30.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_IMAGE = re.compile(_UUID.pattern + r"\.([0-9]{1,9})\.qcow2")


def image_name(key: str, n: int) -> str:
    """The name of disk ``key``'s ``n``-th image."""
    return "%s.%d.qcow2" % (key, n)


def next_image(name: str) -> str:
    """The name of the image that follows ``name`` for the same disk."""
    match = _IMAGE.fullmatch(name)
    assert match is not None
    return image_name(name[:36], int(match.group(1)) + 1)


def new_uuid() -> str:
    """A fresh volume uuid."""
    return str(uuidlib.uuid4())


class SRRecord(NamedTuple):
    """What the SR itself keeps: the toolstack's uuid, its name and description."""

    uuid: str
    name: str
    description: str
    created: float

    def to_json(self) -> Dict[str, Any]:
        """The object in ``.sr/sr.json``."""
        return dict(self._asdict(), version=VERSION, type=TYPE)

    @classmethod
    def from_json(cls, obj: Any) -> "SRRecord":
        """Parse ``.sr/sr.json``; ValueError if malformed."""
        if not isinstance(obj, dict) or obj.get("version") != VERSION or obj.get("type") != TYPE:
            raise ValueError("not a version %d %s SR record" % (VERSION, TYPE))
        return cls(str(obj.get("uuid", "")), str(obj.get("name", "")), str(obj.get("description", "")),
                   float(obj.get("created", 0.0)))


class VolumeRecord(NamedTuple):
    """One image of the SR and what the toolstack knows of it."""

    uuid: str
    kind: str
    state: str
    name: str = ""
    description: str = ""
    sharable: bool = False
    virtual_size: int = 0
    keys: Dict[str, str] = {}
    parent: Optional[str] = None  # a snapshot's or base's disk; for a creating record, the disk it is taken of
    created: float = 0.0
    image: str = ""  # the file name of its image (a disk's: the current one)
    merge_into: Optional[str] = None  # the image being made to stand on this one's backing (see volume.coalesce)

    @property
    def read_write(self) -> bool:
        """Only a disk is writable."""
        return self.kind == "disk"

    def to_json(self) -> Dict[str, Any]:
        """The object in ``.sr/volumes/<uuid>.json``."""
        return dict(self._asdict(), version=VERSION)

    @classmethod
    def from_json(cls, obj: Any) -> "VolumeRecord":
        """Parse a record; ValueError naming what is wrong."""
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError("not a version %d volume record" % VERSION)
        if obj.get("kind") not in KINDS or obj.get("state") not in STATES or not isinstance(obj.get("uuid"), str):
            raise ValueError("kind, state or uuid missing or mistyped")
        keys = obj.get("keys") or {}
        if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise ValueError("keys mistyped")
        parent, image, merge_into = obj.get("parent"), obj.get("image"), obj.get("merge_into")
        for name in (image, merge_into):
            if name is not None and not (isinstance(name, str) and _IMAGE.fullmatch(name)):
                raise ValueError("%r is not an image name" % (name,))
        if image is None:
            raise ValueError("image missing")
        return cls(obj["uuid"], obj["kind"], obj["state"], str(obj.get("name", "")), str(obj.get("description", "")),
                   bool(obj.get("sharable")), int(obj.get("virtual_size", 0)), dict(keys),
                   parent if isinstance(parent, str) else None, float(obj.get("created", 0.0)), image, merge_into)


class SR:
    """An SR directory of this plugin (see the module docstring). Use as a
    context manager (it holds directory descriptors)."""

    def __init__(self, path: str) -> None:
        if not isinstance(path, str) or not os.path.isabs(path) or os.path.normpath(path) != path:
            raise SRDoesNotExist("%r is not an SR of this plugin (an absolute directory path)" % (path,))
        self.path = path
        self._fds: List[int] = []
        try:
            self.root = self._open(path)
            self.admin = self._open_at(ADMIN, self.root)
            self.volumes = self._open_at("volumes", self.admin)
        except FileNotFoundError:
            self.close()
            raise SRDoesNotExist("%s is not an SR of this plugin (no %s/)" % (path, ADMIN)) from None
        except OSError as e:
            self.close()
            raise SRDoesNotExist("%s is not a usable SR: %s" % (path, e.strerror or e)) from None

    def _open(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _open_at(self, name: str, dir_fd: int) -> int:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Release the directory descriptors."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "SR":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def create(cls, path: str, record: SRRecord) -> "SR":
        """Make ``path`` (an existing, writable directory that is no SR yet)
        an SR; its records directory appears last, whole, so a crash midway
        leaves a directory that is not (yet) an SR."""
        if not os.path.isdir(path) or os.path.islink(path):
            raise InvalidArguments("device-config:path %s is not a directory" % path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise InvalidArguments("device-config:path %s is not writable" % path)
        if os.path.lexists(os.path.join(path, ADMIN)):
            raise InvalidArguments("%s is already an SR (it has %s/): destroy that one first" % (path, ADMIN))
        staging = os.path.join(path, ".sr.new-%s" % os.urandom(4).hex())
        os.mkdir(staging, 0o700)
        try:
            os.mkdir(os.path.join(staging, "volumes"), 0o700)
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                jsonfile.write_json(record.to_json(), "sr.json", fd, fd)
            finally:
                os.close(fd)
            os.rename(staging, os.path.join(path, ADMIN))
        except BaseException:
            _remove_tree(staging)
            raise
        _fsync_dir(path)
        return cls(path)

    def destroy(self) -> None:
        """Remove the SR's records and lock (the images must be gone)."""
        _remove_tree(os.path.join(self.path, ADMIN))
        _fsync_dir(self.path)

    def locked(self, wait: Optional[float] = None) -> Held:
        """``with sr.locked():`` hold the SR's lock (bounded wait, then
        Volume_busy)."""
        wait = settings.seconds(settings.DATAPATH_LOCK_WAIT, LOCK_WAIT) if wait is None else wait

        def open_file() -> int:
            return os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.admin)

        return Held(open_file, wait, lambda: VolumeBusy("another call held SR %s for more than %.0fs" % (self.path, wait)),
                    cap=0.05)

    # -- records ------------------------------------------------------------------

    def record(self) -> SRRecord:
        """The SR record."""
        try:
            return SRRecord.from_json(jsonfile.read_json("sr.json", self.admin, MAX_RECORD))
        except (OSError, ValueError) as e:
            raise InternalError("the SR record of %s is unreadable: %s" % (self.path, e)) from None

    def save_record(self, record: SRRecord) -> None:
        """Replace the SR record."""
        jsonfile.write_json(record.to_json(), "sr.json", self.admin, self.admin)

    def load(self, key: str) -> VolumeRecord:
        """The record of volume ``key``; Volume_does_not_exist if there is none."""
        if not isinstance(key, str) or not _UUID.fullmatch(key):
            raise VolumeDoesNotExist("no volume %r in SR %s" % (key, self.path))
        try:
            return VolumeRecord.from_json(jsonfile.read_json(key + ".json", self.volumes, MAX_RECORD))
        except FileNotFoundError:
            raise VolumeDoesNotExist("no volume %s in SR %s" % (key, self.path)) from None
        except (OSError, ValueError) as e:
            raise InternalError("the record of volume %s in %s is unreadable: %s" % (key, self.path, e)) from None

    def visible(self, key: str) -> VolumeRecord:
        """The record of a volume the toolstack sees (ready disk or snapshot)."""
        record = self.load(key)
        if record.state != "ready" or record.kind == "base":
            raise VolumeDoesNotExist("no volume %s in SR %s" % (key, self.path))
        return record

    def save(self, record: VolumeRecord) -> None:
        """Write a volume record, durably."""
        jsonfile.write_json(record.to_json(), record.uuid + ".json", self.volumes, self.volumes)

    def forget(self, key: str) -> None:
        """Remove a volume record (its image is gone)."""
        try:
            os.unlink(key + ".json", dir_fd=self.volumes)
        except FileNotFoundError:
            return
        os.fsync(self.volumes)

    def records(self) -> List[VolumeRecord]:
        """Every record, unreadable ones skipped (a half-written record cannot
        exist: writes are atomic)."""
        out = []
        for name in sorted(os.listdir(self.volumes)):
            if name.endswith(".json") and _UUID.fullmatch(name[:-5]):
                try:
                    out.append(self.load(name[:-5]))
                except (VolumeDoesNotExist, InternalError):
                    continue
        return out

    # -- images ---------------------------------------------------------------------

    def file(self, name: str) -> str:
        """The path of the file ``name`` of the SR."""
        return os.path.join(self.path, name)

    def link(self, key: str) -> str:
        """The path of disk ``key``'s name (a link to its current image)."""
        return os.path.join(self.path, key + ".qcow2")

    def uri(self, record: VolumeRecord) -> str:
        """The datapath URI of a volume: a disk's name (it never changes),
        a snapshot's image (it never changes either)."""
        path = self.link(record.uuid) if record.kind == "disk" else self.file(record.image)
        return "%s://%s" % (SCHEME, urllib.parse.quote(path))

    def point(self, key: str, image: str) -> None:
        """Make disk ``key``'s name point at ``image``, atomically and durably
        (a new link renamed over the old one)."""
        tmp = "%s.link-%s" % (key, os.urandom(4).hex())
        os.symlink(image, tmp, dir_fd=self.root)
        try:
            os.rename(tmp, key + ".qcow2", src_dir_fd=self.root, dst_dir_fd=self.root)
        except BaseException:
            os.unlink(tmp, dir_fd=self.root)
            raise
        os.fsync(self.root)

    def current(self, key: str) -> Optional[str]:
        """The image disk ``key``'s name points at now, or None."""
        try:
            return os.readlink(key + ".qcow2", dir_fd=self.root)
        except FileNotFoundError:
            return None

    def backing(self, record: VolumeRecord, images: Optional[Dict[str, VolumeRecord]] = None) -> Optional[VolumeRecord]:
        """The record whose image ``record``'s image stands on, or None."""
        name = chain.backing_of(self.file(record.image))
        if name is None:
            return None
        found = (images if images is not None else self.images()).get(name)
        if found is None:
            raise InternalError("image %s stands on %r, which no record of SR %s names" % (record.image, name, self.path))
        return found

    def images(self) -> Dict[str, VolumeRecord]:
        """Every settled record by the name of its image."""
        return {r.image: r for r in self.records() if r.state != "creating"}

    def standing(self) -> Dict[str, Optional[str]]:
        """Every settled record's image and the image it stands on (each
        header read once)."""
        out: Dict[str, Optional[str]] = {}
        for name in self.images():
            if os.path.exists(self.file(name)):
                out[name] = chain.backing_of(self.file(name))
        return out

    def children(self, record: VolumeRecord, standing: Optional[Dict[str, Optional[str]]] = None) -> List[VolumeRecord]:
        """The settled records whose images stand directly on ``record``'s."""
        standing = self.standing() if standing is None else standing
        images = self.images()
        return [images[name] for name, below in standing.items() if below == record.image and name != record.image]


def now() -> float:
    """The time records carry."""
    return time.time()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """Remove a records directory this plugin made (only plain files and
    directories; nothing followed)."""
    if not os.path.lexists(path):
        return
    for top, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(top, name))
        for name in dirs:
            os.rmdir(os.path.join(top, name))
    os.rmdir(path)
