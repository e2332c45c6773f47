"""The error boundary: the one place an exception becomes what a caller sees.

Every boundary of the plugin ends in one of these, and none formats an
error itself:

- an executable prints :func:`error_record` (:mod:`xapi_storage_tasks.entry`);
- the socket daemon answers :func:`error_response` (:mod:`xapi_storage_tasks.daemon.rpc`);
- a worker records :func:`failure_message` as its task's Failed state
  (:mod:`xapi_storage_tasks.tasks.worker`);
- the CLI prints :func:`error_record` or :func:`one_line`
  (:mod:`xapi_storage_tasks.client.cli`).

A :class:`~xapi_storage_tasks.wire.errors.PluginError` keeps its name and
details. Anything else is unexpected: it becomes ``Internal_error`` with
its type and message, and its whole traceback (:func:`traceback_text`)
goes to the log, never to the wire. This module imports only the error
tree and the codec, so the worker, the daemon and the client can all use
it; :mod:`traceback` is imported by the failures that need it.
"""

from __future__ import annotations

from xapi_storage_tasks.wire import codec
from xapi_storage_tasks.wire.errors import InternalError, PluginError


def failure_message(exc: BaseException) -> str:
    """The short text of an exception: a PluginError's ``Name: details``,
    else ``Type: message`` (``Type`` alone when it has no message). This is
    a failed task's message."""
    if isinstance(exc, PluginError):
        return str(exc)
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


def as_plugin_error(exc: BaseException) -> PluginError:
    """Any exception as a PluginError: unexpected ones become
    ``Internal_error``, keeping the original traceback for the record."""
    if isinstance(exc, PluginError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        wrapped = InternalError("interrupted")
    else:
        wrapped = InternalError(failure_message(exc))
    wrapped.__traceback__ = exc.__traceback__
    return wrapped


def is_unexpected(exc: BaseException) -> bool:
    """True for an exception that is not one of the plugin's errors: a bug
    or an environment failure, whose traceback belongs in the log."""
    return not isinstance(exc, PluginError)


def frames(exc: BaseException) -> list[tuple[str, int]]:
    """``(file, line)`` pairs of an exception's traceback, innermost last."""
    out, tb = [], exc.__traceback__
    while tb is not None:
        out.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return out


def error_record(exc: BaseException) -> dict[str, object]:
    """The XAPI error record (``{code, params, backtrace}``) of any exception."""
    error = as_plugin_error(exc)
    return codec.error_record(error, frames(error))


def error_response(exc: BaseException, request_id: object, v2: bool, rpc_code: int | None = None) -> dict[str, object]:
    """The JSON-RPC response for a failed request: the error record, with
    ``rpc_code`` overriding the JSON-RPC 2.0 code its name gives
    (:func:`xapi_storage_tasks.wire.codec.rpc_code`)."""
    return codec.encode_error_response(error_record(exc), request_id, v2, rpc_code)


def traceback_text(exc: BaseException) -> str:
    """The whole traceback of ``exc``, as Python prints it."""
    import traceback  # only failures pay for it

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def unexpected_text(what: str, exc: BaseException) -> str:
    """The log text for an unexpected failure of ``what``: its traceback."""
    return "%s failed unexpectedly:\n%s" % (what, traceback_text(exc))


def one_line(text: str) -> str:
    """``text`` with control characters escaped, for one line of stderr."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
