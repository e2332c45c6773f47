"""The executable boundary: argv and stdin in, one JSON value out.

Every ``bin/Interface.method`` executable is a link to one dispatcher that
calls :func:`main`; the method is the executable's name, looked up in
:mod:`xapi_storage_tasks.registry`. Failures become the XAPI error record
(exit status 1) through :mod:`xapi_storage_tasks.wire.boundary`. The
calling modes:

``NAME --json``      stdin holds the params object; stdout the bare result.
``NAME < req.json``  stdin holds a JSON-RPC request (or a bare params
                     object); stdout the JSON-RPC response (or bare result).
``NAME ARG...``      positional arguments in the registry's order.

The toolstack calls these back to back, one process each, so this module
and everything a call imports stay light: no :mod:`json` (the codec's
:mod:`~xapi_storage_tasks.wire.jsontext` does it), no :mod:`argparse`
(positional mode only), no error formatting until something fails, no
logging set-up.
"""

from __future__ import annotations

import os
import sys

from xapi_storage_tasks import registry, settings
from xapi_storage_tasks.wire import codec
from xapi_storage_tasks.wire.errors import InvalidArguments, Unimplemented

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from typing import NoReturn

MAX_INPUT = settings.MAX_INPUT


def parse_json(data: bytes) -> object:
    """Strict JSON from bytes: UTF-8 only, no NaN/Infinity, at most
    :data:`MAX_INPUT` bytes. Raises InvalidArguments."""
    if len(data) > MAX_INPUT:
        raise InvalidArguments("input is larger than %d bytes" % MAX_INPUT)
    try:
        return codec.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidArguments("input is not UTF-8: %s" % e.reason) from None
    except ValueError as e:
        raise InvalidArguments("input is not valid JSON: %s" % e) from None
    except RecursionError:
        raise InvalidArguments("input is nested too deeply") from None


def _read_stdin() -> object:
    return parse_json(sys.stdin.buffer.read(MAX_INPUT + 1))


def call(name: str, params: object) -> object:
    """Run registered method ``name`` on a params object; return its wire
    result. Raises PluginError subclasses for every failure the caller
    should see. Shared with the socket daemon."""
    method = registry.lookup(name)
    if method is None:
        raise Unimplemented(name)
    kwargs = codec.decode_params(method.params, params)
    return codec.encode_result(method.result, method.impl(**kwargs))


def _positional(method: registry.Method, args: list[str]) -> dict[str, object]:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]  # a usage error is bad input like any other
            raise InvalidArguments("%s (try %s --help)" % (message, method.name))

    parser = Parser(
        prog=method.name,
        description="XAPI storage plugin method %s. With --json as the only argument, the params "
        "object is read from stdin; with no arguments, a JSON-RPC request." % method.name,
    )
    for pname, kind in method.params:
        parser.add_argument(pname, help="%s (%s%s)" % (pname, kind, ", as JSON" if kind not in ("str", "task_id") else ""))
    ns = parser.parse_args(args)
    params = {}
    for pname, kind in method.params:
        value = getattr(ns, pname)
        params[pname] = value if kind in ("str", "task_id") else parse_json(value.encode("utf-8", "surrogateescape"))
    return params


def _emit(value: object) -> None:
    sys.stdout.write(codec.dumps(value) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run one method call as an executable; returns the exit status."""
    argv = sys.argv if argv is None else argv
    name = os.path.basename(argv[0])
    args = argv[1:]
    envelope: dict | None = None
    try:
        method = registry.lookup(name)
        params: object = None
        if args == ["--json"]:
            params = _read_stdin()
        elif not args:
            params = _read_stdin()
            if isinstance(params, dict) and codec.is_envelope(params):
                envelope = params  # from here on, errors are answered as envelopes too
                requested, params, _, _ = codec.decode_request(params)
                if method is not None and requested.lower() != name.lower():
                    raise InvalidArguments("request for %s sent to the %s executable" % (requested, name))
        if method is None:
            raise Unimplemented(name)
        name = method.name
        if args and args != ["--json"]:
            params = _positional(method, args)
        result = call(name, params)
        if envelope is not None:
            result = codec.encode_response(result, envelope.get("id"), envelope.get("jsonrpc") == "2.0")
        _emit(result)
        return 0
    except SystemExit:
        raise  # argparse's --help
    except BaseException as exc:  # the one boundary: nothing escapes as a traceback
        from xapi_storage_tasks.wire import boundary  # only failures pay for it

        if envelope is not None:
            _emit(boundary.error_response(exc, envelope.get("id"), envelope.get("jsonrpc") == "2.0"))
        else:
            _emit(boundary.error_record(exc))
        sys.stderr.write(boundary.one_line("%s: %s" % (name, boundary.as_plugin_error(exc))) + "\n")
        if boundary.is_unexpected(exc):
            _log_traceback(name, exc)
        return 1


LEAN_EXIT = frozenset({"Task.stat", "Task.ls", "Data.stat", "Data.ls"})
"""The polled reads, whose work is all plain system calls on the store:
once their answer is flushed, nothing is left for the interpreter's
teardown to do, and that teardown (freeing every module) costs a quarter
of a bare interpreter start."""


def run(argv: list[str]) -> NoReturn:
    """The executables' exit: :func:`main`, then leave. After a polled read
    (:data:`LEAN_EXIT`) with its output flushed, no thread and no exit
    handler, leave at once (``os._exit``); otherwise through the usual
    teardown."""
    status = main(argv)
    method = registry.lookup(os.path.basename(argv[0]))
    if method is not None and method.name in LEAN_EXIT and "threading" not in sys.modules:
        import atexit

        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            sys.exit(status)  # e.g. a closed pipe: the teardown reports it as usual
        handlers = getattr(atexit, "_ncallbacks", None)  # CPython's count of exit handlers
        if handlers is not None and handlers() == 0:
            os._exit(status)
    sys.exit(status)


def _log_traceback(name: str, exc: BaseException) -> None:
    """The traceback of an unexpected error goes to the log, not the wire."""
    try:
        from xapi_storage_tasks.tasks import log
        from xapi_storage_tasks.tasks.store import Store
        from xapi_storage_tasks.wire import boundary

        with Store() as store:
            log.store_event(store, boundary.unexpected_text(name, exc))
    except Exception:
        pass
