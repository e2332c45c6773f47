"""QMP sessions with qemu-storage-daemon, through the QEMU project's own
client library, ``qemu.qmp`` (asyncio). Imported only by the calls that
talk to a daemon (mirror start and drain, cancel, diagnostics).
"""

import asyncio
from typing import Any, Dict, List, Optional, Sequence, Tuple

from qemu.qmp import QMPClient, QMPError

from xapi_storage_tasks.wire.errors import StorageDaemonFailed

TIMEOUT = 10.0

Command = Tuple[str, Optional[Dict[str, Any]]]


async def connect(path: str, name: str, timeout: float = TIMEOUT) -> QMPClient:
    """A negotiated session on the QMP socket ``path``."""
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(path), timeout)
    except (QMPError, OSError, asyncio.TimeoutError) as e:
        raise StorageDaemonFailed("cannot open a QMP session on %s: %s" % (path, _text(e))) from None
    return client


async def execute(client: QMPClient, name: str, args: Optional[Dict[str, Any]] = None, timeout: float = TIMEOUT) -> Any:
    """Run one command; StorageDaemonFailed with QEMU's message if it fails."""
    try:
        return await asyncio.wait_for(client.execute(name, args), timeout)
    except (QMPError, OSError, EOFError, asyncio.TimeoutError) as e:
        raise StorageDaemonFailed("QMP %s failed: %s" % (name, _text(e))) from None


async def close(client: QMPClient, timeout: float = TIMEOUT) -> None:
    """End the session, bounded (a frozen daemon that reads nothing could
    keep the library flushing its last bytes forever); never raises."""
    try:
        await asyncio.wait_for(client.disconnect(), timeout)
    except Exception:  # noqa: BLE001 - the session is gone either way
        pass


async def _run(path: str, commands: Sequence[Command], timeout: float) -> List[Any]:
    client = await connect(path, "xapi-storage-tasks", timeout)
    try:
        return [await execute(client, name, args, timeout) for name, args in commands]
    finally:
        await close(client, timeout)


def run(path: str, commands: Sequence[Command], timeout: float = TIMEOUT) -> List[Any]:
    """Run ``commands`` in one session on ``path``; their results, in order."""
    return asyncio.run(_run(path, commands, timeout))


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
