"""NBD URIs: where an export lives, parsed without touching the network.

Kept apart from :mod:`xapi_storage_tasks.nbd.protocol` so that validating a ``Data.copy``
request in the calling executable does not pay for importing the socket
machinery; the worker connects.
"""

import os
import urllib.parse
from typing import Dict, List, NamedTuple, Optional

from xapi_storage_tasks.wire.errors import InvalidArguments

DEFAULT_PORT = 10809


class Address(NamedTuple):
    """Where an export lives: ``socket_path`` (then ``host`` is None and
    ``port`` 0) or ``host``/``port``; plus the ``export`` name."""

    socket_path: Optional[str]
    host: Optional[str]
    port: int
    export: str

    def __str__(self) -> str:
        if self.socket_path is not None:
            return "unix socket %s (export '%s')" % (self.socket_path, self.export)
        host = str(self.host)
        host = "[%s]" % host if ":" in host else host
        return "%s:%d (export '%s')" % (host, self.port, self.export)


def is_nbd_uri(s: object) -> bool:
    """Cheap prefix check: does ``s`` look like an NBD URI (valid or not)?"""
    # Broad on purpose: nbds:// or nbd+tcp:// should reach parse_uri and get
    # a clear "unsupported" error rather than be taken for a file name.
    return isinstance(s, str) and s.startswith(("nbd:", "nbd+", "nbds:", "nbds+"))


def _bad(uri: object, why: str) -> InvalidArguments:
    return InvalidArguments("invalid NBD URI %r: %s" % (uri, why))


def parse_uri(uri: object) -> Address:
    """Parse an NBD URI into an :class:`Address`; raise InvalidArguments.

    Accepted: ``nbd+unix:///EXPORT?socket=/abs/path``, ``nbd://HOST[:PORT]/
    EXPORT`` (IPv6 as ``[::1]``; both percent-decoded), and qemu's
    ``nbd:unix:/abs/path[:exportname=NAME]`` and
    ``nbd:HOST:PORT[:exportname=NAME]``.
    """
    try:
        if isinstance(uri, str) and uri.startswith(("nbd://", "nbd+unix://")):
            return _parse_standard(uri)
        if isinstance(uri, str) and uri.startswith("nbd:"):
            return _parse_legacy(uri)
    except ValueError as e:  # bad port, bad percent-encoding (UnicodeError)
        raise _bad(uri, str(e)) from None
    raise _bad(uri, "unsupported scheme (use nbd:// or nbd+unix://)")


def _parse_standard(uri: str) -> Address:
    parts = urllib.parse.urlsplit(uri)
    port = parts.port  # a property: raises ValueError on a bad port
    if parts.fragment:
        raise _bad(uri, "unexpected fragment")
    export = urllib.parse.unquote(parts.path[1:], errors="strict")
    # Query values are percent-encoded; '+' is literal (not form encoding).
    query: Dict[str, List[str]] = {}
    for item in filter(None, parts.query.split("&")):
        key, _, value = item.partition("=")
        query.setdefault(key, []).append(urllib.parse.unquote(value, errors="strict"))
    if parts.scheme == "nbd+unix":
        sockets = query.get("socket", [])
        if parts.netloc:
            raise _bad(uri, "nbd+unix URIs must not name a host")
        if len(sockets) != 1 or not os.path.isabs(sockets[0]):
            raise _bad(uri, "need exactly one socket= with an absolute path")
        return Address(sockets[0], None, 0, export)
    if not parts.hostname:
        raise _bad(uri, "missing host")
    if port == 0:
        raise _bad(uri, "bad port 0")
    return Address(None, parts.hostname, port or DEFAULT_PORT, export)


def _parse_legacy(uri: str) -> Address:
    # qemu's syntax has no escaping: the path or host simply cannot hold ':'.
    rest, _, export = uri[len("nbd:"):].partition(":exportname=")
    if rest.startswith("unix:"):
        if not os.path.isabs(rest[len("unix:"):]):
            raise _bad(uri, "socket path must be absolute")
        return Address(rest[len("unix:"):], None, 0, export)
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
    else:
        host, _, port = rest.rpartition(":")
        if ":" in host:
            raise _bad(uri, "write IPv6 hosts as [addr]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(uri, "expected nbd:unix:PATH or nbd:HOST:PORT (valid port)")
    return Address(None, host, int(port), export)
