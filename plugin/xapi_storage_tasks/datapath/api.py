"""The Plugin and Datapath interfaces: ``Plugin.Query``,
``Plugin.diagnostics``, ``Datapath.attach/activate/activate_readonly/
deactivate/detach``.

This module imports nothing at import time: the registry refers to these
functions directly, so every executable imports this module whichever
method it runs. Each function imports the datapath machinery
(:mod:`xapi_storage_tasks.datapath.service`) when it is called.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def query(dbg: str) -> dict[str, Any]:
    """The registration record the toolstack requires (every field)."""
    from xapi_storage_tasks.datapath import service

    return service.query(dbg)


def diagnostics(dbg: str) -> str:
    """A readable dump of the volumes in use, their storage daemons and the
    running mirrors."""
    from xapi_storage_tasks.datapath import service

    return service.diagnostics(dbg)


def attach(dbg: str, uri: str, domain: str) -> dict[str, Any]:
    """Attach the volume for ``domain`` (starting its storage daemon at the
    first attach); answers its NBD implementation."""
    from xapi_storage_tasks.datapath import service

    return service.attach(dbg, uri, domain)


def activate(dbg: str, uri: str, domain: str) -> None:
    """Make the volume active (read-write) for ``domain``."""
    from xapi_storage_tasks.datapath import service

    service.activate(dbg, uri, domain)


def activate_readonly(dbg: str, uri: str, domain: str) -> None:
    """Make the volume active (read-only) for ``domain``."""
    from xapi_storage_tasks.datapath import service

    service.activate_readonly(dbg, uri, domain)


def deactivate(dbg: str, uri: str, domain: str) -> None:
    """Drain ``domain``'s mirror if one runs (bounded), flush, and make the
    volume inactive for ``domain``."""
    from xapi_storage_tasks.datapath import service

    service.deactivate(dbg, uri, domain)


def detach(dbg: str, uri: str, domain: str) -> None:
    """Detach the volume from ``domain``; never fails (what cannot be done
    now is queued and finished later)."""
    from xapi_storage_tasks.datapath import service

    service.detach(dbg, uri, domain)
