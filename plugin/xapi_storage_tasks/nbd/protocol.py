"""A small NBD client, standard library only, following the protocol at
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.

Fixed-newstyle handshake with NBD_OPT_GO (NBD_OPT_EXPORT_NAME for older
servers); simple replies only; WRITE / WRITE_ZEROES pipelined in a bounded
window, READ, FLUSH and DISC. Every failure is an :class:`NbdError` (or
:class:`InvalidArguments` for a malformed URI), never a bare ``OSError``.

Nothing waits forever: each phase has a stall timeout (:class:`Timeouts`:
seconds without progress while connecting, negotiating, sending or waiting
for a reply, and waiting for a flush), and a timeout's message says which
phase stalled. :meth:`Client.abort` never blocks, so a cancelled copy
stops at once even when the server is frozen. The socket stays blocking
(with kernel timeouts) so that ``os.sendfile`` works on it, and a signal
handler that raises (a cancel) interrupts any wait.
"""

import errno
import os
import socket
import stat
import struct
from types import TracebackType
from typing import Dict, List, NamedTuple, NoReturn, Optional, Tuple, Type, Union

from xapi_storage_tasks.nbd.uri import Address, parse_uri
from xapi_storage_tasks.wire.errors import NbdError

MAX_PAYLOAD = 32 << 20          # our cap on one request's payload
REQUEST_SIZE = 2 << 20          # the write size we aim for (measured: 1-2 MiB is fastest)
WINDOW_REQUESTS = 16            # pipelining window: requests in flight ...
WINDOW_BYTES = 32 << 20         # ... or payload bytes in flight
ZERO_BUF_MAX = 4 << 20          # fallback write_zeroes never allocates more
ZEROES_CHUNK = 1 << 30          # WRITE_ZEROES length is 32-bit; stay aligned
MAX_TIMEOUT = 86400.0 * 365     # the longest stall timeout honoured

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1 << 0, 1 << 1    # handshake flags
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1 << 0, 1 << 1  # client flags
FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_TRIM = 1 << 1, 1 << 2, 1 << 5
FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN, FLAG_SEND_FAST_ZERO = 1 << 6, 1 << 8, 1 << 11
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 6
REP_ERRORS = dict(enumerate(["UNSUP", "POLICY", "INVALID", "PLATFORM", "TLS_REQD",
                             "UNKNOWN", "SHUTDOWN", "BLOCK_SIZE_REQD", "TOO_BIG"], 1))
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
CMD_NAMES = {0: "read", 1: "write", 3: "flush", 6: "write_zeroes"}
CMD_FLAG_NO_HOLE = 1 << 1
# The protocol fixes these numbers whatever the server's platform uses.
NBD_ERRNO = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
             75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}
# What a kernel socket timeout (SO_RCVTIMEO/SO_SNDTIMEO) looks like.
TIMED_OUT = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS, errno.ETIMEDOUT)

_REQUEST = struct.Struct(">IHHQQI")   # magic, flags, type, handle, offset, len
_REPLY = struct.Struct(">IIQ")        # magic, error, handle
_OPT_REPLY = struct.Struct(">QIII")   # magic, option, reply type, length

Inflight = Tuple[int, int, int, Optional[memoryview], int]  # cmd, offset, length, read buffer, payload


class Timeouts(NamedTuple):
    """Stall timeouts in seconds (0: wait forever). Each bounds one wait
    without progress, not a whole operation: a long copy never times out
    while the server keeps answering."""

    connect: float = 10.0
    """connecting the socket"""
    handshake: float = 10.0
    """each read or write of the handshake (a silent server)"""
    io: float = 30.0
    """sending a request or its data, or waiting for a reply"""
    flush: float = 300.0
    """waiting for the reply to a flush (the server writes its cache out)"""


DEFAULT_TIMEOUTS = Timeouts()


