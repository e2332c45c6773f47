"""Task state: a small closed type and the table of allowed transitions.

A task is ``Pending(progress)``, ``Completed(duration, result)`` or
``Failed(message)``. Only :func:`xapi_storage_tasks.tasks.store.Store.transition` applies
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


class Failed(State):
    """Finished unsuccessfully; ``message`` says why (``Cancelled`` for a
    cancelled task)."""

    __slots__ = ("message",)
    terminal = True

    def __init__(self, message: object) -> None:
        self.message = str(message)

    def _key(self) -> tuple[Any, ...]:
        return (self.message,)


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
