"""Which plugin an executable is, by the directory it runs from: the
volume plugin's (``volume/org.xen.xapi.storage.<type>/``) or a datapath's
(``datapath/<scheme>/``, or a checkout's ``bin/``). Both carry
``Plugin.Query``, whose answer differs.

This module imports nothing at import time (the registry refers to it).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VOLUME_PREFIX = "org.xen.xapi.storage."


def query(dbg: str) -> dict[str, Any]:
    """``Plugin.Query``: the volume plugin's record in its directory, the
    datapath's anywhere else."""
    from xapi_storage_tasks import settings

    if settings.plugin_directory().startswith(VOLUME_PREFIX):
        from xapi_storage_tasks.volume import service as volume

        return volume.query(dbg)
    from xapi_storage_tasks.datapath import service as datapath

    return datapath.query(dbg)
