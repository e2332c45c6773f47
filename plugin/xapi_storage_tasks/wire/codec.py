"""The wire codec: Python objects <-> the JSON the toolstack speaks.

Pure functions only (no files, no sockets), so every rule of the calling
convention lives here and is tested in isolation: floats stay floats,
variants are ``["Tag", contents]``, unit results are ``["UnitResult",
null]``, and the error record always has every field. (A task and its
state give their own wire shapes: ``to_wire`` and ``status`` in
:mod:`xapi_storage_tasks.tasks`, the layer above.) The convention is
the one of xapi's storage interface definitions (``task.ml``, ``data.ml``
and ``common.ml`` in xapi's ``ocaml/xapi-storage``) as
``xapi-storage-script`` and the ``rpc-light`` JSON marshaller speak it;
``shared/spec/xapi-calling-convention.md``, beside this repository, sums
it up. Also here: the JSON-RPC 1.0/2.0 envelopes and every JSON-RPC error
code the plugin answers with.
"""

from __future__ import annotations

from xapi_storage_tasks.wire import ids, jsontext
from xapi_storage_tasks.wire.errors import CODE, InvalidArguments

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time cost: typing stays out of every call
    from collections.abc import Callable, Iterable

Json = object
"""Any JSON value (the recursive type is not worth spelling out)."""

UNIT_RESULT = ["UnitResult", None]

# -- the Data interface ------------------------------------------------------

OPERATION_TAGS = ("CopyV1", "MirrorV1")


def encode_operation(kind: str, task_id: str) -> list[str]:
    """``["CopyV1", id]``."""
    return [kind, task_id]


# -- request parameters --------------------------------------------------------

MAX_BLOCKSIZE = 1 << 30
"""The largest ``blocksize`` accepted (1 GiB; block devices use 512 bytes
to a few MiB)."""

MAX_OFFSET = (1 << 63) - 1
"""The largest byte offset a range may reach: a file offset is a signed
64-bit integer (``off_t``, and NBD's offsets and OCaml's ``int64``)."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_str(name: str, value: Json) -> str:
    """A required string parameter, valid Unicode (JSON can smuggle in
    lone surrogates, which no path or log line can hold)."""
    if not isinstance(value, str):
        raise InvalidArguments("parameter %r must be a string" % name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArguments("parameter %r is not valid Unicode" % name) from None
    return value


def decode_task_id(name: str, value: Json) -> str:
    """A task id: a canonical UUID, so it can never name another path."""
    text = decode_str(name, value)
    if not ids.is_valid(text):
        raise InvalidArguments("parameter %r is not a valid task id: %r" % (name, text[:80]))
    return text


def decode_operation(name: str, value: Json) -> tuple[str, str]:
    """``["CopyV1", id]`` -> ``("CopyV1", id)``; tags case-insensitive."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        raise InvalidArguments("parameter %r must be an operation [tag, id]" % name)
    for tag in OPERATION_TAGS:
        if value[0].lower() == tag.lower():
            return tag, decode_task_id(name, value[1])
    raise InvalidArguments("parameter %r has unknown operation %r" % (name, value[0]))


