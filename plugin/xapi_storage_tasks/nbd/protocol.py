"""A small NBD client, standard library only, following the protocol at
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.

Fixed-newstyle handshake with NBD_OPT_GO (NBD_OPT_EXPORT_NAME for older
servers); simple replies only; WRITE / WRITE_ZEROES pipelined in a bounded
window, READ, FLUSH and DISC. Every failure is an :class:`NbdError` (or
:class:`InvalidArguments` for a malformed URI), never a bare ``OSError``.
"""

import errno
import os
import socket
import stat
import struct

from xapi_storage_tasks.wire.errors import NbdError
from xapi_storage_tasks.nbd.uri import parse_uri

MAX_PAYLOAD = 32 << 20          # our cap on one request's payload
WINDOW_REQUESTS = 16            # pipelining window: requests in flight ...
WINDOW_BYTES = 64 << 20         # ... or payload bytes in flight
ZERO_BUF_MAX = 4 << 20          # fallback write_zeroes never allocates more
ZEROES_CHUNK = 1 << 30          # WRITE_ZEROES length is 32-bit; stay aligned

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1 << 0, 1 << 1    # handshake flags
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1 << 0, 1 << 1  # client flags
FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_TRIM = 1 << 1, 1 << 2, 1 << 5
FLAG_SEND_WRITE_ZEROES, FLAG_SEND_FAST_ZERO = 1 << 6, 1 << 11
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

_REQUEST = struct.Struct(">IHHQQI")   # magic, flags, type, handle, offset, len
_REPLY = struct.Struct(">IIQ")        # magic, error, handle
_OPT_REPLY = struct.Struct(">QIII")   # magic, option, reply type, length


def _flag(bit):
    return property(lambda self: bool(self.transmission_flags & bit))


