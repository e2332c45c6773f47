"""The wire codec: Python objects <-> the JSON the toolstack speaks.

Pure functions only (no files, no sockets), so every rule of
``xapi-calling-convention.md`` lives here and is tested in isolation:
floats stay floats, variants are ``["Tag", contents]``, unit results are
``["UnitResult", null]``, and the error record always has every field.
"""

import json

from xapi_storage_tasks.tasks import ids
from xapi_storage_tasks.wire.errors import CODE, InvalidArguments
from xapi_storage_tasks.tasks.state import Completed, Failed, Pending

# -- task state and record ---------------------------------------------------


def encode_state(state):
    """``Pending(0.5)`` -> ``["Pending", 0.5]`` and so on."""
    if isinstance(state, Pending):
        return ["Pending", float(state.progress)]
    if isinstance(state, Completed):
        completion = {"duration": float(state.duration)}
        if state.result is not None:
            completion["result"] = state.result
        return ["Completed", completion]
    if isinstance(state, Failed):
        return ["Failed", state.message]
    raise TypeError("not a task state: %r" % (state,))


def decode_state(value):
    """Inverse of :func:`encode_state`; tags are matched case-insensitively
    as the OCaml reader does. Raises ValueError on anything else."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        raise ValueError("state is not a [tag, contents] pair")
    tag, contents = value[0].lower(), value[1]
    if tag == "pending" and _is_number(contents):
        return Pending(contents)
    if tag == "completed" and isinstance(contents, dict) and _is_number(contents.get("duration")):
        return Completed(contents["duration"], contents.get("result"))
    if tag == "failed" and isinstance(contents, str):
        return Failed(contents)
    raise ValueError("unknown task state %r" % (value,))


def encode_task(task):
    """The wire ``task`` record: ``{id, debug_info, ctime, state}``."""
    return {
        "id": task.id,
        "debug_info": task.debug_info,
        "ctime": float(task.ctime),
        "state": encode_state(task.state),
    }


UNIT_RESULT = ["UnitResult", None]

# -- the Data interface ------------------------------------------------------

OPERATION_TAGS = ("CopyV1", "MirrorV1")


def encode_operation(kind, task_id):
    """``["CopyV1", id]``."""
    return [kind, task_id]


def encode_status(state):
    """Data.stat's ``{failed, complete, progress}`` for a task state.

    ``complete`` is true only for Completed and ``failed`` only for Failed,
    so a failed task never claims ``complete`` (the toolstack checks it
    first). ``progress`` is always a float: 1.0 once Completed.
    """
    if isinstance(state, Pending):
        return {"failed": False, "complete": False, "progress": float(state.progress)}
    if isinstance(state, Completed):
        return {"failed": False, "complete": True, "progress": 1.0}
    return {"failed": True, "complete": False, "progress": 0.0}


# -- request parameters --------------------------------------------------------


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def decode_str(name, value):
    """A required string parameter, valid Unicode (JSON can smuggle in
    lone surrogates, which no path or log line can hold)."""
    if not isinstance(value, str):
        raise InvalidArguments("parameter %r must be a string" % name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArguments("parameter %r is not valid Unicode" % name)
    return value


def decode_task_id(name, value):
    """A task id: a canonical UUID, so it can never name another path."""
    decode_str(name, value)
    if not ids.is_valid(value):
        raise InvalidArguments("parameter %r is not a valid task id: %r" % (name, value[:80]))
    return value


def decode_operation(name, value):
    """``["CopyV1", id]`` -> ``("CopyV1", id)``; tags case-insensitive."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        raise InvalidArguments("parameter %r must be an operation [tag, id]" % name)
    for tag in OPERATION_TAGS:
        if value[0].lower() == tag.lower():
            return tag, decode_task_id(name, value[1])
    raise InvalidArguments("parameter %r has unknown operation %r" % (name, value[0]))


def decode_blocklist(name, value):
    """``{"blocksize": B, "ranges": [[start, length], ...]}`` -> ``(B, ranges)``.

    Ranges are in units of B; they must be non-negative, non-empty and must
    not overlap (checked after sorting). Bounds against the source size are
    checked by the operation, which knows the size.
    """
    if not isinstance(value, dict):
        raise InvalidArguments("parameter %r must be an object" % name)
    blocksize, ranges = value.get("blocksize"), value.get("ranges")
    if not _is_int(blocksize) or blocksize <= 0:
        raise InvalidArguments("%s.blocksize must be a positive integer" % name)
    if not isinstance(ranges, list):
        raise InvalidArguments("%s.ranges must be a list" % name)
    out = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_int(v) for v in item)):
            raise InvalidArguments("%s.ranges items must be [start, length] integer pairs" % name)
        start, length = item
        if start < 0 or length <= 0:
            raise InvalidArguments("%s range %r must have start >= 0 and length > 0" % (name, item))
        out.append((start, length))
    out.sort()
    for (s1, l1), (s2, _) in zip(out, out[1:]):
        if s1 + l1 > s2:
            raise InvalidArguments("%s ranges overlap at block %d" % (name, s2))
    return blocksize, out