def decode_blocklist(name: str, value: Json) -> tuple[int, list[tuple[int, int]]]:
    """``{"blocksize": B, "ranges": [[start, length], ...]}`` -> ``(B, ranges)``.

    Ranges are in units of B; they must be non-negative, non-empty and must
    not overlap (checked after sorting). Every integer is bounded: B at
    most :data:`MAX_BLOCKSIZE`, and no range may end past the byte offset
    :data:`MAX_OFFSET`. Bounds against the source size are checked by the
    operation, which knows the size.
    """
    if not isinstance(value, dict):
        raise InvalidArguments("parameter %r must be an object" % name)
    blocksize, ranges = value.get("blocksize"), value.get("ranges")
    if not (isinstance(blocksize, int) and not isinstance(blocksize, bool) and 0 < blocksize <= MAX_BLOCKSIZE):
        raise InvalidArguments("%s.blocksize must be an integer from 1 to %d" % (name, MAX_BLOCKSIZE))
    if not isinstance(ranges, list):
        raise InvalidArguments("%s.ranges must be a list" % name)
    out = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_int(v) for v in item)):
            raise InvalidArguments("%s.ranges items must be [start, length] integer pairs" % name)
        start, length = item
        if start < 0 or length <= 0:
            raise InvalidArguments("%s range %s must have start >= 0 and length > 0" % (name, _short(item)))
        if (start + length) * blocksize > MAX_OFFSET:
            raise InvalidArguments("%s range %s ends past byte offset %d" % (name, _short(item), MAX_OFFSET))
        out.append((start, length))
    out.sort()
    for (s1, l1), (s2, _) in zip(out, out[1:]):
        if s1 + l1 > s2:
            raise InvalidArguments("%s ranges overlap at block %d" % (name, s2))
    return blocksize, out


