"""``ballast logs trace``: every line of one request or one session, in time order.

Keeps only the matching lines. For a session it reads a regular file twice (the first
pass finds the request ids that touched the session). Standard input is read once: the
lines of requests still in flight are held until the request's canonical
``http.request`` line shows it never touched the session (at most
``MAX_PENDING_LINES`` such lines; the oldest request is dropped beyond that). Lines are
pre-selected on their raw bytes, so only candidate lines are parsed.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson

from ballast.logs.reading import Readable, open_log, read_batches
from ballast.logs.times import format_span, format_time, parse_timestamp

MAX_PENDING_LINES = 200_000
_TRACEBACK_FIELDS = frozenset({"traceback", "exception", "stack", "stack_info"})


@dataclass(slots=True)
class TraceEntry:
    when: datetime | None
    sort_key: tuple[datetime, int]
    record: dict[str, Any]


@dataclass(slots=True)
class TraceResult:
    """The matching lines of a trace, in timestamp order (file order for ties)."""

    request_id: str | None
    session_id: str | None
    request_ids: list[str]
    entries: list[TraceEntry] = field(default_factory=list)
    error: str | None = None  # why the input ended early, if it did
    trace_id: str | None = None  # set instead of session_id for a --trace-id trace

    def records(self) -> list[dict[str, Any]]:
        return [entry.record for entry in self.entries]

    def first(self) -> datetime | None:
        times = [e.when for e in self.entries if e.when is not None]
        return min(times) if times else None

    def last(self) -> datetime | None:
        times = [e.when for e in self.entries if e.when is not None]
        return max(times) if times else None


_EPOCH_MIN = datetime.min.replace(tzinfo=UTC)


def _id_needle(value: str) -> bytes | None:
    """The bytes an id must appear as in a JSON line, if no encoder could escape it."""
    if value and value.isascii() and value.isprintable() and not any(c in value for c in '"\\/'):
        return value.encode()
    return None


# Picks, from a batch of lines numbered from ``base``, the (number, line) pairs worth
# parsing. Selection runs per batch in one comprehension: per-line Python calls and
# generator steps would cost more than the parsing they save.
Selector = Callable[[list[bytes], int], list[tuple[int, bytes]]]


def _select_all(batch: list[bytes], base: int) -> list[tuple[int, bytes]]:
    return list(enumerate(batch, base))


def _select_containing(needle: bytes | None) -> Selector:
    """Lines holding ``needle`` (every line when no needle is safe to search for)."""
    if needle is None:
        return _select_all

    def select(batch: list[bytes], base: int) -> list[tuple[int, bytes]]:
        return [(n, line) for n, line in enumerate(batch, base) if needle in line]

    return select


_REQUEST_ID_KEY = b'"request_id":"'


def _session_selector(session_id: str, request_ids: Iterable[str]) -> Selector:
    """Lines of a session or of one of its requests.

    The ``request_id`` value is read straight from the bytes when the line has the
    compact form the server writes (``"request_id":"..."``, once); a line in any other
    form is parsed, so no matching line is ever left out.
    """
    session_needle = _id_needle(session_id)
    wanted: set[bytes] = set()
    for rid in request_ids:
        needle = _id_needle(rid)
        if needle is None:
            return _select_all
        wanted.add(needle)
    if session_needle is None:
        return _select_all
    key = _REQUEST_ID_KEY
    offset = len(key)

    def request_may_match(line: bytes) -> bool:
        at = line.find(key)
        if at < 0:
            return b"request_id" in line
        start = at + offset
        end = line.find(b'"', start)
        if end < 0 or line.find(key, end) >= 0:
            return True
        value = line[start:end]
        return b"\\" in value or value in wanted

    def select(batch: list[bytes], base: int) -> list[tuple[int, bytes]]:
        return [
            (n, line)
            for n, line in enumerate(batch, base)
            if session_needle in line or request_may_match(line)
        ]

    return select


class _Collector:
    """Gives trace lines their sort key: timestamp, then file order."""

    def __init__(self) -> None:
        self.last_when = _EPOCH_MIN

    def entry(self, seq: int, record: dict[str, Any]) -> TraceEntry:
        when = parse_timestamp(record.get("timestamp"))
        if when is not None:
            self.last_when = when
        # A line without a timestamp keeps its place after the line before it.
        return TraceEntry(when, (when or self.last_when, seq), record)


def _records(stream: Readable, select: Selector, result: TraceResult) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of the selected lines that are JSON objects.

    A read error ends the iteration and is kept in ``result.error``.
    """
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    base = 0
    try:
        for batch in read_batches(stream):
            for seq, line in select(batch, base):
                try:
                    obj = loads(line)
                except decode_error:
                    continue
                if type(obj) is dict:
                    yield seq, obj
            base += len(batch)
    except (OSError, EOFError, zlib.error) as exc:
        result.error = f"input ended early: {exc}"