class Client:
    """One connection to one export; make one with :meth:`connect`."""

    read_only = _flag(FLAG_READ_ONLY)
    can_flush = _flag(FLAG_SEND_FLUSH)
    can_trim = _flag(FLAG_SEND_TRIM)
    can_write_zeroes = _flag(FLAG_SEND_WRITE_ZEROES)
    can_fast_zero = _flag(FLAG_SEND_FAST_ZERO)

    def __init__(self, sock, address):
        self._sock, self.address = sock, address
        self.size = self.transmission_flags = 0
        self.max_payload = MAX_PAYLOAD
        self._inflight = {}  # handle -> (cmd, offset, length, read_buf, payload)
        self._inflight_bytes = 0
        self._next_handle = 1
        self._sendfile_ok = True

    @classmethod
    def connect(cls, address, timeout=30.0):
        """Connect to ``address`` (an Address or a URI) and negotiate."""
        if isinstance(address, str):
            address = parse_uri(address)
        sock = None
        try:
            if address.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(address.socket_path)
            else:
                sock = socket.create_connection((address.host, address.port), timeout)
                # Headers and payloads go out in separate sends: skip Nagle.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A blocking socket with kernel timeouts, so that os.sendfile() works
            # on it (Python's own timeouts make the fd non-blocking).
            sock.settimeout(None)
            if timeout:
                tv = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        except OSError as e:
            if sock is not None:
                sock.close()
            raise NbdError("cannot connect to %s: %s" % (address, e.strerror or e)) from None
        client = cls(sock, address)
        try:
            client._handshake()
        except BaseException:
            client._shutdown()
            raise
        return client

    def _handshake(self):
        magic, second, hflags = struct.unpack(">QQH", self._recv(18, "negotiating"))
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

    def _opt_go(self):
        """NBD_OPT_GO; return False if the server does not know it."""
        name = self.address.export.encode("utf-8")
        # Only NBD_INFO_EXPORT: asking for NBD_INFO_BLOCK_SIZE would promise
        # to honour the server's minimum alignment, which a byte-exact copy
        # of an odd-sized source cannot.
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
            elif info == INFO_BLOCK_SIZE and length >= 14:  # sent unasked: keep its maximum
                maximum = struct.unpack(">I", data[10:14])[0]
                self.max_payload = maximum or self.max_payload
            # Anything else (NBD_INFO_NAME, ...) carries nothing we need.

    # ---- low-level I/O: every OSError becomes an NbdError here --------------

    def _shutdown(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _lost(self, what, err):
        self._shutdown()
        timed_out = isinstance(err, OSError) and err.errno in (errno.EAGAIN, None)
        reason = "timed out" if timed_out else getattr(err, "strerror", None) or str(err)
        raise NbdError("connection to %s lost while %s: %s" % (self.address, what, reason))

    def _protocol_error(self, why):
        self._shutdown()  # the byte stream can no longer be trusted
        raise NbdError("protocol error from %s: %s" % (self.address, why))

    def _live_sock(self):
        if self._sock is None:
            raise NbdError("connection to %s is closed" % (self.address,))
        return self._sock

    def _send(self, data, what):
        try:
            self._live_sock().sendall(data)
        except OSError as e:
            self._lost(what, e)

    def _recv(self, n, what, into=None):
        buf = bytearray(n) if into is None else into
        view, got, sock = memoryview(buf), 0, self._live_sock()
        while got < n:
            try:
                k = sock.recv_into(view[got:n])
            except OSError as e:
                self._lost(what, e)
            if k == 0:
                self._lost(what, "server closed the connection")
            got += k
        return bytes(buf) if into is None else None

    # ---- requests and replies ---------------------------------------------

    def _check(self, offset, length, write):
        self._live_sock()
        if write and self.read_only:
            raise NbdError("export '%s' is read-only" % self.address.export)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError("request at offset %d length %d is beyond the end "
                           "of the export (size %d)" % (offset, length, self.size))

    def _request(self, cmd, offset, length, flags=0, payload=0, read_buf=None):
        """Send one request header (the caller sends any payload next)."""
        # Wait for room in the window so memory and the server's queue stay
        # bounded, and for any in-flight request that overlaps this one: a
        # server may run requests in any order, so overlapping writes in
        # flight together could land in either order.
        while self._inflight and (len(self._inflight) >= WINDOW_REQUESTS or
                                  self._inflight_bytes + payload > WINDOW_BYTES or
                                  self._overlaps(offset, length)):
            self._read_reply()
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        self._send(_REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length),
                   "sending a %s request" % CMD_NAMES[cmd])
        self._inflight[handle] = (cmd, offset, length, read_buf, payload)
        self._inflight_bytes += payload

    def _overlaps(self, offset, length):
        end = offset + length
        return any(o < end and offset < o + n for _, o, n, _, _ in self._inflight.values())

    def _read_reply(self):
        """Read one simple reply; raise NbdError if it reports an error."""
        magic, error, handle = _REPLY.unpack(self._recv(_REPLY.size, "waiting for a reply"))
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

    def drain(self):
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

    def pwrite(self, buf, offset):
        """Write ``buf`` at ``offset``. Pipelined: a server error may surface
        from a later call, naming this write's offset."""
        view = memoryview(buf).cast("B")
        self._check(offset, len(view), True)
        for pos in range(0, len(view), self.max_payload):
            chunk = view[pos:pos + self.max_payload]
            self._request(CMD_WRITE, offset + pos, len(chunk), payload=len(chunk))
            self._send(chunk, "sending write data")

    def pwrite_from_fd(self, fd, fd_offset, length, offset):
        """Write ``length`` bytes of ``fd`` from ``fd_offset`` to the export at
        ``offset``, zero-copy with os.sendfile() where the fd allows it."""
        self._check(offset, length, True)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and fd_offset + length > st.st_size:
            raise NbdError("source fd %d has only %d bytes, cannot read %d at %d"
                           % (fd, st.st_size, length, fd_offset))
        for pos in range(0, length, self.max_payload):
            n = min(self.max_payload, length - pos)
            self._request(CMD_WRITE, offset + pos, n, payload=n)
            self._send_from_fd(fd, fd_offset + pos, n)

    def _send_from_fd(self, fd, src, n):
        # Any failure here leaves the server owed payload, so the connection
        # is dropped (by _lost) whatever went wrong.
        what = "sending data from fd %d" % fd
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
                self._lost(what, "fd ended early at offset %d" % src)
            src, n = src + sent, n - sent

    def write_zeroes(self, offset, length, may_trim=True):
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

    def pread(self, length, offset):
        """Return ``length`` bytes read at ``offset`` (drains writes first)."""
        self._check(offset, length, False)
        self.drain()
        out = bytearray(length)
        for pos in range(0, length, self.max_payload):
            n = min(self.max_payload, length - pos)
            self._request(CMD_READ, offset + pos, n, read_buf=memoryview(out)[pos:pos + n])
            self.drain()
        return bytes(out)

    def flush(self):
        """Wait for pending writes, then NBD_CMD_FLUSH if the server has it."""
        self.drain()
        if self.can_flush:
            self._request(CMD_FLUSH, 0, 0)
            self.drain()

    def close(self, drain=True):
        """Drain (unless ``drain`` is false), send NBD_CMD_DISC and close the
        socket. Idempotent; a pending write error is raised after closing."""
        try:
            if drain and self._sock is not None:
                self.drain()
        finally:
            if self._sock is not None:
                try:
                    self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                except OSError:
                    pass  # the server is gone anyway
                self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(drain=exc_type is None)  # don't mask an exception in flight