def _flag(bit: int) -> property:
    return property(lambda self: bool(self.transmission_flags & bit))


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel timeouts on a blocking socket (os.sendfile needs it blocking;
    Python's own timeouts make the descriptor non-blocking)."""
    seconds = min(seconds, MAX_TIMEOUT)  # a timeval holds no more; nobody waits longer
    tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class Client:
    """One connection to one export; make one with :meth:`connect`."""

    read_only = _flag(FLAG_READ_ONLY)
    can_flush = _flag(FLAG_SEND_FLUSH)
    can_trim = _flag(FLAG_SEND_TRIM)
    can_write_zeroes = _flag(FLAG_SEND_WRITE_ZEROES)
    can_fast_zero = _flag(FLAG_SEND_FAST_ZERO)
    can_multi_conn = _flag(FLAG_CAN_MULTI_CONN)

    def __init__(self, sock: socket.socket, address: Address, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self._sock: Optional[socket.socket] = sock
        self.address, self.timeouts = address, timeouts
        self.size = self.transmission_flags = 0
        self.max_payload = MAX_PAYLOAD
        self.preferred_block = 1
        self._inflight: Dict[int, Inflight] = {}
        self._inflight_bytes = 0
        self._next_handle = 1
        self._sendfile_ok = True
        self._mid_request = False  # a header or payload is partly sent
        self._timeout = timeouts.handshake

    @classmethod
    def connect(cls, address: Union[Address, str], timeouts: Timeouts = DEFAULT_TIMEOUTS) -> "Client":
        """Connect to ``address`` (an Address or a URI) and negotiate."""
        if isinstance(address, str):
            address = parse_uri(address)
        sock = None
        try:
            if address.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                _set_timeout(sock, timeouts.connect)  # a full backlog blocks connect()
                sock.connect(address.socket_path)
            else:
                sock = socket.create_connection((address.host, address.port), min(timeouts.connect, MAX_TIMEOUT) or None)
                sock.settimeout(None)
                # Headers and payloads go out in separate sends: skip Nagle.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_timeout(sock, timeouts.handshake)
        except OSError as e:
            if sock is not None:
                sock.close()
            if isinstance(e, socket.timeout) or e.errno in TIMED_OUT:
                raise NbdError("cannot connect to %s: timed out after %gs while connecting" % (
                    address, timeouts.connect)) from None
            raise NbdError("cannot connect to %s: %s" % (address, e.strerror or e)) from None
        client = cls(sock, address, timeouts)
        try:
            client._handshake()
            client._set_phase(timeouts.io)
        except BaseException:
            client._shutdown()
            raise
        return client

    def _set_phase(self, seconds: float) -> None:
        """Switch the socket's stall timeout (only when it changes)."""
        if seconds != self._timeout and self._sock is not None:
            try:
                _set_timeout(self._sock, seconds)
            except OSError as e:
                self._lost("setting a timeout", e)
            self._timeout = seconds

    @property
    def request_size(self) -> int:
        """The write size to use: about :data:`REQUEST_SIZE`, a multiple of
        the server's preferred block size, within its maximum."""
        pref = max(1, self.preferred_block)
        return max(1, min(self.max_payload, max(pref, REQUEST_SIZE // pref * pref)))

    def _handshake(self) -> None:
        magic, second, hflags = struct.unpack(">QQH", self._recv(18, "negotiating (the server sent no greeting)"))
        if magic != NBDMAGIC or second != IHAVEOPT:
            self._protocol_error("not a newstyle NBD server (magic %#x %#x)" % (magic, second))
        cflags = (FLAG_C_FIXED_NEWSTYLE if hflags & FLAG_FIXED_NEWSTYLE else 0) | \
            (FLAG_C_NO_ZEROES if hflags & FLAG_NO_ZEROES else 0)
        self._send(struct.pack(">I", cflags), "negotiating")
        # Only fixed-newstyle servers may be sent any option but EXPORT_NAME.
        if not (hflags & FLAG_FIXED_NEWSTYLE) or not self._opt_go():
            name = self.address.export.encode("utf-8")
            self._send(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name,
                       "negotiating")
            # This option cannot fail politely: the server just hangs up.
            what = "opening the export (the server may not have it)"
            self.size, self.transmission_flags = struct.unpack(">QH", self._recv(10, what))
            if not cflags & FLAG_C_NO_ZEROES:
                self._recv(124, what)
        self.max_payload = max(1, min(self.max_payload, MAX_PAYLOAD))

    def _opt_go(self) -> bool:
        """NBD_OPT_GO; return False if the server does not know it."""
        name = self.address.export.encode("utf-8")
        # Only NBD_INFO_EXPORT: asking for NBD_INFO_BLOCK_SIZE would promise
        # to honour the server's minimum alignment, which a byte-exact copy
        # of an odd-sized source cannot. qemu and nbdkit send it unasked.
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_EXPORT)
        self._send(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data, "negotiating")
        got_export = False
        while True:
            magic, opt, rtype, length = _OPT_REPLY.unpack(
                self._recv(_OPT_REPLY.size, "negotiating"))
            if magic != OPT_REPLY_MAGIC or opt != OPT_GO or length > 1 << 20:
                self._protocol_error("malformed option reply")
            data = self._recv(length, "negotiating")
            if rtype == REP_ACK:
                if not got_export:
                    self._protocol_error("server sent no export information")
                return True
            if rtype == REP_ERR_UNSUP:
                return False
            if rtype & (1 << 31):
                msg = data.decode("utf-8", "replace") or "no message"
                if rtype == REP_ERR_UNKNOWN:
                    raise NbdError("export '%s' not found: %s" % (self.address.export, msg))
                code = REP_ERRORS.get(rtype & 0x7FFFFFFF, str(rtype & 0x7FFFFFFF))
                raise NbdError("server refused export '%s': NBD_REP_ERR_%s: %s" % (
                    self.address.export, code, msg))
            info = struct.unpack(">H", data[:2])[0] if rtype == REP_INFO and length >= 2 else -1
            if info == INFO_EXPORT and length >= 12:
                self.size, self.transmission_flags = struct.unpack(">QH", data[2:12])
                got_export = True
            elif info == INFO_BLOCK_SIZE and length >= 14:  # sent unasked: use preferred and maximum
                _, preferred, maximum = struct.unpack(">III", data[2:14])
                self.max_payload = maximum or self.max_payload
                if 0 < preferred <= MAX_PAYLOAD and preferred & (preferred - 1) == 0:
                    self.preferred_block = preferred
            # Anything else (NBD_INFO_NAME, ...) carries nothing we need.

    # ---- low-level I/O: every OSError becomes an NbdError here --------------

    def _shutdown(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _lost(self, what: str, err: Union[OSError, str]) -> NoReturn:
        self._shutdown()
        if isinstance(err, OSError) and err.errno in TIMED_OUT:
            raise NbdError("connection to %s stalled: no progress for %gs while %s" % (
                self.address, self._timeout, what))
        reason = err if isinstance(err, str) else err.strerror or str(err)
        raise NbdError("connection to %s lost while %s: %s" % (self.address, what, reason))

    def _protocol_error(self, why: str) -> NoReturn:
        self._shutdown()  # the byte stream can no longer be trusted
        raise NbdError("protocol error from %s: %s" % (self.address, why))

    def _live_sock(self) -> socket.socket:
        if self._sock is None:
            raise NbdError("connection to %s is closed" % (self.address,))
        return self._sock

    def _send(self, data: Union[bytes, memoryview], what: str) -> None:
        try:
            self._live_sock().sendall(data)
        except OSError as e:
            self._lost(what, e)

    def _recv(self, n: int, what: str, into: Optional[memoryview] = None) -> bytes:
        buf = memoryview(bytearray(n)) if into is None else into
        got, sock = 0, self._live_sock()
        while got < n:
            try:
                k = sock.recv_into(buf[got:n])
            except OSError as e:
                self._lost(what, e)
            if k == 0:
                self._lost(what, "server closed the connection")
            got += k
        return bytes(buf) if into is None else b""

    # ---- requests and replies ---------------------------------------------

    def _check(self, offset: int, length: int, write: bool) -> None:
        self._live_sock()
        if write and self.read_only:
            raise NbdError("export '%s' is read-only" % self.address.export)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError("request at offset %d length %d is beyond the end "
                           "of the export (size %d)" % (offset, length, self.size))

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0, payload: int = 0,
                 read_buf: Optional[memoryview] = None) -> None:
        """Send one request header; a caller with a ``payload`` sends it
        next with :meth:`_payload_sent` after it."""
        # Wait for room in the window so memory and the server's queue stay
        # bounded, and for any in-flight request that overlaps this one: a
        # server may run requests in any order, so overlapping writes in
        # flight together could land in either order.
        while self._inflight and (len(self._inflight) >= WINDOW_REQUESTS or
                                  self._inflight_bytes + payload > WINDOW_BYTES or
                                  self._overlaps(offset, length)):
            self._read_reply()
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self._mid_request = True
        self._send(_REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length),
                   "sending a %s request" % CMD_NAMES[cmd])
        self._mid_request = payload > 0
        self._inflight[handle] = (cmd, offset, length, read_buf, payload)
        self._inflight_bytes += payload

    def _payload_sent(self) -> None:
        self._mid_request = False

    def _overlaps(self, offset: int, length: int) -> bool:
        end = offset + length
        return any(o < end and offset < o + n for _, o, n, _, _ in self._inflight.values())

    def _waiting_for(self) -> str:
        cmd, offset, length, _, _ = self._inflight[min(self._inflight)]
        if cmd == CMD_FLUSH:
            return "waiting for the reply to a flush"
        return "waiting for the reply to a %s at offset %d length %d" % (CMD_NAMES[cmd], offset, length)

    def _read_reply(self) -> None:
        """Read one simple reply; raise NbdError if it reports an error."""
        magic, error, handle = _REPLY.unpack(self._recv(_REPLY.size, self._waiting_for()))
        if magic != SIMPLE_REPLY_MAGIC or handle not in self._inflight:
            self._protocol_error("unexpected reply (magic %#x, handle %d)" % (magic, handle))
        cmd, offset, length, read_buf, payload = self._inflight.pop(handle)
        self._inflight_bytes -= payload
        if error:
            raise NbdError("%s at offset %d length %d failed on %s: %s" % (
                CMD_NAMES[cmd], offset, length, self.address,
                NBD_ERRNO.get(error, "error %d" % error)))
        if cmd == CMD_READ:
            self._recv(length, "reading data", into=read_buf)

    def drain(self) -> None:
        """Wait for every outstanding reply; then raise the first error seen."""
        first = None
        while self._inflight:
            try:
                self._read_reply()
            except NbdError as e:
                if self._sock is None:
                    raise  # connection gone: no more replies will come
                first = first or e
        if first is not None:
            raise first

    def _pieces(self, offset: int, length: int) -> List[Tuple[int, int]]:
        """``[offset, offset+length)`` cut into requests of
        :attr:`request_size` on multiples of it, so that a range starting
        aligned to the server's preferred block size stays aligned."""
        size, end = self.request_size, offset + length
        out: List[Tuple[int, int]] = []
        while offset < end:
            stop = min(end, (offset // size + 1) * size)
            out.append((offset, stop - offset))
            offset = stop
        return out

    def pwrite(self, buf: Union[bytes, bytearray, memoryview], offset: int) -> None:
        """Write ``buf`` at ``offset``. Pipelined: a server error may surface
        from a later call, naming this write's offset."""
        view = memoryview(buf).cast("B")
        self._check(offset, len(view), True)
        for pos, n in self._pieces(offset, len(view)):
            self._request(CMD_WRITE, pos, n, payload=n)
            self._send(view[pos - offset:pos - offset + n], "sending write data")
            self._payload_sent()

    def pwrite_from_fd(self, fd: int, fd_offset: int, length: int, offset: int) -> None:
        """Write ``length`` bytes of ``fd`` from ``fd_offset`` to the export at
        ``offset``, zero-copy with os.sendfile() where the fd allows it."""
        self._check(offset, length, True)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and fd_offset + length > st.st_size:
            raise NbdError("source fd %d has only %d bytes, cannot read %d at %d"
                           % (fd, st.st_size, length, fd_offset))
        for pos, n in self._pieces(offset, length):
            self._request(CMD_WRITE, pos, n, payload=n)
            self._send_from_fd(fd, fd_offset + pos - offset, n)
            self._payload_sent()

    def _send_from_fd(self, fd: int, src: int, n: int) -> None:
        # Any failure here leaves the server owed payload, so the connection
        # is dropped (by _lost) whatever went wrong.
        what = "sending write data"
        while n > 0:
            try:
                if self._sendfile_ok:
                    sent = os.sendfile(self._live_sock().fileno(), fd, src, n)
                else:
                    data = os.pread(fd, min(n, 1 << 20), src)
                    self._live_sock().sendall(data)
                    sent = len(data)
            except OSError as e:
                if self._sendfile_ok and e.errno in (errno.EINVAL, errno.ENOSYS):
                    self._sendfile_ok = False  # this fd cannot be spliced: copy
                    continue
                self._lost(what, e)
            if sent == 0:
                self._lost(what, "fd %d ended early at offset %d" % (fd, src))
            src, n = src + sent, n - sent

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        """Zero a range: NBD_CMD_WRITE_ZEROES if offered, else plain writes of
        one small reused zero buffer (bounded memory whatever ``length``)."""
        self._check(offset, length, True)
        end = offset + length
        if self.can_write_zeroes:
            for pos in range(offset, end, ZEROES_CHUNK):
                self._request(CMD_WRITE_ZEROES, pos, min(ZEROES_CHUNK, end - pos),
                              0 if may_trim else CMD_FLAG_NO_HOLE)
            return
        zeroes = memoryview(bytes(max(1, min(length, self.max_payload, ZERO_BUF_MAX))))
        for pos in range(offset, end, len(zeroes)):
            self.pwrite(zeroes[:min(len(zeroes), end - pos)], pos)

    def pread(self, length: int, offset: int) -> bytes:
        """Return ``length`` bytes read at ``offset`` (drains writes first)."""
        self._check(offset, length, False)
        self.drain()
        out = bytearray(length)
        for pos in range(0, length, self.max_payload):
            n = min(self.max_payload, length - pos)
            self._request(CMD_READ, offset + pos, n, read_buf=memoryview(out)[pos:pos + n])
            self.drain()
        return bytes(out)

    def start_flush(self) -> None:
        """Send NBD_CMD_FLUSH without waiting for its reply (a no-op if the
        server has no flush): the server starts writing its cache out
        while more writes come. Its error, if any, surfaces later like a
        write's."""
        if self.can_flush:
            self._check(0, 0, False)
            self._request(CMD_FLUSH, 0, 0)

    def flush(self) -> None:
        """Wait for pending writes, then NBD_CMD_FLUSH if the server has it
        (its reply may take up to the flush timeout)."""
        self.drain()
        if self.can_flush:
            self._request(CMD_FLUSH, 0, 0)
            self._set_phase(self.timeouts.flush)
            try:
                self.drain()
            finally:
                self._set_phase(self.timeouts.io)

    def close(self, drain: bool = True) -> None:
        """Drain (unless ``drain`` is false: see :meth:`abort`), send
        NBD_CMD_DISC and close the socket. Idempotent; a pending write error
        is raised after closing."""
        if not drain:
            self.abort()
            return
        try:
            if self._sock is not None:
                self.drain()
        finally:
            if self._sock is not None:
                try:
                    self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                except OSError:
                    pass  # the server is gone anyway
                self._shutdown()

    def abort(self) -> None:
        """Drop the connection now, waiting for nothing (a frozen server
        cannot hold it): NBD_CMD_DISC goes out only if no request is half
        sent and it fits in the socket buffer at once. Idempotent."""
        sock = self._sock
        if sock is None:
            return
        if not self._mid_request:
            try:
                sock.send(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0), socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._shutdown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close(drain=exc_type is None)  # don't mask an exception in flight