def _trace_request(stream: Readable, request_id: str) -> TraceResult:
    result = TraceResult(request_id, None, [request_id])
    collector = _Collector()
    for seq, obj in _records(stream, _select_containing(_id_needle(request_id)), result):
        if obj.get("request_id") == request_id:
            result.entries.append(collector.entry(seq, obj))
    return result


def _session_request_ids(
    stream: Readable, session_id: str, result: TraceResult, key: str = "session_id"
) -> list[str]:
    found: dict[str, None] = {}
    for _, obj in _records(stream, _select_containing(_id_needle(session_id)), result):
        if obj.get(key) == session_id:
            rid = obj.get("request_id")
            if type(rid) is str:
                found[rid] = None
    return list(found)


def _empty_result(value: str, key: str) -> TraceResult:
    if key == "trace_id":
        return TraceResult(None, None, [], trace_id=value)
    return TraceResult(None, value, [])


def _trace_session_two_pass(path: str, session_id: str, key: str = "session_id") -> TraceResult:
    result = _empty_result(session_id, key)
    with open_log(path) as source:
        result.request_ids = _session_request_ids(source.stream, session_id, result, key)
    wanted = set(result.request_ids)
    collector = _Collector()
    with open_log(path) as source:
        for seq, obj in _records(source.stream, _session_selector(session_id, wanted), result):
            rid = obj.get("request_id")
            if obj.get(key) == session_id or (type(rid) is str and rid in wanted):
                result.entries.append(collector.entry(seq, obj))
    return result


def _trace_session_streaming(stream: Readable, session_id: str, key: str = "session_id") -> TraceResult:
    """One pass: hold in-flight requests' lines until they are known to matter or not."""
    result = _empty_result(session_id, key)
    collector = _Collector()
    matched: dict[str, None] = {}
    pending: OrderedDict[str, list[TraceEntry]] = OrderedDict()
    pending_lines = 0
    for seq, obj in _records(stream, _select_all, result):
        rid = obj.get("request_id")
        if type(rid) is not str:
            rid = None
        if obj.get(key) == session_id:
            result.entries.append(collector.entry(seq, obj))
            if rid is not None and rid not in matched:
                matched[rid] = None
                held = pending.pop(rid, None)
                if held:
                    pending_lines -= len(held)
                    result.entries.extend(held)
        elif rid is not None:
            if rid in matched:
                result.entries.append(collector.entry(seq, obj))
            elif obj.get("event") == "http.request":
                # The canonical line ends the request: it never touched the session.
                held = pending.pop(rid, None)
                if held:
                    pending_lines -= len(held)
            else:
                pending.setdefault(rid, []).append(collector.entry(seq, obj))
                pending_lines += 1
                while pending_lines > MAX_PENDING_LINES and pending:
                    _, dropped = pending.popitem(last=False)
                    pending_lines -= len(dropped)
    result.request_ids = list(matched)
    return result


