"""Task state: a small closed type and the table of allowed transitions.

A task is ``Pending(progress)``, ``Completed(duration, result)`` or
``Failed(message)``; each gives its wire value (``to_wire``, read back by
:func:`from_wire`) and its Data status (``status``). Only :func:`xapi_storage_tasks.tasks.store.Store.transition` applies
transitions, and it asks :func:`check` first.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from typing import Any


class State:
    """Base of the three states; not instantiated directly."""

    __slots__ = ()
    terminal = False

    def _key(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def to_wire(self) -> list[Any]:
        """The wire value: ``Pending(0.5)`` -> ``["Pending", 0.5]`` and so on."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """Data.stat's ``{failed, complete, progress}``.

        ``complete`` is true only for Completed and ``failed`` only for
        Failed, so a failed task never claims ``complete`` (the toolstack
        checks it first). ``progress`` is a float while Pending (1.0 once
        Completed) and is left out of a Failed task's status (the
        interface's option: the key omitted, never null): a failed
        operation has no progress to report, and answering 0.0 would make
        its progress go back.
        """
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def __repr__(self) -> str:
        return "%s%r" % (type(self).__name__, self._key())


class Pending(State):
    """Running; ``progress`` is a float in [0, 1]."""

    __slots__ = ("progress",)

    def __init__(self, progress: float = 0.0) -> None:
        progress = float(progress)
        if not math.isfinite(progress):
            raise ValueError("progress must be a finite number")
        self.progress = min(1.0, max(0.0, progress))

    def _key(self) -> tuple[Any, ...]:
        return (self.progress,)

    def to_wire(self) -> list[Any]:
        return ["Pending", float(self.progress)]

    def status(self) -> dict[str, Any]:
        return {"failed": False, "complete": False, "progress": float(self.progress)}


class Completed(State):
    """Finished successfully after ``duration`` seconds.

    ``result`` is the operation's async result as its wire value (e.g.
    ``["UnitResult", None]``) or None when the operation reports none.
    """

    __slots__ = ("duration", "result")
    terminal = True

    def __init__(self, duration: float, result: Any = None) -> None:
        duration = float(duration)
        if not math.isfinite(duration) or duration < 0:
            raise ValueError("duration must be a non-negative number")
        self.duration = duration
        self.result = result

    def _key(self) -> tuple[Any, ...]:
        return (self.duration, repr(self.result))

    def to_wire(self) -> list[Any]:
        completion: dict[str, Any] = {"duration": float(self.duration)}
        if self.result is not None:
            completion["result"] = self.result
        return ["Completed", completion]

    def status(self) -> dict[str, Any]:
        return {"failed": False, "complete": True, "progress": 1.0}


class Failed(State):
    """Finished unsuccessfully; ``message`` says why (``Cancelled`` for a
    cancelled task)."""

    __slots__ = ("message",)
    terminal = True

    def __init__(self, message: object) -> None:
        self.message = str(message)

    def _key(self) -> tuple[Any, ...]:
        return (self.message,)

    def to_wire(self) -> list[Any]:
        return ["Failed", self.message]

    def status(self) -> dict[str, Any]:
        return {"failed": True, "complete": False}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def from_wire(value: object) -> State:
    """Inverse of ``to_wire``; tags are matched case-insensitively as the
    OCaml reader does. Raises ValueError on anything else."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        raise ValueError("state is not a [tag, contents] pair")
    tag, contents = value[0].lower(), value[1]
    if tag == "pending" and _is_number(contents):
        return Pending(contents)
    if tag == "completed" and isinstance(contents, dict) and _is_number(contents.get("duration")):
        return Completed(contents["duration"], contents.get("result"))
    if tag == "failed" and isinstance(contents, str):
        return Failed(contents)
    raise ValueError("unknown task state %r" % (value,))


CANCELLED = "Cancelled"

# The only transitions there are: a finished task never changes again.
ALLOWED = frozenset(
    {
        (Pending, Pending),
        (Pending, Completed),
        (Pending, Failed),
    }
)


class TransitionRefused(Exception):
    """The transition is not in :data:`ALLOWED`."""


def check(old: State, new: State) -> State:
    """Return the state to store for ``old -> new`` or raise
    :class:`TransitionRefused`.

    Progress never goes backwards: a lower progress keeps the old value.
    """
    if (type(old), type(new)) not in ALLOWED:
        raise TransitionRefused(
            "%s -> %s is not allowed" % (type(old).__name__, type(new).__name__)
        )
    if isinstance(new, Pending) and isinstance(old, Pending) and new.progress < old.progress:
        return old
    return new
