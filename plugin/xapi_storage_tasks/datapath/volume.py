"""Per-volume durable state: which domains have the volume attached or
active, and which mirror runs on it.

One directory, ``volumes/`` in the state directory (opened through the
store, so never via a symlink), holds for the volume with key ``K``::

    K.json          the volume record (below), replaced atomically
    K.lock          flock serialising every call on the volume
    K.qsd           the storage daemon's record (see datapath.qsd)
    K.pid K.log     qemu-storage-daemon's pidfile and stderr
    K.nbd K.qmp K.ctl   its NBD socket and two QMP sockets
    K.detach.H      a detach queued because the volume was busy
    K.rNNNNNN       the listening socket of a mirror's relay (datapath.relay)

The record is plain versioned JSON::

    {"version": 1, "uri": "raw+file:///srv/a.raw", "path": "/srv/a.raw",
     "driver": "raw", "domains": {"7": "rw", "u0_mirror_vbd_7_xvda": "attached"},
     "mirror": {"task": "<id>", "domain": "7", "job": "mirror-...", "node": "target-..."}}

A domain maps to ``attached``, ``rw`` (active) or ``ro`` (active
read-only). Files are read and written as the store's are
(:mod:`xapi_storage_tasks.files.jsonfile`), so a reader sees the old record
or the new one whatever instant a writer dies at; the temporaries of
writers killed midway are swept by the next call.
"""

import hashlib
import os
import time
from typing import Any, Dict, List, NamedTuple, Optional

from xapi_storage_tasks import settings
from xapi_storage_tasks.datapath.schemes import Volume
from xapi_storage_tasks.files import jsonfile
from xapi_storage_tasks.files.lock import Held
from xapi_storage_tasks.tasks.store import Store
from xapi_storage_tasks.wire.errors import InternalError, InvalidArguments, VolumeBusy

VERSION = 1
DIR = "volumes"
DEFAULT_LOCK_WAIT = 30.0
MAX_RECORD = 1 << 20
MAX_DOMAIN = 256
STATES = ("attached", "rw", "ro")


def canonical(path: str) -> str:
    """The one spelling of a volume's path: its directory's real path and
    its own name. The name itself is not resolved: it may be a symbolic
    link whose target changes while the volume is in use (the volume
    plugin's disks are such names: a snapshot puts a new image under
    them)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def key_of(path: str) -> str:
    """The volume's key: a digest of its :func:`canonical` path, so two URIs
    naming one volume share one record and one daemon. Short, hex: it
    names sockets, whose paths must stay short and free of ``:``."""
    return hashlib.sha256(canonical(path).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def check_domain(domain: str) -> str:
    """A domain is opaque to us, but must be a sane non-empty string."""
    if not domain or len(domain) > MAX_DOMAIN or not domain.isprintable():
        raise InvalidArguments("parameter 'domain' must be 1 to %d printable characters" % MAX_DOMAIN)
    return domain


class Mirror(NamedTuple):
    """The mirror named by a volume's record: its task, the guest domain it
    serves, the job, the target node and the relay's socket name."""

    task: str
    domain: str
    job: str
    node: str

    @classmethod
    def new(cls, task: str, domain: str) -> "Mirror":
        """The names of a new mirror (unique per volume and start)."""
        suffix = "%x" % time.time_ns()
        return cls(task, domain, "mirror-" + suffix, "target-" + suffix)

    @property
    def relay(self) -> str:
        """The suffix of the relay's socket in the volume's directory:
        short (socket paths are) and unique per mirror."""
        return "r" + self.job[-6:]

    def to_disk(self) -> Dict[str, str]:
        """The JSON object stored in the volume's record."""
        return self._asdict()

    @classmethod
    def from_disk(cls, obj: Any) -> "Mirror":
        """Parse a record's mirror; ValueError if it is malformed."""
        if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in cls._fields)):
            raise ValueError("field 'mirror' is mistyped")
        return cls(*(obj[k] for k in cls._fields))


