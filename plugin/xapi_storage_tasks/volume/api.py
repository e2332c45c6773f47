"""The volume plugin's interface: ``SR.*`` and ``Volume.*``.

This module imports nothing at import time (the registry refers to these
functions, so every executable imports it); each function imports
:mod:`xapi_storage_tasks.volume.service` when it is called.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def sr_probe(dbg: str, configuration: dict[str, str]) -> list[dict[str, Any]]:
    """The SR found at ``configuration['path']``, or where one can be made."""
    from xapi_storage_tasks.volume import service

    return service.sr_probe(dbg, configuration)


def sr_create(dbg: str, uuid: str, configuration: dict[str, str], name: str, description: str) -> dict[str, str]:
    """Make the directory an SR; answers the configuration to keep."""
    from xapi_storage_tasks.volume import service

    return service.sr_create(dbg, uuid, configuration, name, description)


def sr_attach(dbg: str, configuration: dict[str, str]) -> str:
    """The SR's handle; idempotent."""
    from xapi_storage_tasks.volume import service

    return service.sr_attach(dbg, configuration)


def sr_detach(dbg: str, sr: str) -> None:
    """Detach the SR (nothing is kept open)."""
    from xapi_storage_tasks.volume import service

    service.sr_detach(dbg, sr)


def sr_destroy(dbg: str, sr: str) -> None:
    """Destroy the (empty) SR's records."""
    from xapi_storage_tasks.volume import service

    service.sr_destroy(dbg, sr)


def sr_stat(dbg: str, sr: str) -> dict[str, Any]:
    """Space, name and health of the SR."""
    from xapi_storage_tasks.volume import service

    return service.sr_stat(dbg, sr)


def sr_ls(dbg: str, sr: str) -> list[dict[str, Any]]:
    """Every volume, with its keys."""
    from xapi_storage_tasks.volume import service

    return service.sr_ls(dbg, sr)


def sr_set_name(dbg: str, sr: str, new_name: str) -> None:
    """Rename the SR."""
    from xapi_storage_tasks.volume import service

    service.sr_set_name(dbg, sr, new_name)


def sr_set_description(dbg: str, sr: str, new_description: str) -> None:
    """Describe the SR."""
    from xapi_storage_tasks.volume import service

    service.sr_set_description(dbg, sr, new_description)


def volume_create(dbg: str, sr: str, name: str, description: str, size: int, sharable: bool) -> dict[str, Any]:
    """A new, empty disk."""
    from xapi_storage_tasks.volume import service

    return service.volume_create(dbg, sr, name, description, size, sharable)


def volume_destroy(dbg: str, sr: str, key: str) -> None:
    """Destroy the volume; idempotent."""
    from xapi_storage_tasks.volume import service

    service.volume_destroy(dbg, sr, key)


def volume_stat(dbg: str, sr: str, key: str) -> dict[str, Any]:
    """The volume, its URI and its keys."""
    from xapi_storage_tasks.volume import service

    return service.volume_stat(dbg, sr, key)


def volume_set(dbg: str, sr: str, key: str, k: str, v: str) -> None:
    """Keep ``k = v`` in the volume's keys."""
    from xapi_storage_tasks.volume import service

    service.volume_set(dbg, sr, key, k, v)


def volume_unset(dbg: str, sr: str, key: str, k: str) -> None:
    """Forget key ``k`` (absent: nothing to do)."""
    from xapi_storage_tasks.volume import service

    service.volume_unset(dbg, sr, key, k)


def volume_set_name(dbg: str, sr: str, key: str, new_name: str) -> None:
    """Rename the volume."""
    from xapi_storage_tasks.volume import service

    service.volume_set_name(dbg, sr, key, new_name)


def volume_set_description(dbg: str, sr: str, key: str, new_description: str) -> None:
    """Describe the volume."""
    from xapi_storage_tasks.volume import service

    service.volume_set_description(dbg, sr, key, new_description)


def volume_resize(dbg: str, sr: str, key: str, new_size: int) -> None:
    """Grow the volume (not while it is served)."""
    from xapi_storage_tasks.volume import service

    service.volume_resize(dbg, sr, key, new_size)


def volume_snapshot(dbg: str, sr: str, key: str) -> dict[str, Any]:
    """A read-only volume of the content at this instant."""
    from xapi_storage_tasks.volume import service

    return service.volume_snapshot(dbg, sr, key)


def volume_clone(dbg: str, sr: str, key: str) -> dict[str, Any]:
    """A new writable volume of the content at this instant."""
    from xapi_storage_tasks.volume import service

    return service.volume_clone(dbg, sr, key)
