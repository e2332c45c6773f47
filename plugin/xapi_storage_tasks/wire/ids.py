"""Task ids: time-ordered UUIDs.

Ids are UUIDv7 strings (RFC 9562) whose 12 ``rand_a`` bits carry the
sub-millisecond fraction of the creation time ("method 3"). Their text
therefore sorts in creation order, which lets ``Task.ls`` list tasks
oldest-first from directory names alone, without opening any file.
"""

from __future__ import annotations

import os
import time

_HEX = frozenset("0123456789abcdef")
_DASHES = (8, 13, 18, 23)
LENGTH = 36


def new_id(now_ns: int | None = None) -> str:
    """Return a fresh id for a task created at ``now_ns`` (default: now)."""
    if now_ns is None:
        now_ns = time.time_ns()
    ms, sub_ns = divmod(now_ns, 1_000_000)
    frac = sub_ns * 4096 // 1_000_000
    rand = int.from_bytes(os.urandom(8), "big")
    value = (
        (ms & (2**48 - 1)) << 80
        | 0x7 << 76
        | frac << 64
        | 0b10 << 62
        | rand & (2**62 - 1)
    )
    h = "%032x" % value
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def is_valid(text: object) -> bool:
    """True when ``text`` is a canonical lowercase UUID (any version).

    The check is strict on purpose: ids become file names, so nothing that
    could name another path (``..``, ``/``, NUL) can pass.
    """
    if not isinstance(text, str) or len(text) != LENGTH:
        return False
    for i, ch in enumerate(text):
        if i in _DASHES:
            if ch != "-":
                return False
        elif ch not in _HEX:
            return False
    return True
