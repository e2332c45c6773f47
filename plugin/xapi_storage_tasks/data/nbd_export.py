"""The ``nbd`` target kind: an NBD export, written in place.

The plan only parses the URI (:mod:`xapi_storage_tasks.nbd.uri`, no
sockets); the worker connects (:mod:`xapi_storage_tasks.nbd.protocol`). The
export must be writable and large enough. Every failure is an
:class:`NbdError`.
"""

import os
import stat
from typing import TYPE_CHECKING, Optional

from xapi_storage_tasks.data.target import Remote, Source, Spec, Target, source_ended
from xapi_storage_tasks.nbd.uri import parse_uri
from xapi_storage_tasks.wire.errors import NbdError

if TYPE_CHECKING:
    from xapi_storage_tasks.nbd.protocol import Client
    from xapi_storage_tasks.tasks.worker import Context


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
        """Connect; the export must be writable and ``needed`` bytes long."""
        from xapi_storage_tasks.nbd.protocol import Client  # the worker's side only: sockets

        return cls(Client.connect(parse_uri(spec["uri"])), needed)

    def __init__(self, client: "Client", needed: int) -> None:
        self.client = client
        export = client.address.export
        if client.read_only:
            self.abort()
            raise NbdError("export '%s' on %s is read-only: cannot copy onto it" % (export, client.address))
        if client.size < needed:
            self.abort()
            raise NbdError("export '%s' is %d bytes, the copy needs %d" % (export, client.size, needed))

    def write(self, src: int, offset: int, length: int) -> None:
        """Send source bytes with sendfile; a source that shrank is its own
        error, not the server's."""
        st = os.fstat(src)
        if stat.S_ISREG(st.st_mode) and st.st_size < offset + length:
            raise source_ended(st.st_size)
        self.client.pwrite_from_fd(src, offset, length, offset)

    def zero(self, offset: int, length: int) -> None:
        """NBD_CMD_WRITE_ZEROES (trimming allowed), or written zeros."""
        self.client.write_zeroes(offset, length)

    def finish(self, ctx: "Context") -> None:
        """Wait for every reply, NBD_CMD_FLUSH, disconnect."""
        if not self.client.can_flush:  # say so: Completed then promises less
            ctx.log("the NBD server offers no flush: the data was written but may not be durable yet")
        self.client.flush()
        self.client.close()

    def abort(self) -> None:
        """Disconnect without waiting for replies."""
        try:
            self.client.close(drain=False)
        except NbdError:
            pass
