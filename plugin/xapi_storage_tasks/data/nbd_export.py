"""The ``nbd`` target kind: an NBD export, written in place.

The plan only parses the URI (:mod:`xapi_storage_tasks.nbd.uri`, no
sockets); the worker connects (:mod:`xapi_storage_tasks.nbd.protocol`). The
export must be writable and large enough. Every failure is an
:class:`NbdError`; a stalled server fails the copy after the stall
timeouts of :func:`xapi_storage_tasks.settings.nbd_timeouts`, naming what
stalled, and a cancel drops the connections at once.

While copying, a flush is sent (without waiting for it) after every
:data:`FLUSH_EVERY` bytes of data: the server writes its
cache out while more data comes, instead of all of it at the final flush
(measured with qemu-nbd: the copy takes about a quarter less time).

Connections: one, unless the server advertises NBD_FLAG_CAN_MULTI_CONN
(it then promises that a flush on one connection covers the writes
answered on all of them); then up to ``TASK_NBD_CONNECTIONS`` (default 4),
requests dealt round-robin. Extra connections are a bonus: one that cannot
be opened, or is not greeted within 2 s, leaves the copy on those it has. A server that accepts a single
connection (the toolstack's migration proxy) must not advertise multi-conn
(qemu does not for a writable export unless told to), or the copy is run
with ``TASK_NBD_CONNECTIONS=1``.
"""

import os
import stat
from typing import TYPE_CHECKING, List, Optional

from xapi_storage_tasks import settings
from xapi_storage_tasks.data.target import Remote, Source, Spec, Target, source_ended
from xapi_storage_tasks.nbd.uri import parse_uri
from xapi_storage_tasks.wire.errors import NbdError

if TYPE_CHECKING:
    from xapi_storage_tasks.nbd.protocol import Client
    from xapi_storage_tasks.tasks.worker import Context

FLUSH_EVERY = 64 << 20  # data bytes between early flushes
EXTRA_HANDSHAKE = 2.0   # seconds an extra connection may take to greet us


class NbdExport(Target):
    """An NBD export; its contents are unknown, so holes are zeroed."""

    kind = "nbd"

    @classmethod
    def plan(cls, remote: Remote, source: Source, needed: int) -> Optional[Spec]:
        """An NBD URI, parsed (InvalidArguments if malformed), never contacted."""
        if remote.is_local:
            return None
        parse_uri(remote.value)
        return {"kind": cls.kind, "uri": remote.value}

    @classmethod
    def open(cls, ctx: "Context", spec: Spec, needed: int, exact: bool) -> "NbdExport":
        """Connect (more than once if the server allows it); the export must
        be writable and ``needed`` bytes long."""
        from xapi_storage_tasks.nbd.protocol import Client, Timeouts  # the worker's side only: sockets

        address, timeouts = parse_uri(spec["uri"]), Timeouts(*settings.nbd_timeouts())
        target = cls([Client.connect(address, timeouts)], needed)
        first = target.clients[0]
        wanted = settings.nbd_connections() if first.can_multi_conn else 1
        # An extra connection is a bonus: a server that accepts once and keeps
        # listening (a proxy) costs a short wait, not the whole handshake timeout.
        extra = timeouts._replace(handshake=min(timeouts.handshake or EXTRA_HANDSHAKE, EXTRA_HANDSHAKE))
        try:
            while len(target.clients) < wanted:
                target.clients.append(Client.connect(address, extra))
        except NbdError as e:
            ctx.log("copying over %d connection(s): another one failed: %s" % (len(target.clients), e))
        except BaseException:  # a cancel: the caller never gets the target to abort
            target.abort()
            raise
        ctx.log("NBD export: %d bytes, flags %#x, %d connection(s), requests of %d bytes" % (
            first.size, first.transmission_flags, len(target.clients), first.request_size))
        return target

    def __init__(self, clients: "List[Client]", needed: int) -> None:
        self.clients = clients
        self._turn = 0
        self._unflushed = 0  # data bytes since the last early flush
        first = clients[0]
        export = first.address.export
        if first.read_only:
            self.abort()
            raise NbdError("export '%s' on %s is read-only: cannot copy onto it" % (export, first.address))
        if first.size < needed:
            self.abort()
            raise NbdError("export '%s' is %d bytes, the copy needs %d" % (export, first.size, needed))

    def _next(self) -> "Client":
        # Round-robin: each copy call goes whole to one connection. The copy
        # writes every byte once, so no two connections ever overlap.
        self._turn = (self._turn + 1) % len(self.clients)
        return self.clients[self._turn]

    def write(self, src: int, offset: int, length: int) -> None:
        """Send source bytes with sendfile; a source that shrank is its own
        error, not the server's."""
        st = os.fstat(src)
        if stat.S_ISREG(st.st_mode) and st.st_size < offset + length:
            raise source_ended(st.st_size)
        client = self._next()
        client.pwrite_from_fd(src, offset, length, offset)
        self._unflushed += length
        if self._unflushed >= FLUSH_EVERY:  # on any connection: multi-conn makes it cover all
            self._unflushed = 0
            client.start_flush()

    def zero(self, offset: int, length: int) -> None:
        """NBD_CMD_WRITE_ZEROES (trimming allowed), or written zeros."""
        self._next().write_zeroes(offset, length)

    def finish(self, ctx: "Context") -> None:
        """Wait for every reply on every connection, then NBD_CMD_FLUSH on
        one (multi-conn makes it cover them all), disconnect."""
        first = self.clients[0]
        if not first.can_flush:  # say so: Completed then promises less
            ctx.log("the NBD server offers no flush: the data was written but may not be durable yet")
        for client in self.clients:
            client.drain()
        first.flush()
        for client in self.clients:
            client.close()

    def abort(self) -> None:
        """Drop every connection at once, waiting for nothing."""
        for client in self.clients:
            client.abort()
