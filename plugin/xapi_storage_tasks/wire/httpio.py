"""The wire between the task daemon and its clients: minimal HTTP/1.1
framing over a Unix-domain socket, with hard limits.

Only what JSON-RPC needs is understood: a request line, header fields, and
a body delimited by ``Content-Length`` (at most 1 MiB, the executables'
input limit). Anything else is refused with the status a strict server
gives: 400 (malformed), 405 (not POST), 408 (too slow), 411 (no length, or
a transfer coding), 413 (too large), 431 (header block over 16 KiB), 505
(not HTTP/1.x). Every refusal closes the connection, so a confused peer
can never desynchronise the stream.

Reads have two clocks: a peer may sit idle between requests for the idle
timeout, and once the first byte of a request has arrived the whole request
must arrive within the request timeout (a half-sent request cannot hold a
connection forever).

Also here, because both ends need it: the default socket path. (The error
names the daemon answers a refused connection with, ``Permission_denied``
and ``Service_unavailable``, are in :mod:`xapi_storage_tasks.wire.errors`.)
"""

from __future__ import annotations

import os
import re
import socket
import time

from xapi_storage_tasks import settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

MAX_BODY = settings.MAX_INPUT  # the executables' limit, so both transports agree
MAX_HEAD = 16 * 1024
CHUNK = 64 * 1024
SOCKET_NAME = "daemon.sock"

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
_TARGET = re.compile(rb"^[\x21-\x7e]+$")
_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


def default_socket() -> str:
    """The daemon's default socket: ``daemon.sock`` in the state directory
    (``/run/xapi-storage-tasks/daemon.sock`` for root), so a daemon and a
    client that agree on ``TASK_STATE_DIR`` find each other."""
    return os.path.join(settings.state_dir(), SOCKET_NAME)


