"""The task record as stored on disk: the wire fields plus private ones.

One plain, versioned JSON object per task (never pickle):

``version``      format version (:data:`VERSION`)
``id``, ``debug_info``, ``ctime``, ``state``   the wire record
``updated``      time of the last write; a worker's heartbeat
``operation``    what the task runs, e.g. ``{"kind": "CopyV1", "args": {...}}``
``worker``       the worker's identity (see :mod:`xapi_storage_tasks.process.identity`) or null
``cancel``       time a cancel was requested, or null
``artifacts``    paths the operation may create and that must be removed
                 if it does not complete (declared before they exist)
``created``      ``{path: [device, inode]}``: the identity of each declared
                 artifact the operation has actually created. Cleanup
                 removes a path only while it still holds that very file: a
                 declared path never recorded here, or holding another file
                 (someone else's, made after the worker died), is left alone.
                 Optional on read (older files have none).
"""

from __future__ import annotations

from xapi_storage_tasks.tasks.state import from_wire

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Iterable
    from typing import Any

    from xapi_storage_tasks.tasks.state import State

VERSION = 1


class Task:
    """One task; ``state`` is a :mod:`xapi_storage_tasks.tasks.state` value."""

    __slots__ = (
        "id",
        "debug_info",
        "ctime",
        "state",
        "updated",
        "operation",
        "worker",
        "cancel",
        "artifacts",
        "created",
    )

    def __init__(self, id: str, debug_info: str, ctime: float, state: State, updated: float | None = None,
                 operation: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                 cancel: float | None = None, artifacts: Iterable[str] = (),
                 created: dict[str, list[int]] | None = None) -> None:
        self.id = id
        self.debug_info = debug_info
        self.ctime = float(ctime)
        self.state = state
        self.updated = float(ctime if updated is None else updated)
        self.operation = operation
        self.worker = worker
        self.cancel = cancel
        self.artifacts = list(artifacts)
        self.created = dict(created or {})

    @property
    def kind(self) -> str | None:
        """The operation's kind (``"CopyV1"``...) or None for a plain task."""
        return self.operation.get("kind") if self.operation else None

    def to_wire(self) -> dict[str, Any]:
        """The wire ``task`` record: ``{id, debug_info, ctime, state}``."""
        return {"id": self.id, "debug_info": self.debug_info, "ctime": float(self.ctime),
                "state": self.state.to_wire()}

    def to_disk(self) -> dict[str, Any]:
        """The JSON object written to the task's file."""
        return {
            "version": VERSION,
            "id": self.id,
            "debug_info": self.debug_info,
            "ctime": self.ctime,
            "state": self.state.to_wire(),
            "updated": self.updated,
            "operation": self.operation,
            "worker": self.worker,
            "cancel": self.cancel,
            "artifacts": self.artifacts,
            "created": self.created,
        }

    @classmethod
    def from_disk(cls, obj: object) -> Task:
        """Parse a task file's JSON; raises ValueError naming what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("version") != VERSION:
            raise ValueError("unsupported format version %r" % (obj.get("version"),))
        for key, types in (("id", str), ("debug_info", str), ("ctime", (int, float)),
                           ("updated", (int, float)), ("artifacts", list)):
            if not isinstance(obj.get(key), types):
                raise ValueError("field %r is missing or mistyped" % key)
        for key in ("operation", "worker"):
            if obj.get(key) is not None and not isinstance(obj[key], dict):
                raise ValueError("field %r is mistyped" % key)
        if not all(isinstance(a, str) for a in obj["artifacts"]):
            raise ValueError("field 'artifacts' must hold paths")
        created = obj.get("created", {})
        if not isinstance(created, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(type(n) is int for n in v) for v in created.values()
        ):
            raise ValueError("field 'created' must map paths to [device, inode]")
        return cls(
            obj["id"],
            obj["debug_info"],
            obj["ctime"],
            from_wire(obj.get("state")),
            updated=obj["updated"],
            operation=obj.get("operation"),
            worker=obj.get("worker"),
            cancel=obj.get("cancel"),
            artifacts=obj["artifacts"],
            created=created,
        )