def trace_file(
    path: str | None,
    *,
    request_id: str | None = None,
    session_id: str | None = None,
    trace_id: str | None = None,
    stdin: BinaryIO | None = None,
) -> TraceResult:
    """Every line of one request, one session or one trace, sorted by timestamp (ties: file order).

    A session's trace also holds every line of each request that logged that session
    id; a ``trace_id`` trace (the tracing plugin's W3C trace id) likewise holds every
    line of each request that logged that trace id, so lines written outside the span
    (the canonical ``http.request`` line) are not missed. Exactly one of
    ``request_id``, ``session_id`` and ``trace_id`` must be given.
    """
    if sum(x is not None for x in (request_id, session_id, trace_id)) != 1:
        raise ValueError("give exactly one of request_id, session_id and trace_id")
    if request_id is not None:
        with open_log(path, stdin=stdin) as source:
            result = _trace_request(source.stream, request_id)
    else:
        key, value = ("session_id", session_id) if session_id is not None else ("trace_id", trace_id)
        assert value is not None
        if path is not None and path != "-" and os.path.isfile(path):
            result = _trace_session_two_pass(path, value, key)
        else:
            with open_log(path, stdin=stdin) as source:
                result = _trace_session_streaming(source.stream, value, key)
    result.entries.sort(key=lambda entry: entry.sort_key)
    return result


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0, 9), *range(11, 32), 127)}


def _fmt_value(value: object) -> str:
    if type(value) is str:
        if value and value.isprintable() and " " not in value and '"' not in value:
            return value
        return orjson.dumps(value).decode()
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def _is_block(key: str, value: object) -> bool:
    return type(value) is str and (key in _TRACEBACK_FIELDS or "\n" in value)


def format_trace_line(record: Mapping[str, Any]) -> str:
    """``time level event key=value ...``; multi-line fields follow, indented."""
    ts = record.get("timestamp")
    head = [
        str(ts).translate(_CONTROL) if ts is not None else "-",
        f"{_fmt_value(record.get('level', '-')):<8}",
        _fmt_value(record.get("event", "-")),
    ]
    fields = []
    blocks = []
    for key, value in record.items():
        if key in ("timestamp", "level", "event"):
            continue
        if _is_block(key, value):
            blocks.append((key, value))
        else:
            fields.append(f"{_fmt_value(key)}={_fmt_value(value)}")
    text = " ".join(head + fields)
    for key, value in blocks:
        text += f"\n    {_fmt_value(key)}:"
        for block_line in str(value).rstrip("\n").split("\n"):
            text += "\n      " + block_line.translate(_CONTROL)
    return text


def _trace_summary(result: TraceResult) -> dict[str, Any]:
    first, last = result.first(), result.last()
    span = (last - first).total_seconds() if first and last else None
    return {
        "lines": len(result.entries),
        "first": format_time(first),
        "last": format_time(last),
        "span_s": None if span is None else round(span, 6),
    }


def format_trace_text(result: TraceResult) -> str:
    """One readable line per log line, then a one-line summary."""
    out = [format_trace_line(entry.record) for entry in result.entries]
    summary = _trace_summary(result)
    if result.request_id is not None:
        what = f"request {result.request_id}"
    else:
        whose = f"trace {result.trace_id}" if result.trace_id is not None else f"session {result.session_id}"
        what = f"{whose} ({_plural(len(result.request_ids), 'request')})"
    out.append(
        f"-- {what}: {_plural(summary['lines'], 'line')}, "
        f"{summary['first'] or '-'} .. {summary['last'] or '-'}, span {format_span(summary['span_s'])}"
    )
    return "\n".join(out) + "\n"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def trace_document(result: TraceResult) -> dict[str, Any]:
    """The ``trace --json`` document."""
    doc: dict[str, Any] = {}
    if result.request_id is not None:
        doc["request_id"] = result.request_id
    elif result.trace_id is not None:
        doc["trace_id"] = result.trace_id
    else:
        doc["session_id"] = result.session_id
    doc["request_ids"] = result.request_ids
    doc["lines"] = result.records()
    doc["summary"] = _trace_summary(result)
    doc["error"] = result.error
    return doc
