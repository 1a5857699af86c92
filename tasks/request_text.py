"""A request as it arrives, JSON text or a Python dict, read strictly and within bounds before the
schema sees it. Every problem is ``InvalidRequest`` naming where it is (``request`` or the path).

- Text must be UTF-8; a leading byte-order mark is dropped, from bytes and from ``str`` alike.
- Its size is counted in UTF-8 bytes; a dict is measured as the compact JSON it stands for, and
  the count stops at the limit, so a huge object never becomes a huge string.
- A syntax error keeps its line and column.
- A key given twice in one object is refused, naming it (``json.loads`` would keep the last).
- Nesting deeper than ``MAX_DEPTH`` is refused (a valid request has three levels), and so is an
  integer longer than ``MAX_INTEGER_DIGITS`` (out of every range, and too long to print).
- Keys must be strings (a dict from the Python API may hold others).
- Every text value must be valid Unicode: a lone surrogate (which a ``\ud800`` escape can carry)
  is refused, naming its field.

``shown(value)`` is how any user-supplied value appears in a message: repr-escaped (one line, no
control or invisible characters) and cut short.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

from tasks.errors import InvalidRequest

MAX_DEPTH = 8  # request -> prompts -> prompt -> value is 3
MAX_INTEGER_DIGITS = 100
SHOWN_CHARS = 60
LONE_SURROGATE = "holds a lone surrogate (a \\ud800-style escape without its pair); send valid Unicode"
_INTEGER_BOUND = 10**MAX_INTEGER_DIGITS
_BOM = "\ufeff"
_FIELD_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SCALARS = (str, int, float, bool, type(None))
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SHOWN_CHARS
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2


class _DuplicateKeys(dict):  # type: ignore[type-arg]
    """An object in which ``key`` appeared more than once (found when parsing, refused by ``check_shape``)."""

    key: str


class _LongInteger(str):
    """An integer literal of more than ``MAX_INTEGER_DIGITS`` digits, kept as its text."""


def parse_json(data: str | bytes | bytearray, max_bytes: int) -> Any:
    """The JSON value in ``data``, which must be at most ``max_bytes`` bytes of UTF-8."""
    if len(data) > max_bytes:  # every character is at least one byte
        raise _too_big(
            f"{len(data)} {'bytes' if isinstance(data, bytes | bytearray) else 'characters'}", max_bytes
        )
    if isinstance(data, bytes | bytearray):
        data = _decode(bytes(data))
    else:
        size = utf8_bytes(data)
        if size > max_bytes:
            raise _too_big(f"{size} bytes", max_bytes)
    text = data.removeprefix(_BOM)
    if not text.strip():
        raise InvalidRequest(
            'is empty; send a JSON object like {"model": "chroma", "prompts": [...]}', "request"
        )
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_int=_integer)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field="request"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"nested too deeply (at most {MAX_DEPTH} levels)", field="request") from None
    check_shape(value, max_bytes=None)
    return value


def check_shape(value: Any, max_bytes: int | None) -> None:
    """Refuse duplicate keys, keys that are not strings, deep nesting and over-long integers; with
    ``max_bytes``, also a value whose compact JSON would be longer (counted, never built)."""
    _Walk(max_bytes).visit(value, ())


def field_path(loc: tuple[Any, ...]) -> str:
    """A dotted field path; a part that is not a plain name is shown escaped (``prompts.0.'a\\nb'``)."""
    parts = [str(p) if isinstance(p, int) or _plain_name(p) else shown(p, ascii_only=True) for p in loc]
    return ".".join(parts) or "request"


def shown(value: Any, *, ascii_only: bool = False) -> str:
    """``value`` for a message: one line, escaped, at most about ``SHOWN_CHARS`` characters.

    ``ascii_only`` also escapes every non-ASCII character, so a look-alike (a Cyrillic 'о' in
    'chrоma') is visible as such."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INTEGER_BOUND:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, _LongInteger):
        return f"an integer of {len(value.lstrip('-'))} digits"
    if isinstance(value, _SCALARS) or type(value) in (list, dict, tuple, bytes):
        text = _repr.repr(value)
    else:
        text = f"<{type(value).__name__}>"  # a Python object's own repr is not trusted to be short
    if ascii_only:
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    return one_line(text if len(text) <= SHOWN_CHARS + 5 else text[:SHOWN_CHARS] + "...")


def utf8_bytes(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (a lone surrogate counted as its 3 bytes; it is refused later)."""
    return len(text.encode("utf-8", "surrogatepass"))


def quoted(text: str, limit: int = 120) -> str:
    """A name from a file (a tensor key, a bucket), quoted and cut short: a message stays one short
    line whatever the file holds."""
    return one_line(repr(text if len(text) <= limit else text[:limit] + "..."))


def one_line(text: str) -> str:
    """``text`` with every character that is not printable escaped: one line, no terminal controls."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _decode(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InvalidRequest(
            "is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8", "request"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise InvalidRequest(f"not UTF-8 text: {exc.reason} ({where}); save it as UTF-8", "request") from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    duplicated = _DuplicateKeys(out)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            duplicated.key = key
            break
        seen.add(key)
    return duplicated


def _integer(text: str) -> int | _LongInteger:
    return int(text) if len(text) <= MAX_INTEGER_DIGITS else _LongInteger(text)


def _too_big(size: str, max_bytes: int) -> InvalidRequest:
    return InvalidRequest(
        f"{size}; the limit is {max_bytes} bytes (CHROMA_MAX_REQUEST_BYTES)", field="request"
    )


class _Walk:
    """One pass over a parsed request: shape rules, and the JSON size counted against a budget."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.left = math.inf if max_bytes is None else max_bytes

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise InvalidRequest(
                f"larger than the limit of {self.max_bytes} bytes as JSON (CHROMA_MAX_REQUEST_BYTES)",
                "request",
            )

    def visit(self, value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, _LongInteger) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INTEGER_BOUND
        ):
            raise InvalidRequest(f"{shown(value)} is out of range", field=field_path(path))
        if isinstance(value, str):
            self.spend(2 + (len(value) if value.isascii() else _unicode_bytes(value, path)))
        elif isinstance(value, dict | list):
            self.visit_container(value, path)
        elif isinstance(value, int | float):
            self.spend(len(repr(value)))
        else:
            self.spend(5)  # null, a boolean, or a Python object the schema refuses naming its field

    def visit_container(self, value: dict[Any, Any] | list[Any], path: tuple[Any, ...]) -> None:
        if len(path) >= MAX_DEPTH:
            raise InvalidRequest(f"nested too deeply (at most {MAX_DEPTH} levels)", field=field_path(path))
        if isinstance(value, _DuplicateKeys):
            raise InvalidRequest(
                f"{shown(value.key, ascii_only=True)} appears twice in one object; give each field once",
                field=field_path((*path, value.key)),
            )
        self.spend(2)
        if isinstance(value, list):
            for index, item in enumerate(value):
                self.spend(1)
                self.visit(item, (*path, index))
            return
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequest(
                    f"key {shown(key)} is not a string; JSON keys are strings", field_path(path)
                )
            self.spend(4 + utf8_bytes(key))
            self.visit(item, (*path, key))


def _unicode_bytes(text: str, path: tuple[Any, ...]) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(LONE_SURROGATE, field=field_path(path)) from None


def _plain_name(part: Any) -> bool:
    return isinstance(part, str) and 0 < len(part) <= 40 and _FIELD_NAME_CHARS.issuperset(part)
