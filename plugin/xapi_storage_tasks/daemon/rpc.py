"""JSON-RPC on one HTTP connection: the daemon's request loop, and the
dispatch of each request through :func:`xapi_storage_tasks.entry.call`;
errors become answers through :mod:`xapi_storage_tasks.wire.boundary`
(the JSON-RPC codes are :mod:`xapi_storage_tasks.wire.codec`'s).

:func:`dispatch` turns a request body into the response the executables
would print in envelope mode, byte for byte once :func:`encode_body` has
encoded it; every answer to a parsed request is HTTP 200. Requests that
fail before a request object exists (bodies that are not JSON or not an
object, and HTTP refusals, :func:`refusal_body`) are answered in the
JSON-RPC 2.0 form, ``{"jsonrpc": "2.0", "error": {"code", "message",
"data": <record>}, "id": null}``: -32700 for unparseable JSON, -32600 for
an invalid request, -32000 for refusals.

:func:`serve_connection` serves one accepted connection: keep-alive,
pipelined requests, the idle and request timeouts of :mod:`xapi_storage_tasks.wire.httpio`,
and an HTTP refusal that closes the connection after its answer.
"""

from __future__ import annotations

import socket
import time

from xapi_storage_tasks import entry
from xapi_storage_tasks.wire import boundary, codec, httpio
from xapi_storage_tasks.wire.codec import INVALID_REQUEST, PARSE_ERROR, SERVER_ERROR
from xapi_storage_tasks.wire.errors import InternalError, InvalidArguments, PluginError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

LINGER = 2.0  # seconds a refused connection may take to send its request


# -- JSON-RPC ---------------------------------------------------------------------


def dispatch(body: bytes, log: Callable[[str], object] | None = None) -> dict[str, object]:
    """One JSON-RPC request body (bytes) -> the response object. Never
    raises: every failure is an error response, as the executables print
    it. ``log(text)`` receives the traceback of unexpected errors."""
    try:
        request = entry.parse_json(body)
    except PluginError as error:
        return boundary.error_response(error, None, True, PARSE_ERROR)
    if not isinstance(request, dict):
        why = "batch requests are not supported" if isinstance(request, list) else "a request must be a JSON object"
        return boundary.error_response(InvalidArguments(why), None, True, INVALID_REQUEST)
    v2 = request.get("jsonrpc") == "2.0"
    request_id = request.get("id")
    try:
        if not codec.is_envelope(request):
            raise InvalidArguments('a request needs "method" and "params"')
        method, params, _, _ = codec.decode_request(request)
    except PluginError as error:
        return boundary.error_response(error, request_id, v2, INVALID_REQUEST)
    try:
        return codec.encode_response(entry.call(method, params), request_id, v2)
    except BaseException as exc:  # the boundary, as in entry.main: every failure becomes a record
        if boundary.is_unexpected(exc) and log is not None:
            log(boundary.unexpected_text(method, exc))
        return boundary.error_response(exc, request_id, v2)


def encode_body(response: object) -> bytes:
    """The response body as the executables print it: JSON and a newline."""
    return (codec.dumps(response) + "\n").encode("utf-8")


def refusal_body(status: int, error: PluginError) -> bytes:
    """The JSON-RPC 2.0 error answer for an HTTP-level refusal."""
    # The request's fault (malformed, too big, too slow, wrong method or
    # version) is an invalid request; a refusal of the peer or a failure of
    # ours is a server error.
    rpc_code = SERVER_ERROR if status in (403, 500, 503) else INVALID_REQUEST
    return encode_body(boundary.error_response(error, None, True, rpc_code))


# -- one connection ------------------------------------------------------------------


def serve_connection(conn: socket.socket, timeout: float, log: Callable[[str], object], stopping: Callable[[], bool],
                     on_busy: Callable[[], object], on_idle: Callable[[], bool]) -> None:
    """Serve the requests that arrive on ``conn`` until the peer closes it,
    idles past ``timeout``, is refused, or the daemon stops.

    ``stopping()`` says whether the daemon is stopping; ``on_busy()`` is
    called when the first byte of a request arrives, ``on_idle()`` once a
    request is answered on a kept-alive connection, and returns False when
    the connection must end instead. ``log(text)`` receives unexpected
    failures. Never raises an Exception; the caller closes ``conn``.
    """
    reader = httpio.Reader(conn)
    try:
        while True:
            # A connection accepted while stopping was queued before the
            # socket went away: serve what it already sent, not wait.
            idle = timeout if not stopping() else min(timeout, 1.0)
            try:
                request = httpio.read_request(reader, idle, timeout, on_start=on_busy)
            except httpio.Closed:
                return
            except httpio.HttpError as e:
                answer_refusal(conn, e, timeout)
                return
            response = dispatch(request.body, log)
            keep = request.keep_alive and not stopping()
            conn.settimeout(timeout)
            conn.sendall(httpio.format_response(200, encode_body(response), keep))
            if not keep or not on_idle():
                return
    except OSError:
        pass  # the peer went away or stopped reading: nothing to answer
    except Exception as exc:  # a bug here must cost one connection, not the daemon
        log(boundary.unexpected_text("a connection", exc))
        try:
            conn.sendall(httpio.format_response(500, refusal_body(500, InternalError(str(exc))), False))
        except OSError:
            pass


def answer_refusal(conn: socket.socket, e: httpio.HttpError, timeout: float) -> None:
    """Answer the :class:`xapi_storage_tasks.wire.httpio.HttpError` ``e`` on ``conn`` and end
    the conversation (the caller closes ``conn``)."""
    error = InvalidArguments(e.message)
    try:
        conn.settimeout(timeout)
        conn.sendall(httpio.format_response(e.status, refusal_body(e.status, error), False, e.headers))
        conn.shutdown(socket.SHUT_WR)
        # Read (and drop) what the peer is still sending, briefly, so that
        # it sees our answer rather than a reset.
        deadline = time.monotonic() + LINGER
        drained = 0
        while drained <= 2 * httpio.MAX_BODY:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.settimeout(remaining)
            data = conn.recv(httpio.CHUNK)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
