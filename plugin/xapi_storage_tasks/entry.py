"""The executable boundary: argv and stdin in, one JSON value out.

Every ``bin/Interface.method`` executable is a link to one dispatcher that
calls :func:`main`; the method is the executable's name, looked up in
:mod:`xapi_storage_tasks.registry`. This is the one place where exceptions become the
XAPI error record (exit status 1) and where the calling modes differ:

``NAME --json``      stdin holds the params object; stdout the bare result.
``NAME < req.json``  stdin holds a JSON-RPC request (or a bare params
                     object); stdout the JSON-RPC response (or bare result).
``NAME ARG...``      positional arguments in the registry's order.
"""

import json
import os
import sys

from xapi_storage_tasks.wire import codec
from xapi_storage_tasks import registry, settings
from xapi_storage_tasks.wire.errors import InternalError, InvalidArguments, PluginError, Unimplemented

MAX_INPUT = settings.MAX_INPUT


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number %s is out of range" % text[:40])
    return value


def parse_json(data):
    """Strict JSON from bytes: UTF-8 only, no NaN/Infinity, at most 1 MiB."""
    if len(data) > MAX_INPUT:
        raise InvalidArguments("input is larger than %d bytes" % MAX_INPUT)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError as e:
        raise InvalidArguments("input is not UTF-8: %s" % e.reason)
    except ValueError as e:
        raise InvalidArguments("input is not valid JSON: %s" % e)
    except RecursionError:
        raise InvalidArguments("input is nested too deeply")


def _read_stdin():
    return parse_json(sys.stdin.buffer.read(MAX_INPUT + 1))


def call(name, params):
    """Run registered method ``name`` on a params object; return its wire
    result. Raises PluginError subclasses for every failure the caller
    should see. Shared with the socket daemon."""
    found = registry.lookup(name)
    if found is None:
        raise Unimplemented(name)
    _, (module, function, spec, kind) = found
    kwargs = codec.decode_params(spec, params)
    impl = getattr(__import__(module, fromlist=[function]), function)
    return codec.encode_result(kind, impl(**kwargs))


def record_of(exc):
    """The XAPI error record for any exception: the one translation, used
    by the executables and the daemon alike."""
    error = as_plugin_error(exc)
    return codec.error_record(error, codec.traceback_frames(error))


def unexpected_text(name, exc):
    """The log text for an unexpected error: its whole traceback."""
    import traceback

    return "%s failed unexpectedly:\n%s" % (name, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def as_plugin_error(exc):
    """Any exception as a PluginError: unexpected ones become
    Internal_error, keeping the original traceback for the record."""
    if isinstance(exc, PluginError):
        return exc
    wrapped = InternalError("%s: %s" % (type(exc).__name__, exc))
    wrapped.__traceback__ = exc.__traceback__
    return wrapped


def _positional(name, spec, args):
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # a usage error is bad input like any other
            raise InvalidArguments("%s (try %s --help)" % (message, name))

    parser = Parser(
        prog=name,
        description="XAPI storage plugin method %s. With --json as the only argument, the params "
        "object is read from stdin; with no arguments, a JSON-RPC request." % name,
    )
    for pname, kind in spec:
        parser.add_argument(pname, help="%s (%s%s)" % (pname, kind, ", as JSON" if kind not in ("str", "task_id") else ""))
    ns = parser.parse_args(args)
    params = {}
    for pname, kind in spec:
        value = getattr(ns, pname)
        params[pname] = value if kind in ("str", "task_id") else parse_json(value.encode("utf-8", "surrogateescape"))
    return params


def _emit(value):
    sys.stdout.write(codec.dumps(value) + "\n")
    sys.stdout.flush()


def main(argv=None):
    """Run one method call as an executable; returns the exit status."""
    argv = sys.argv if argv is None else argv
    name = os.path.basename(argv[0])
    args = argv[1:]
    envelope = None
    try:
        found = registry.lookup(name)
        if args == ["--json"]:
            params = _read_stdin()
        elif not args:
            params = _read_stdin()
            if codec.is_envelope(params):
                envelope = params  # from here on, errors are answered as envelopes too
                method, params, _, _ = codec.decode_request(params)
                if found is not None and method.lower() != name.lower():
                    raise InvalidArguments("request for %s sent to the %s executable" % (method, name))
        if found is None:
            raise Unimplemented(name)
        name, (_, _, spec, _) = found
        if args and args != ["--json"]:
            params = _positional(name, spec, args)
        result = call(name, params)
        if envelope is not None:
            result = codec.encode_response(result, envelope.get("id"), envelope.get("jsonrpc") == "2.0")
        _emit(result)
        return 0
    except SystemExit:
        raise  # argparse's --help
    except BaseException as exc:  # the one boundary: nothing escapes as a traceback
        if isinstance(exc, KeyboardInterrupt):
            exc = InternalError("interrupted")
        error = as_plugin_error(exc)
        record = record_of(error)
        if envelope is not None:
            record = codec.encode_error_response(record, envelope.get("id"), envelope.get("jsonrpc") == "2.0")
        _emit(record)
        sys.stderr.write(_one_line("%s: %s" % (name, error)) + "\n")
        if not isinstance(exc, PluginError):
            _log_traceback(name, exc)
        return 1


def _one_line(text):
    """``text`` with control characters escaped, so stderr gets one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _log_traceback(name, exc):
    """The traceback of an unexpected error goes to the log, not the wire."""
    try:
        from xapi_storage_tasks.tasks import log
        from xapi_storage_tasks.tasks.store import Store

        with Store() as store:
            log.store_event(store, unexpected_text(name, exc))
    except Exception:
        pass