DECODERS = {
    "str": decode_str,
    "task_id": decode_task_id,
    "operation": decode_operation,
    "blocklist": decode_blocklist,
}


def decode_params(spec, params):
    """Check a params object against ``spec`` (pairs of name and kind; a
    kind ending in ``?`` is optional) and return the decoded values as a
    dict. Unknown keys are ignored."""
    if not isinstance(params, dict):
        raise InvalidArguments("params must be a JSON object")
    out = {}
    for name, kind in spec:
        value = params.get(name)
        if kind.endswith("?"):
            out[name] = None if value is None else DECODERS[kind[:-1]](name, value)
        elif name not in params:
            raise InvalidArguments("missing parameter %r" % name)
        else:
            out[name] = DECODERS[kind](name, value)
    return out


# -- error record and JSON-RPC envelopes ------------------------------------------


def error_record(error, frames=()):
    """The XAPI error record for a :class:`~xapi_storage_tasks.wire.errors.PluginError`.

    ``frames`` are ``(file, line)`` pairs for the backtrace.
    """
    params = [str(p) for p in getattr(error, "params", [type(error).__name__, str(error)])]
    return {
        "code": str(getattr(error, "code", CODE)),
        "params": params,
        "backtrace": {
            "error": ": ".join(params),
            "files": [str(f) for f, _ in frames],
            "lines": [int(n) for _, n in frames],
        },
    }


def traceback_frames(exc):
    """``(file, line)`` pairs of an exception's traceback, innermost last."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def is_envelope(obj):
    """True for a JSON-RPC request object rather than a bare params object."""
    return isinstance(obj, dict) and "method" in obj and "params" in obj


def decode_request(obj):
    """A JSON-RPC 1.0/2.0 request -> ``(method, params, id, is_v2)``."""
    method, params = obj.get("method"), obj.get("params")
    if not isinstance(method, str):
        raise InvalidArguments("request method must be a string")
    if isinstance(params, list):
        if len(params) != 1:
            raise InvalidArguments("request params must hold exactly one object")
        params = params[0]
    return method, params, obj.get("id"), obj.get("jsonrpc") == "2.0"


# JSON-RPC 2.0 error codes by our error names; everything else is -32000.
_RPC_CODES = {"Invalid_arguments": -32602, "Unimplemented": -32601}


def encode_response(result, request_id, v2):
    """A successful JSON-RPC response."""
    if v2:
        return {"jsonrpc": "2.0", "result": result, "id": request_id}
    return {"result": result, "error": None, "id": request_id}


def encode_error_response(record, request_id, v2):
    """A failed JSON-RPC response carrying the XAPI error record."""
    if v2:
        error = {
            "code": _RPC_CODES.get(record["params"][0], -32000),
            "message": record["backtrace"]["error"],
            "data": record,
        }
        return {"jsonrpc": "2.0", "error": error, "id": request_id}
    return {"result": None, "error": record, "id": request_id}


# -- results -------------------------------------------------------------------


def encode_result(kind, value):
    """Encode a method's return value by the result kind its registry
    entry names."""
    if kind == "task":
        return encode_task(value)
    if kind == "unit":
        return None
    if kind == "id_list":
        return list(value)
    if kind == "operation":
        return encode_operation(*value)
    if kind == "operation_list":
        return [encode_operation(k, i) for k, i in value]
    if kind == "status":
        return encode_status(value)
    if kind in ("query", "attach"):  # records built to the wire's shape by their method
        return dict(value)
    if kind == "string":
        return str(value)
    raise ValueError("unknown result kind %r" % kind)


# Bytes that a JSON string cannot hold unescaped.
_UNSAFE = bytes(range(32)) + b'"\\\x7f'


def dumps(value):
    """The JSON text of a result. A long list of ids (``Task.ls`` of a big
    store) takes a fast path: strings that need no escaping are joined,
    which is several times cheaper than the general encoder."""
    if type(value) is list and len(value) > 64:
        try:
            body = '","'.join(value).encode("ascii")
        except (TypeError, UnicodeEncodeError):
            body = None
        if body is not None and len(body.translate(None, _UNSAFE)) == len(body):
            return '["%s"]' % body.decode("ascii")
    return json.dumps(value, allow_nan=False)
