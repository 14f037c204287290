"""What one log line means as JSON, defined so that both summary engines read it alike.

The streaming engine parses lines with ``orjson``; the DuckDB engine
(:mod:`ballast.logs.duck`) with DuckDB's JSON reader, which is more lenient. So that the
two give the same summary, the summary's reading of a line is fixed here as:

* a line of JSON whitespace only is blank (not counted);
* a line is JSON if it is strict JSON, or strict JSON once these are allowed: the
  literals ``NaN``, ``Inf`` and ``Infinity`` in any case, with an optional ``-``;
  numbers beyond the range of a double; one trailing comma before a ``}`` or ``]``;
  leading and trailing ASCII whitespace. Such a value, or any number out of range, is
  never a usable duration or count (it reads as ``1e300``, which is out of range of
  every field the summary uses); the bare ``null`` is not JSON either;
* when a key appears more than once in an object, the **first** value counts.

Strict lines without a repeated key, every line Ballast writes, take the fast path:
one ``orjson.loads`` and one count of ``":`` per line; the rare other lines go to the
slower readers below.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

#: The value of a line that is not JSON by the rules above.
INVALID = object()

_TOKEN = re.compile(
    rb'"(?:[^"\\]|\\.)*"'  # a string: kept as it is
    rb"|(-?)(?:nan|inf(?:inity)?)\b"  # NaN / Inf / Infinity
    rb"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"  # a number (checked for overflow)
    rb"|,(?=[ \t\r]*[}\]])",  # a comma before a closing bracket
    re.IGNORECASE,
)
_VALUE_END = frozenset(b'"]}0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ')
_WHITESPACE = b" \t\r"


def _normalise(match: re.Match[bytes]) -> bytes:
    token = match.group(0)
    first = token[:1]
    if first == b'"':
        return token
    if first == b",":
        before = match.string[: match.start()].rstrip(_WHITESPACE)[-1:]
        return b"" if before and before[0] in _VALUE_END else token
    if match.group(1) is not None:  # NaN or an infinity
        return match.group(1) + b"1e300"
    if abs(float(token)) == float("inf"):
        return b"-1e300" if first == b"-" else b"1e300"
    return token


def may_repeat_keys(line: bytes, obj: dict[str, Any]) -> bool:
    """``False`` when ``obj``'s text holds no repeated top-level key (most lines).

    Each top-level key is written ``"key":`` (unless whitespace comes before its colon),
    so a text with as many ``":`` as ``obj`` has keys has each key once; any other count
    (a repeated key, ``":`` inside a string or a nested object) takes the slower reader.
    The one case this misses is a repeated key with whitespace before the colon of one
    occurrence on a line with no other ``":`` to spare; it costs one search per line.
    """
    return line.count(b'":') != len(obj)


def _keep_first(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _int(text: str) -> int | float:
    # As orjson reads integers: exact within 64 bits, a float beyond.
    value = int(text)
    return value if -(1 << 63) <= value < (1 << 64) else float(text)


def first_wins(text: bytes, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` read again from ``text`` (valid JSON) keeping the first of repeated keys."""
    try:
        again = json.loads(text.decode("utf-8"), object_pairs_hook=_keep_first, parse_int=_int)
    except (ValueError, RecursionError):
        return obj
    return again if type(again) is dict else obj


def read_lenient(line: bytes) -> object:
    """The value of a line ``orjson`` rejected, by the wider rules above, or :data:`INVALID`."""
    text = _TOKEN.sub(_normalise, line.strip())
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return INVALID
    if type(obj) is dict and may_repeat_keys(text, obj):
        return first_wins(text, obj)
    return obj


def read_field(raw: str | None) -> object:
    """A field as DuckDB hands it over (its JSON text, ``None`` when absent) as a Python value."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 1e300  # NaN, an infinity, a number out of range: never usable
