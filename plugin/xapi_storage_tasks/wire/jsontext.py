"""Strict JSON text to Python values and back, without importing :mod:`json`.

Every executable call parses one params object and prints one result, and
``import json`` costs more than the rest of a ``Task.stat`` (it pulls in
:mod:`re`, :mod:`enum` and their dependencies, about two thirds of a bare
interpreter start). The work is done by CPython's C accelerator ``_json``,
the same code :mod:`json` uses, so the text accepted and produced is the
same as ``json.loads`` / ``json.dumps`` with their defaults (ASCII output,
``", "`` and ``": "`` separators). Where ``_json`` is missing (another
Python implementation) the :mod:`json` module does the work instead.

Stricter than ``json.loads``: ``NaN``, ``Infinity`` and numbers that
overflow a float (``1e999``) are refused, as the wire has no such values.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_SPACE = " \t\n\r"


class JsonError(ValueError):
    """The text is not one strict JSON value."""


def _reject_constant(name: str) -> object:
    raise JsonError("%s is not valid JSON" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonError("number %s is out of range" % text[:40])
    return value


def _unencodable(value: object) -> object:
    raise TypeError("%s is not JSON serializable" % type(value).__name__)


class _Options:
    """What the C scanner reads from a decoder object."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    memo: dict[str, str] = {}
    parse_float = staticmethod(_finite_float)
    parse_int = int
    parse_constant = staticmethod(_reject_constant)


_scan: Callable[[str, int], tuple[object, int]]
_encoders: dict[bool, Callable[[object, int], list[str]]] = {}
try:
    import _json

    _scan = _json.make_scanner(_Options())  # type: ignore[arg-type]  # any object with the decoder's attributes
    for _compact, (_colon, _comma) in ((False, (": ", ", ")), (True, (":", ","))):
        _encoders[_compact] = _json.make_encoder(
            None, _unencodable, _json.encode_basestring_ascii, None, _colon, _comma, False, False, False
        )
except (ImportError, AttributeError, TypeError):  # not CPython: the json module does it
    import json

    _scan = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant).raw_decode


def loads(text: str) -> object:
    """The one JSON value of ``text`` (whitespace around it allowed).
    Raises :class:`JsonError` (a ValueError) for anything else, and
    RecursionError for absurd nesting."""
    start = len(text) - len(text.lstrip(_SPACE))
    try:
        try:
            value, end = _scan(text, start)
        except SystemError:
            # Before Python 3.12, _json raises its errors inside a value
            # (``{"a": }``) as json.decoder.JSONDecodeError only when that
            # module is already imported, and else fails with SystemError.
            # The error path alone pays for importing it, then scans again.
            import json.decoder  # noqa: F401

            value, end = _scan(text, start)
    except StopIteration as e:
        raise JsonError("expecting a value at character %d" % e.value) from None
    except JsonError:
        raise
    except ValueError as e:  # json.decoder.JSONDecodeError
        raise JsonError(str(e)) from None
    if text[end:].strip(_SPACE):
        raise JsonError("extra data at character %d" % end)
    return value


def dumps(value: object, compact: bool = False) -> str:
    """The JSON text of ``value``: ASCII, ``", "`` and ``": "`` between
    items (``","`` and ``":"`` when ``compact``). NaN and infinities raise
    ValueError, anything that is not a JSON value TypeError, a value that
    contains itself RecursionError."""
    encode = _encoders.get(compact)
    if encode is None:
        import json

        return json.dumps(value, allow_nan=False, separators=(",", ":") if compact else None)
    return "".join(encode(value, 0))