class Record:
    """The durable state of one volume."""

    def __init__(self, key: str, uri: str, path: str, driver: str,
                 domains: Optional[Dict[str, str]] = None, mirror: Optional[Mirror] = None) -> None:
        self.key, self.uri, self.path, self.driver = key, uri, path, driver
        self.domains: Dict[str, str] = dict(domains or {})
        self.mirror = mirror

    @classmethod
    def new(cls, vol: Volume) -> "Record":
        """A record with no domains for a parsed volume URI."""
        return cls(key_of(vol.path), vol.uri, vol.path, vol.driver)

    def to_disk(self) -> Dict[str, Any]:
        """The JSON object written to ``K.json``."""
        return {"version": VERSION, "key": self.key, "uri": self.uri, "path": self.path, "driver": self.driver,
                "domains": self.domains, "mirror": self.mirror.to_disk() if self.mirror else None, "updated": time.time()}

    @classmethod
    def from_disk(cls, obj: Any) -> "Record":
        """Parse a record; raise ValueError naming what is wrong."""
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise ValueError("not a version %d volume record" % VERSION)
        for name in ("key", "uri", "path", "driver"):
            if not isinstance(obj.get(name), str):
                raise ValueError("field %r is missing or mistyped" % name)
        domains = obj.get("domains")
        if not isinstance(domains, dict) or not all(isinstance(v, str) and v in STATES for v in domains.values()):
            raise ValueError("field 'domains' is mistyped")
        mirror = obj.get("mirror")
        return cls(obj["key"], obj["uri"], obj["path"], obj["driver"], domains,
                   None if mirror is None else Mirror.from_disk(mirror))


class Volumes:
    """The ``volumes/`` directory of a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fd: int = store.dir_fd(DIR)
        self.path = os.path.join(store.path, DIR)
        jsonfile.sweep(self.fd)

    def file(self, key: str, suffix: str) -> str:
        """The absolute path of ``K.suffix`` (for qemu-storage-daemon)."""
        return os.path.join(self.path, key + "." + suffix)

    def keys(self) -> List[str]:
        """Every volume with a record, or a daemon record, sorted."""
        found = set()
        for name in os.listdir(self.fd):
            stem, _, suffix = name.partition(".")
            if suffix in ("json", "qsd"):
                found.add(stem)
        return sorted(found)

    def locked(self, key: str, wait: Optional[float] = None) -> Held:
        """``with vols.locked(key):`` holds the volume's lock; waits at
        most ``wait`` seconds (default: the setting), then VolumeBusy."""
        wait = settings.seconds(settings.DATAPATH_LOCK_WAIT, DEFAULT_LOCK_WAIT) if wait is None else wait
        why = "another call on volume %s held it for more than %.0fs; try again" % (key, wait)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return Held(lambda: os.open(key + ".lock", flags, 0o600, dir_fd=self.fd), wait, lambda: VolumeBusy(why),
                    cap=0.05)

    def release(self, key: str) -> None:
        """Under the lock of a volume nobody uses any more: remove its lock
        file (a waiter notices and takes a fresh one), so nothing is left."""
        self.unlink(key + ".lock")

    def read_json(self, name: str) -> Any:
        """The JSON in file ``name`` of the directory, or None if absent;
        raise InternalError if it is unreadable."""
        try:
            return jsonfile.read_json(name, self.fd, MAX_RECORD)
        except FileNotFoundError:
            return None
        except jsonfile.Unreadable as e:
            raise InternalError("%s in %s is unreadable: %s" % (name, self.path, e)) from None

    def write_json(self, name: str, obj: Any) -> None:
        """Replace file ``name`` atomically and durably with ``obj``."""
        try:
            jsonfile.write_json(obj, name, self.fd, self.fd)
        except OSError as e:
            raise InternalError("cannot write %s in %s: %s" % (name, self.path, e.strerror or e)) from None

    def unlink(self, name: str) -> None:
        """Remove file ``name`` if it exists."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise InternalError("cannot remove %s in %s: %s" % (name, self.path, e.strerror)) from None

    def load(self, key: str) -> Optional[Record]:
        """The volume's record, or None."""
        obj = self.read_json(key + ".json")
        if obj is None:
            return None
        try:
            record = Record.from_disk(obj)
        except ValueError as e:
            raise InternalError("volume record %s.json is unreadable: %s" % (key, e)) from None
        return record

    def save(self, record: Record) -> None:
        """Write the record; a record with no domain and no mirror is
        removed instead (nothing grows without bound)."""
        if not record.domains and record.mirror is None:
            self.unlink(record.key + ".json")
            os.fsync(self.fd)
        else:
            self.write_json(record.key + ".json", record.to_disk())

    # -- queued detaches ---------------------------------------------------

    def queue_detach(self, key: str, domain: str) -> None:
        """Durably note that ``domain`` must be detached from volume ``key``."""
        digest = hashlib.sha256(domain.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        self.write_json("%s.detach.%s" % (key, digest), {"version": VERSION, "domain": domain})

    def queued_detaches(self, key: str) -> List[str]:
        """The names of the queued detach files of volume ``key``."""
        prefix = key + ".detach."
        return sorted(n for n in os.listdir(self.fd) if n.startswith(prefix) and not jsonfile.is_temporary(n))