def _short(value: object) -> str:
    """``repr(value)``, cut to a length an error message can carry."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_int(name: str, value: Json) -> int:
    """An int64 (a JSON integer, not a boolean)."""
    if not _is_int(value) or not -(1 << 63) <= value < (1 << 63):  # type: ignore[operator]
        raise InvalidArguments("parameter %r must be a 64-bit integer" % name)
    return value  # type: ignore[return-value]


def decode_bool(name: str, value: Json) -> bool:
    """A JSON boolean."""
    if not isinstance(value, bool):
        raise InvalidArguments("parameter %r must be true or false" % name)
    return value


def decode_config(name: str, value: Json) -> dict[str, str]:
    """A string -> string map (an SR's configuration)."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArguments("parameter %r must be an object of strings" % name)
    return dict(value)


DECODERS: dict[str, Callable[[str, Json], object]] = {
    "str": decode_str,
    "int": decode_int,
    "bool": decode_bool,
    "config": decode_config,
    "task_id": decode_task_id,
    "operation": decode_operation,
    "blocklist": decode_blocklist,
}


def decode_params(spec: Iterable[tuple[str, str]], params: Json) -> dict[str, object]:
    """Check a params object against ``spec`` (pairs of name and kind; a
    kind ending in ``?`` is optional) and return the decoded values as a
    dict. Unknown keys are ignored."""
    if not isinstance(params, dict):
        raise InvalidArguments("params must be a JSON object")
    spec = tuple(spec)
    for name, kind in spec:  # a missing parameter is named before any mistyped one
        if not kind.endswith("?") and name not in params:
            raise InvalidArguments("missing parameter %r" % name)
    out = {}
    for name, kind in spec:
        value = params.get(name)
        if kind.endswith("?"):
            out[name] = None if value is None else DECODERS[kind[:-1]](name, value)
        else:
            out[name] = DECODERS[kind](name, value)
    return out


# -- error record and JSON-RPC envelopes ------------------------------------------


def error_record(error: BaseException, frames: Iterable[tuple[str, int]] = ()) -> dict[str, object]:
    """The XAPI error record for a :class:`~xapi_storage_tasks.wire.errors.PluginError`.

    ``frames`` are ``(file, line)`` pairs for the backtrace. (Any other
    exception becomes a PluginError first:
    :func:`xapi_storage_tasks.wire.boundary.error_record`.)
    """
    params = [str(p) for p in getattr(error, "params", [type(error).__name__, str(error)])]
    frames = list(frames)
    return {
        "code": str(getattr(error, "code", CODE)),
        "params": params,
        "backtrace": {
            "error": ": ".join(params),
            "files": [str(f) for f, _ in frames],
            "lines": [int(n) for _, n in frames],
        },
    }


def is_envelope(obj: Json) -> bool:
    """True for a JSON-RPC request object rather than a bare params object."""
    return isinstance(obj, dict) and "method" in obj and "params" in obj


def decode_request(obj: dict[str, Json]) -> tuple[str, Json, Json, bool]:
    """A JSON-RPC 1.0/2.0 request -> ``(method, params, id, is_v2)``."""
    method, params = obj.get("method"), obj.get("params")
    if not isinstance(method, str):
        raise InvalidArguments("request method must be a string")
    if isinstance(params, list):
        if len(params) != 1:
            raise InvalidArguments("request params must hold exactly one object")
        params = params[0]
    return method, params, obj.get("id"), obj.get("jsonrpc") == "2.0"


# JSON-RPC 2.0 error codes: the standard ones, and -32000 (the first of the
# range for implementation-defined server errors) for everything else.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
SERVER_ERROR = -32000

_RPC_CODES = {"Invalid_arguments": INVALID_PARAMS, "Unimplemented": METHOD_NOT_FOUND}


def rpc_code(error_name: str) -> int:
    """The JSON-RPC 2.0 error code for an error name."""
    return _RPC_CODES.get(error_name, SERVER_ERROR)


def encode_response(result: Json, request_id: Json, v2: bool) -> dict[str, object]:
    """A successful JSON-RPC response."""
    if v2:
        return {"jsonrpc": "2.0", "result": result, "id": request_id}
    return {"result": result, "error": None, "id": request_id}


def encode_error_response(record: dict, request_id: Json, v2: bool, code: int | None = None) -> dict[str, object]:
    """A failed JSON-RPC response carrying the XAPI error record; ``code``
    overrides the JSON-RPC 2.0 code the record's error name gives."""
    if v2:
        error = {
            "code": rpc_code(record["params"][0]) if code is None else code,
            "message": record["backtrace"]["error"],
            "data": record,
        }
        return {"jsonrpc": "2.0", "error": error, "id": request_id}
    return {"result": None, "error": record, "id": request_id}


# -- results -------------------------------------------------------------------


def encode_result(kind: str, value: object) -> Json:
    """Encode a method's return value by the result kind its registry
    entry names."""
    if kind in ("task", "status"):  # a task or its state: they know their wire shapes
        return value.to_wire() if kind == "task" else value.status()  # type: ignore[attr-defined]
    if kind == "unit":
        return None
    if kind == "id_list":
        return list(value)  # type: ignore[call-overload]
    if kind == "operation":
        return encode_operation(*value)  # type: ignore[misc]
    if kind == "operation_list":
        return [encode_operation(k, i) for k, i in value]  # type: ignore[attr-defined]
    if kind in ("query", "attach", "record"):  # records built to the wire's shape by their method
        return dict(value)  # type: ignore[call-overload]
    if kind == "record_list":
        return [dict(v) for v in value]  # type: ignore[attr-defined]
    if kind == "string":
        return str(value)
    raise ValueError("unknown result kind %r" % kind)


RESULT_KINDS = ("task", "unit", "id_list", "operation", "operation_list", "status", "query", "attach", "record", "record_list",
                "string")

# Bytes that a JSON string cannot hold unescaped.
_UNSAFE = bytes(range(32)) + b'"\\\x7f'


def loads(text: str) -> Json:
    """One strict JSON value (:func:`xapi_storage_tasks.wire.jsontext.loads`)."""
    return jsontext.loads(text)


def dumps(value: Json) -> str:
    """The JSON text of a result. A long list of ids (``Task.ls`` of a big
    store) takes a fast path: strings that need no escaping are joined,
    which is several times cheaper than the general encoder."""
    if type(value) is list and len(value) > 64:
        try:
            body = '", "'.join(value).encode("ascii")
        except (TypeError, UnicodeEncodeError):
            body = None
        # The separators hold exactly two quotes each: any other byte
        # deleted was in an item and needs escaping.
        if body is not None and len(body) - len(body.translate(None, _UNSAFE)) == 2 * (len(value) - 1):
            return '["%s"]' % body.decode("ascii")
    return jsontext.dumps(value)