class HttpError(Exception):
    """A request the server refuses at the HTTP level; the connection is
    closed after the answer."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)


class Closed(Exception):
    """The peer closed the connection, or stayed idle past the idle
    timeout, before sending the first byte of a message."""


class Request:
    """One parsed request; ``headers`` maps lower-case names to values."""

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive")

    def __init__(self, method: str, target: str, version: tuple[int, int], headers: dict[str, str], body: bytes,
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class Response:
    """One parsed response."""

    __slots__ = ("status", "reason", "headers", "body", "keep_alive")

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class Reader:
    """Buffered reads from a connected socket against deadlines (values of
    :func:`time.monotonic`). Bytes past the current message stay buffered
    for the next one, so pipelined requests work."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self, deadline: float) -> bool:
        """Receive more bytes; False at end of stream. Raises
        ``socket.timeout`` once ``deadline`` has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(remaining)
        data = self.sock.recv(CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def read_exact(self, count: int, deadline: float) -> bytes:
        """Exactly ``count`` bytes; ``HttpError(400)`` if the stream ends
        first, ``socket.timeout`` past ``deadline``."""
        while len(self.buf) < count:
            if not self.fill(deadline):
                raise HttpError(400, "the connection ended inside a message body")
        data = bytes(self.buf[:count])
        del self.buf[:count]
        return data

    def read_until_close(self, deadline: float, limit: int) -> bytes:
        """Everything up to the end of the stream (a response without
        Content-Length), at most ``limit`` bytes."""
        while self.fill(deadline):
            if len(self.buf) > limit:
                raise HttpError(413, "message body larger than %d bytes" % limit)
        data = bytes(self.buf)
        self.buf.clear()
        return data


def read_head(reader: Reader, idle_timeout: float, timeout: float,
              on_start: Callable[[], object] | None = None) -> tuple[bytes, float]:
    """The next message head (request or status line and fields, without
    the blank line) and the deadline for the rest of the message.

    Raises :class:`Closed` if the stream ends or the idle timeout passes
    before any byte; ``HttpError(408)`` if a started head is not complete
    within ``timeout``; ``HttpError(431)`` past :data:`MAX_HEAD`.
    ``on_start()`` is called when the first byte of the message is seen.
    """
    buf = reader.buf
    idle_deadline = time.monotonic() + idle_timeout
    deadline = None
    while True:
        if deadline is None:
            # Empty lines before a request line are to be ignored (RFC 9112
            # section 2.2); they do not start a request.
            while buf[:2] == b"\r\n" or buf[:1] == b"\n":
                del buf[: 2 if buf[:1] == b"\r" else 1]
            if buf and buf != b"\r":
                deadline = time.monotonic() + timeout
                if on_start is not None:
                    on_start()
        if deadline is not None:
            found = _END_OF_HEAD.search(buf, 0, MAX_HEAD + 4)
            if found:
                head = bytes(buf[: found.start()])
                del buf[: found.end()]
                return head, deadline
            if len(buf) > MAX_HEAD:
                raise HttpError(431, "header block larger than %d bytes" % MAX_HEAD)
        try:
            more = reader.fill(idle_deadline if deadline is None else deadline)
        except socket.timeout:
            if deadline is None:
                raise Closed("idle") from None
            raise HttpError(408, "the request was not received within %g s" % timeout) from None
        except (ConnectionResetError, BrokenPipeError):
            more = False
        if not more:
            if deadline is None:
                raise Closed("end of stream")
            raise HttpError(400, "the connection ended inside a message head")


def _fields(lines: Sequence[bytes]) -> dict[str, str]:
    """Header fields as a dict of lower-case name -> value (latin-1 text).
    Repeated fields are joined with ", " (RFC 9110 section 5.3)."""
    fields: dict[str, str] = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete line folding in header fields")
        raw_name, sep, raw_value = line.partition(b":")
        if not sep or not _TOKEN.match(raw_name):
            raise HttpError(400, "malformed header field %r" % line[:80].decode("latin-1"))
        raw_value = raw_value.strip(b" \t")
        if not _FIELD_VALUE.match(raw_value):
            raise HttpError(400, "control character in header field %s" % raw_name.decode("latin-1"))
        key = raw_name.decode("ascii").lower()
        text = raw_value.decode("latin-1")
        if key in fields:
            if key == "content-length":
                if fields[key] != text:  # conflicting lengths: a smuggling attempt or a bug
                    raise HttpError(400, "conflicting Content-Length fields")
                continue
            text = fields[key] + ", " + text
        fields[key] = text
    return fields


def _lines(head: bytes) -> list[bytes]:
    return [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]


def _version(raw: bytes) -> tuple[int, int]:
    found = _VERSION.match(raw)
    if not found:
        raise HttpError(400, "malformed HTTP version %r" % raw[:20].decode("latin-1"))
    if found.group(1) != b"1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    return (1, int(found.group(2)))


def _keep_alive(version: tuple[int, int], fields: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in fields.get("connection", "").split(",")}
    if version >= (1, 1):
        return "close" not in tokens
    return "keep-alive" in tokens


def _content_length(fields: dict[str, str]) -> int | None:
    if "transfer-encoding" in fields:
        # Chunked bodies are not needed by any JSON-RPC client; refusing
        # them removes a whole class of framing ambiguities.
        raise HttpError(411, "Transfer-Encoding is not supported; send Content-Length")
    text = fields.get("content-length")
    if text is None:
        return None
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise HttpError(400, "malformed Content-Length %r" % text[:40])
    return int(text)


def read_request(reader: Reader, idle_timeout: float, timeout: float, methods: Sequence[str] = ("POST",),
                 on_start: Callable[[], object] | None = None) -> Request:
    """Read one request from ``reader``: its head, then its body.

    Raises :class:`Closed` before any byte of a request, and
    :class:`HttpError` for anything refused. Methods outside ``methods``
    are refused (405) before their body is read; a body over
    :data:`MAX_BODY` is refused (413) before it is read. A client that
    sent ``Expect: 100-continue`` is told to go on only once its request
    has passed those checks.
    """
    head, deadline = read_head(reader, idle_timeout, timeout, on_start)
    lines = _lines(head)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]):
        raise HttpError(400, "malformed request line %r" % lines[0][:80].decode("latin-1"))
    version = _version(parts[2])
    fields = _fields(lines[1:])
    method = parts[0].decode("ascii")
    if method not in methods:
        raise HttpError(405, "method %s is not allowed; POST a JSON-RPC request" % method[:20],
                        [("Allow", ", ".join(methods))])
    length = _content_length(fields)
    if length is None:
        raise HttpError(411, "a %s request needs Content-Length" % method)
    if length > MAX_BODY:
        raise HttpError(413, "request body of %d bytes is larger than %d bytes" % (length, MAX_BODY))
    if version >= (1, 1) and fields.get("expect", "").lower() == "100-continue" and len(reader.buf) < length:
        reader.sock.settimeout(max(0.001, deadline - time.monotonic()))
        reader.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        body = reader.read_exact(length, deadline)
    except socket.timeout:
        raise HttpError(408, "the request body was not received within %g s" % timeout) from None
    except (ConnectionResetError, BrokenPipeError):
        raise HttpError(400, "the connection ended inside a message body") from None
    return Request(method, parts[1].decode("ascii"), version, fields, body, _keep_alive(version, fields))


def read_response(reader: Reader, timeout: float, limit: int = 64 << 20) -> Response:
    """Read one response (1xx interim responses are skipped). Raises
    :class:`Closed` if the stream ends before the first byte; ``limit``
    bounds the body."""
    while True:
        head, deadline = read_head(reader, timeout, timeout)
        lines = _lines(head)
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
            raise HttpError(400, "malformed status line %r" % lines[0][:80].decode("latin-1"))
        version = _version(parts[0])
        status = int(parts[1])
        fields = _fields(lines[1:])
        if 100 <= status < 200:
            continue
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        length = _content_length(fields)
        keep_alive = _keep_alive(version, fields)
        try:
            if length is None:
                body, keep_alive = reader.read_until_close(deadline, limit), False
            elif length > limit:
                raise HttpError(413, "response body of %d bytes is larger than %d bytes" % (length, limit))
            else:
                body = reader.read_exact(length, deadline)
        except socket.timeout:
            raise HttpError(408, "the response was not received within %g s" % timeout) from None
        return Response(status, reason, fields, body, keep_alive)


def format_response(status: int, body: bytes, keep_alive: bool, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete response as bytes; ``body`` is JSON text as bytes."""
    head = [
        "HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown")),
        "Content-Type: application/json",
        "Content-Length: %d" % len(body),
        "Connection: %s" % ("keep-alive" if keep_alive else "close"),
    ]
    head.extend("%s: %s" % pair for pair in headers)
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def format_request(body: bytes, path: str = "/") -> bytes:
    """A complete keep-alive POST of the JSON ``body`` (bytes)."""
    head = (
        "POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Accept: application/json\r\nContent-Length: %d\r\n\r\n" % (path, len(body))
    )
    return head.encode("ascii") + body
