"""Log analysis for Ballast's JSON log lines: ``ballast logs summarize`` and ``ballast logs trace``.

The server writes one JSON object per line with stable event names (``http.request``,
``upstream.retry``, ``finalize.completed``, ...; see "Log events" in the architecture
notes). Operators ask two questions of such a log, which may be gigabytes long: what
happened overall (``summarize``) and what happened to one request or one session
(``trace``). This module answers both without loading the log into memory, so it works
on the production log as it is, gzipped or piped.

Input
-----
A file, a gzip file (recognised by its magic bytes, whatever its name) or standard input
(``-`` or no file). The input is read in fixed-size chunks and split into lines; a line
longer than ``max_line_bytes`` (8 MiB) is dropped as it streams past and counted as
``too_long``. Blank lines are ignored and not counted. A line that is not valid JSON
(including invalid UTF-8), not a JSON object, or has no string ``event`` is counted under
``lines.skipped`` and otherwise ignored; fields of the wrong type (``"status": "abc"``)
are counted under a fallback key (``other``, ``(none)``) instead of failing. A gzip
stream cut short is read up to the cut; the summary says so in ``input.error`` and the
command exits 1.

Memory
------
``summarize`` keeps counters and latency sketches, never lines. Latency percentiles come
from a log-bucketed histogram (the DDSketch layout): bucket ``i`` holds the values in
``(gamma**(i-1), gamma**i]`` with ``gamma = 1.01 / 0.99``, so every reported quantile is
within 1% of a value at that rank, and the number of buckets is bounded by the range of
values (about 1,260 buckets from 1 µs to one day), not by their count. Values below
0.001 ms count as 0. Counts are exact. Tables keyed by a value taken from the log (routes,
sessions, error types, ...) keep at most a fixed number of distinct keys (``MAX_KEYS``;
``MAX_ROUTES`` for routes); once full, new keys are counted under ``(other)``, so even a
log with millions of distinct session ids is summarised in bounded memory, and every
total stays exact.

``trace`` keeps only the matching lines. For a session it reads a regular file twice
(the first pass finds the request ids that touched the session). Standard input is read
once: the lines of requests still in flight are held until the request's canonical
``http.request`` line shows it never touched the session (at most ``MAX_PENDING_LINES``
such lines; the oldest request is dropped beyond that).

Time filter
-----------
``--since`` / ``--until`` take an ISO 8601 time (``2026-11-28T14:00:00Z``; no zone means
UTC) or a duration before now (``90s``, ``30m``, ``1h``, ``2d``, ``1w``). They select
``since <= timestamp < until``; with a filter, lines without a parsable ``timestamp`` are
left out (counted in ``lines.filtered_out``).

Summary JSON (``summarize --json``)
-----------------------------------
One document; keys are always present (counters may be empty objects), counter objects
are ordered by count, descending, then key::

    {
      "input": {"source": str, "gzip": bool, "error": str | null},
      "filter": {"since": str | null, "until": str | null},
      "lines": {
        "total": int,          # non-blank lines read
        "counted": int,        # lines that feed every table below
        "filtered_out": int,   # valid lines outside the --since/--until window
        "skipped": {"not_json": int, "not_object": int, "no_event": int, "too_long": int},
        "by_event": {event: int},
        "by_level": {level: int}
      },                       # total == counted + filtered_out + sum(skipped)
      "window": {"first": str | null, "last": str | null, "span_s": float | null},
      "requests": {            # http.request lines
        "total": int,
        "by_status_class": {"1xx": int, "2xx": int, "3xx": int, "4xx": int, "5xx": int,
                            "other": int},
        "p50_ms": float | null, "p95_ms": float | null, "p99_ms": float | null,
        "max_ms": float | null,
        "histogram": [{"lower_ms": float, "upper_ms": float | null, "count": int}],
        "by_route": {route: {"count": int, "by_method": {method: int},
                             "by_status_class": {...}, "p50_ms": ..., "p95_ms": ...,
                             "p99_ms": ..., "max_ms": ..., "histogram": [...]}}
      },
      "upstream": {
        "retries": {key: int},  # key: the failed attempt's status ("503"), else its
                                # error_type ("TimeoutError"), else "(unknown)"
        "retries_total": int,
        "failed": {kind: int},  # upstream.failed by kind
        "failed_total": int,
        "by_name": {name: {"retries": int, "failed": int}}
      },
      "finalize": {
        "by_outcome": {state: int},       # finalize.completed by state
        "timed_out_stage": {stage: int},  # finalize.timed_out by stage
        "failed_stage": {stage: int},     # finalize.failed by stage
        "stages": {stage: {"count": int, "p50_ms": ..., "p95_ms": ..., "p99_ms": ...,
                           "max_ms": ...}}  # finalize.stage durations
      },
      "mutation_failures": {session_id: int},  # session.mutation_failed
      "errors": {error_type: int},  # error.unhandled + upstream.failed +
                                    # session.mutation_failed error types
      "bulkhead": {"rejected": int}
    }

``window`` holds the earliest and latest counted timestamps, normalised to UTC.
Histogram ``upper_ms`` is null only for an open-ended last bin (beyond 5e9 ms).
Percentiles use the nearest-rank method over requests with a numeric, non-negative
``duration_ms``; ``max_ms`` is exact. Routes are route templates (``(none)`` when a
request line has none, as for unmatched paths). Histogram bins follow a 1-2-5 series;
bin edges are exact to within the sketch's 1%.

Trace JSON (``trace --json``)
-----------------------------
``{"request_id" | "session_id": str, "request_ids": [str], "lines": [object],
"summary": {"lines": int, "first": str | null, "last": str | null, "span_s": float |
null}, "error": str | null}``; ``request_ids`` lists the requests that touched the
session (for a request trace, the request itself); ``lines`` are the log objects as
they were written.

Exit codes: 0 done; 1 the input could not be read (or ended early), an output file could
not be written, or a trace matched no line; 2 a usage error.
"""

from __future__ import annotations

import argparse
import html
import io
import math
import os
import re
import sys
import zlib
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, Protocol, TextIO, TypedDict, cast

import orjson

__all__ = [
    "GunzipReader",
    "LatencySketch",
    "LineCounter",
    "LogInputError",
    "LogSummary",
    "SummaryReport",
    "TraceResult",
    "add_logs_parser",
    "format_summary_text",
    "format_trace_line",
    "format_trace_text",
    "main",
    "open_log",
    "parse_time_arg",
    "parse_timestamp",
    "read_batches",
    "render_html",
    "run_logs",
    "summarize_file",
    "trace_document",
    "trace_file",
]

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 8 << 20
MAX_KEYS = 10_000
MAX_ROUTES = 256
MAX_PENDING_LINES = 200_000
OTHER_KEY = "(other)"
NONE_KEY = "(none)"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
# int status -> class, precomputed so the hot loop does one dict lookup.
_STATUS_CLASS = {code: f"{code // 100}xx" for code in range(100, 600)}
_TRACEBACK_FIELDS = frozenset({"traceback", "exception", "stack", "stack_info"})


# --------------------------------------------------------------------------- report types


class SkippedReport(TypedDict):
    not_json: int
    not_object: int
    no_event: int
    too_long: int


class LinesReport(TypedDict):
    total: int
    counted: int
    filtered_out: int
    skipped: SkippedReport
    by_event: dict[str, int]
    by_level: dict[str, int]


class InputReport(TypedDict):
    source: str
    gzip: bool
    error: str | None


class FilterReport(TypedDict):
    since: str | None
    until: str | None


class WindowReport(TypedDict):
    first: str | None
    last: str | None
    span_s: float | None


class HistogramBin(TypedDict):
    lower_ms: float
    upper_ms: float
    count: int


class RouteReport(TypedDict):
    count: int
    by_method: dict[str, int]
    by_status_class: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    histogram: list[HistogramBin]


class RequestsReport(TypedDict):
    total: int
    by_status_class: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    histogram: list[HistogramBin]
    by_route: dict[str, RouteReport]


class UpstreamNameReport(TypedDict):
    retries: int
    failed: int


class UpstreamReport(TypedDict):
    retries: dict[str, int]
    retries_total: int
    failed: dict[str, int]
    failed_total: int
    by_name: dict[str, UpstreamNameReport]


class StageReport(TypedDict):
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class FinalizeReport(TypedDict):
    by_outcome: dict[str, int]
    timed_out_stage: dict[str, int]
    failed_stage: dict[str, int]
    stages: dict[str, StageReport]


class BulkheadReport(TypedDict):
    rejected: int


class SummaryReport(TypedDict):
    input: InputReport
    filter: FilterReport
    lines: LinesReport
    window: WindowReport
    requests: RequestsReport
    upstream: UpstreamReport
    finalize: FinalizeReport
    mutation_failures: dict[str, int]
    errors: dict[str, int]
    bulkhead: BulkheadReport


# --------------------------------------------------------------------------- input


class LogInputError(Exception):
    """The log could not be opened; the message names the file and the reason."""


class Readable(Protocol):
    """What the readers need of an input: ``read(size)``, ``b""`` at the end."""

    def read(self, size: int, /) -> bytes: ...


@dataclass(slots=True)
class LogSource:
    """An opened log: the decompressed byte stream and what it was opened from."""

    stream: Readable
    name: str
    gzip: bool


class GunzipReader:
    """Decompresses a gzip stream (one member or several) as it is read.

    Unlike :class:`gzip.GzipFile`, a truncated stream yields every byte that could be
    decompressed before the reader raises :class:`EOFError`, so a summary of a log cut
    short (a copy taken while it was written, a full disk) still counts what is there.
    Output per call is bounded by ``size``, so one highly compressed line cannot blow up
    memory.
    """

    def __init__(self, raw: Readable, input_bytes: int = 1 << 16) -> None:
        self._raw = raw
        self._input_bytes = input_bytes
        self._pending = b""
        self._inflate: Any = None  # the zlib decompressor of the current member
        self._ended = False

    def read(self, size: int, /) -> bytes:
        while not self._ended:
            if not self._pending:
                self._pending = self._raw.read(self._input_bytes)
                if not self._pending:
                    self._ended = True
                    if self._inflate is not None:
                        raise EOFError("compressed file ended before the end-of-stream marker")
                    break
            if self._inflate is None:
                # Between members: gzip tolerates zero padding here.
                self._pending = self._pending.lstrip(b"\x00")
                if not self._pending:
                    continue
                self._inflate = zlib.decompressobj(wbits=31)
            out: bytes = self._inflate.decompress(self._pending, size)
            self._pending = self._inflate.unconsumed_tail
            if self._inflate.eof:
                self._pending = self._inflate.unused_data + self._pending
                self._inflate = None
            if out:
                return out
        return b""


def _peek(stream: BinaryIO, n: int) -> tuple[BinaryIO, bytes]:
    """Look at the first ``n`` bytes without consuming them (wrapping if needed)."""
    peek = getattr(stream, "peek", None)
    if peek is None:
        buffered = io.BufferedReader(cast(io.RawIOBase, stream))
        peek = buffered.peek
        stream = cast(BinaryIO, buffered)
    head: bytes = peek(n)[:n]
    return stream, head


@contextmanager
def open_log(path: str | None, *, stdin: BinaryIO | None = None) -> Iterator[LogSource]:
    """Open ``path`` (``None`` or ``"-"``: standard input) for reading, gunzipping if needed.

    Gzip is recognised by its magic bytes, so a compressed file without a ``.gz`` name
    (or a compressed stream on stdin) is read correctly. Raises :class:`LogInputError`.
    """
    if path is None or path == "-":
        if stdin is None and sys.stdin.isatty():
            raise LogInputError(
                "no log file given and standard input is a terminal: pass FILE or pipe a log in"
            )
        raw: BinaryIO = stdin if stdin is not None else sys.stdin.buffer
        name = "-"
        owned = False
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed below, after the caller is done
        except OSError as exc:
            raise LogInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
        name = path
        owned = True
    try:
        try:
            raw, head = _peek(raw, 2)
        except OSError as exc:
            raise LogInputError(f"cannot read {name}: {exc.strerror or exc}") from exc
        if head == GZIP_MAGIC:
            yield LogSource(GunzipReader(raw), name, True)
        else:
            yield LogSource(raw, name, False)
    finally:
        if owned:
            raw.close()


class LineCounter:
    """Counts what :func:`read_batches` drops: lines over the length limit."""

    __slots__ = ("too_long",)

    def __init__(self) -> None:
        self.too_long = 0


def read_batches(
    stream: Readable,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
    counter: LineCounter | None = None,
) -> Iterator[list[bytes]]:
    """Yield lists of lines (without ``\\n``) read from ``stream`` in fixed-size chunks.

    Batches let the caller loop over a plain list instead of paying a generator step per
    line. A line longer than ``max_line_bytes`` is discarded as it streams past (memory
    stays at one chunk plus one line) and counted in ``counter.too_long``.
    """
    chunk_bytes = max(1, min(CHUNK_BYTES, max_line_bytes))
    read = stream.read
    pending = b""
    dropping = False
    while True:
        chunk = read(chunk_bytes)
        if not chunk:
            break
        parts = chunk.split(b"\n")
        rest = parts.pop()
        if parts:
            if dropping:
                # The end of an over-long line: discard its last piece.
                dropping = False
                del parts[0]
            elif pending:
                first = pending + parts[0]
                if len(first) > max_line_bytes:
                    if counter is not None:
                        counter.too_long += 1
                    del parts[0]
                else:
                    parts[0] = first
            pending = b""
            if parts:
                yield parts
        if dropping:
            continue
        pending += rest
        if len(pending) > max_line_bytes:
            dropping = True
            pending = b""
            if counter is not None:
                counter.too_long += 1
    if pending:
        yield [pending]


# --------------------------------------------------------------------------- time


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_timestamp(value: object) -> datetime | None:
    """An aware datetime from an ISO 8601 string (no zone: UTC), or ``None``."""
    if type(value) is not str:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed


def parse_time_arg(text: str, *, now: datetime | None = None) -> datetime:
    """Parse a ``--since``/``--until`` value: ISO 8601, or a duration before ``now``.

    Raises :class:`argparse.ArgumentTypeError` with the accepted forms on bad input.
    """
    match = _RELATIVE.match(text)
    if match is not None:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    parsed = parse_timestamp(text.strip())
    if parsed is None:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO 8601 (2026-11-28T14:00:00Z) "
            "or a duration before now (90s, 30m, 1h, 2d, 1w)"
        )
    return parsed


def format_time(value: datetime | None) -> str | None:
    """``2026-11-28T14:03:58.123456Z``: UTC, microseconds, so strings sort as times."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:  # within hours of year 1 or 9999: keep its own offset
        return value.isoformat()


def format_span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.3f}s"
    whole = int(seconds)
    days, rem = divmod(whole, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    text = f"{hours}h{minutes:02d}m{secs:02d}s" if hours or days else f"{minutes}m{secs:02d}s"
    return f"{days}d{text}" if days else text


# --------------------------------------------------------------------------- latency sketch


_ACCURACY = 0.01
_GAMMA = (1 + _ACCURACY) / (1 - _ACCURACY)
_INV_LOG_GAMMA = 1.0 / math.log(_GAMMA)
_MIN_MS = 0.001
# Display bins: a 1-2-5 series from 1 µs to ~11.6 days, in ms.
_DISPLAY_EDGES: tuple[float, ...] = tuple(m * 10.0**e for e in range(-3, 10) for m in (1.0, 2.0, 5.0))


class LatencySketch:
    """A log-bucketed histogram of non-negative values (ms): 1% relative error, bounded size.

    Bucket ``i`` counts values in ``(gamma**(i-1), gamma**i]``; a quantile is answered
    with the midpoint (in relative terms) of the bucket that holds its rank. Values below
    ``0.001`` count as zero. The maximum is tracked exactly. The summary's hot loop
    updates ``buckets``/``zeros``/``max`` inline, the same way :meth:`add` does.
    """

    __slots__ = ("buckets", "max", "zeros")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.zeros = 0
        self.max = -1.0  # below any value: no value yet

    @property
    def count(self) -> int:
        return self.zeros + sum(self.buckets.values())

    def maximum(self) -> float | None:
        return None if self.max < 0 else self.max

    def add(self, value: float) -> None:
        """Count ``value``; it must be a finite, non-negative number."""
        if value >= _MIN_MS:
            index = math.ceil(math.log(value) * _INV_LOG_GAMMA)
            buckets = self.buckets
            buckets[index] = buckets.get(index, 0) + 1
        else:
            self.zeros += 1
        if value > self.max:
            self.max = value

    def merge(self, other: LatencySketch) -> None:
        self.zeros += other.zeros
        self.max = max(self.max, other.max)
        buckets = self.buckets
        for index, n in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + n

    @staticmethod
    def _estimate(index: int) -> float:
        return 2.0 * _GAMMA**index / (_GAMMA + 1.0)

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Nearest-rank quantiles (``q`` in ``[0, 1]``), ``None`` for an empty sketch."""
        wanted = list(qs)
        count = self.count
        if count == 0:
            return [None for _ in wanted]
        order = sorted(self.buckets.items())
        out: list[float | None] = []
        for q in wanted:
            rank = max(1, math.ceil(q * count))
            if rank <= self.zeros:
                out.append(0.0)
                continue
            seen = self.zeros
            value = self.max
            for index, n in order:
                seen += n
                if seen >= rank:
                    value = self._estimate(index)
                    break
            out.append(min(value, self.max))
        return out

    def histogram(self) -> list[HistogramBin]:
        """Counts in 1-2-5 bins, trimmed to the occupied range (inner empty bins kept)."""
        counts = [0] * (len(_DISPLAY_EDGES) + 1)
        counts[0] = self.zeros
        for index, n in self.buckets.items():
            counts[bisect_right(_DISPLAY_EDGES, self._estimate(index))] += n
        occupied = [i for i, n in enumerate(counts) if n]
        if not occupied:
            return []
        bins: list[HistogramBin] = []
        for i in range(occupied[0], occupied[-1] + 1):
            lower = 0.0 if i == 0 else _DISPLAY_EDGES[i - 1]
            upper = _DISPLAY_EDGES[i] if i < len(_DISPLAY_EDGES) else math.inf
            bins.append({"lower_ms": lower, "upper_ms": upper, "count": counts[i]})
        return bins


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --------------------------------------------------------------------------- summary


def _bump(table: dict[str, int], key: str, cap: int = MAX_KEYS) -> None:
    """Count ``key``, folding new keys into ``(other)`` once ``cap`` keys exist."""
    if key in table:
        table[key] += 1
    elif len(table) < cap:
        table[key] = 1
    else:
        table[OTHER_KEY] = table.get(OTHER_KEY, 0) + 1


def _key(value: object) -> str:
    """A table key from a log field: strings as they are, else ``(none)``."""
    return value if type(value) is str else NONE_KEY


def _duration(value: object) -> float | None:
    """A usable duration in ms: a JSON number (not a bool), non-negative and finite."""
    if isinstance(value, (int, float)) and type(value) is not bool and 0 <= value < 1e15:
        return float(value)
    return None


def _by_count(table: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted(table.items(), key=lambda kv: (-kv[1], kv[0])))


def _status_classes(counts: Mapping[str, int]) -> dict[str, int]:
    return {cls: counts.get(cls, 0) for cls in STATUS_CLASSES}


def _status_class(status: object) -> str:
    return _STATUS_CLASS.get(status, "other") if type(status) is int else "other"


# Kinds of event the hot loop tells apart (an int compare beats a string compare).
_PLAIN, _REQUEST, _HANDLED = 0, 1, 2


class _EventSlot:
    """Lines of one (event, level) pair, and what to do with each."""

    __slots__ = ("count", "event", "handler", "kind", "level")

    def __init__(
        self, event: str, level: str, kind: int, handler: Callable[[dict[str, Any]], None] | None
    ) -> None:
        self.event = event
        self.level = level
        self.kind = kind
        self.handler = handler
        self.count = 0


class _RequestSlot:
    """Requests of one (route, method, status class); the latency sketch is the route's."""

    __slots__ = ("count", "method", "route", "sketch", "status_class")

    def __init__(self, route: str, method: str, status_class: str, sketch: LatencySketch) -> None:
        self.route = route
        self.method = method
        self.status_class = status_class
        self.sketch = sketch
        self.count = 0


class _Timed:
    """Lines counted, and the durations of those that carried a usable one."""

    __slots__ = ("count", "sketch")

    def __init__(self) -> None:
        self.count = 0
        self.sketch = LatencySketch()


_MAX_EVENTS = 1000
_MAX_LEVELS = 100
_MAX_METHODS = 32
_MAX_RAW_KEYS = 10_000
_FAR_PAST = datetime.min.replace(tzinfo=UTC)
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


class LogSummary:
    """Streaming aggregation of log lines: :meth:`feed` batches, then read :meth:`report`.

    The per-line path is one ``orjson.loads``, one timestamp parse, and a lookup keyed by
    the raw ``(event, level)`` pair (and, for requests, the raw ``(route, method,
    status)`` triple) that lands on a pre-validated counter; fields are validated only
    the first time a key is seen. Raw keys are cached only when every part has the
    expected JSON type, so a malformed value is re-examined each time it appears.
    """

    def __init__(self, *, since: datetime | None = None, until: datetime | None = None) -> None:
        self.since = since
        self.until = until
        self.blank = 0
        self.read = 0
        self.filtered_out = 0
        self.not_json = 0
        self.not_object = 0
        self.no_event = 0
        self.lines = LineCounter()
        self.first = _FAR_FUTURE
        self.last = _FAR_PAST
        self.source = "-"
        self.gzip = False
        self.input_error: str | None = None
        # (event, level) -> slot, both raw (cache) and normalized (the counts).
        self._slots: dict[tuple[object, object], _EventSlot] = {}
        self._event_slots: dict[tuple[str, str], _EventSlot] = {}
        self._events: set[str] = set()
        self._levels: set[str] = set()
        # (route, method, status) -> slot, raw (cache) and normalized (the counts).
        self._requests: dict[tuple[object, object, object], _RequestSlot] = {}
        self._request_slots: dict[tuple[str, str, str], _RequestSlot] = {}
        self.routes: dict[str, LatencySketch] = {}
        self._methods: dict[str, set[str]] = {}
        self.retries: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.upstream_retries: dict[str, int] = {}
        self.upstream_failed: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.timed_out_stage: dict[str, int] = {}
        self.failed_stage: dict[str, int] = {}
        self.stages: dict[str, _Timed] = {}
        self.mutation_failures: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.bulkhead_rejected = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "upstream.retry": self._on_retry,
            "upstream.failed": self._on_upstream_failed,
            "error.unhandled": self._on_unhandled,
            "session.mutation_failed": self._on_mutation_failed,
            "finalize.stage": self._on_stage,
            "finalize.timed_out": self._on_timed_out,
            "finalize.completed": self._on_completed,
            "finalize.failed": self._on_finalize_failed,
            "bulkhead.rejected": self._on_bulkhead,
        }

    def _slot_for(self, key: tuple[object, object]) -> _EventSlot | None:
        """The counter for a raw (event, level) pair; ``None`` if the line has no event."""
        raw_event, raw_level = key
        if type(raw_event) is not str:
            return None
        event = raw_event
        if event not in self._events:
            if len(self._events) >= _MAX_EVENTS:
                event = OTHER_KEY
            self._events.add(event)
        level = raw_level if type(raw_level) is str else NONE_KEY
        if level not in self._levels:
            if len(self._levels) >= _MAX_LEVELS:
                level = OTHER_KEY
            self._levels.add(level)
        slot = self._event_slots.get((event, level))
        if slot is None:
            if event == "http.request":
                slot = _EventSlot(event, level, _REQUEST, None)
            else:
                handler = self._handlers.get(event)
                slot = _EventSlot(event, level, _PLAIN if handler is None else _HANDLED, handler)
            self._event_slots[(event, level)] = slot
        if (raw_level is None or type(raw_level) is str) and len(self._slots) < _MAX_RAW_KEYS:
            self._slots[key] = slot
        return slot

    def _request_slot_for(self, key: tuple[object, object, object]) -> _RequestSlot:
        """The counter for a raw (route, method, status) triple."""
        raw_route, raw_method, raw_status = key
        route = raw_route if type(raw_route) is str else NONE_KEY
        sketch = self.routes.get(route)
        if sketch is None:
            if len(self.routes) >= MAX_ROUTES:
                route = OTHER_KEY
            sketch = self.routes.setdefault(route, LatencySketch())
        method = raw_method if type(raw_method) is str else NONE_KEY
        methods = self._methods.setdefault(route, set())
        if method not in methods:
            if len(methods) >= _MAX_METHODS:
                method = OTHER_KEY
            methods.add(method)
        status_class = _status_class(raw_status)
        slot = self._request_slots.get((route, method, status_class))
        if slot is None:
            slot = _RequestSlot(route, method, status_class, sketch)
            self._request_slots[(route, method, status_class)] = slot
        if (
            (raw_route is None or type(raw_route) is str)
            and (raw_method is None or type(raw_method) is str)
            and (raw_status is None or type(raw_status) is int)
            and len(self._requests) < _MAX_RAW_KEYS
        ):
            self._requests[key] = slot
        return slot

    def feed(self, batch: list[bytes]) -> None:
        """Count one batch of raw lines (as :func:`read_batches` yields them)."""
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        slots = self._slots
        slot_for = self._slot_for
        requests = self._requests
        request_slot_for = self._request_slot_for
        fromiso = datetime.fromisoformat
        utc = UTC
        log = math.log
        ceil = math.ceil
        inv_log_gamma = _INV_LOG_GAMMA
        min_ms = _MIN_MS
        since = self.since if self.since is not None else _FAR_PAST
        until = self.until if self.until is not None else _FAR_FUTURE
        filtering = self.since is not None or self.until is not None
        first = self.first
        last = self.last
        blank = filtered_out = not_json = not_object = no_event = 0
        for line in batch:
            try:
                obj = loads(line)
            except decode_error:
                if line.strip():
                    not_json += 1
                else:
                    blank += 1
                continue
            if type(obj) is not dict:
                not_object += 1
                continue
            key = (obj.get("event"), obj.get("level"))
            try:
                slot = slots[key]
            except (KeyError, TypeError):
                found = slot_for(key)
                if found is None:
                    no_event += 1
                    continue
                slot = found
            ts = obj.get("timestamp")
            if type(ts) is str:
                try:
                    when = fromiso(ts)
                except ValueError:
                    if filtering:
                        filtered_out += 1
                        continue
                else:
                    if when.tzinfo is None:
                        when = when.replace(tzinfo=utc)
                    if filtering and (when < since or when >= until):
                        filtered_out += 1
                        continue
                    if when > last:
                        last = when
                    if when < first:
                        first = when
            elif filtering:
                filtered_out += 1
                continue
            slot.count += 1
            kind = slot.kind
            if kind == _REQUEST:
                rkey = (obj.get("route"), obj.get("method"), obj.get("status"))
                try:
                    request = requests[rkey]
                except (KeyError, TypeError):
                    request = request_slot_for(rkey)
                request.count += 1
                duration = obj.get("duration_ms")
                if (type(duration) is float or type(duration) is int) and 0 <= duration < 1e15:
                    sketch = request.sketch
                    if duration >= min_ms:
                        index = ceil(log(duration) * inv_log_gamma)
                        buckets = sketch.buckets
                        buckets[index] = buckets.get(index, 0) + 1
                    else:
                        sketch.zeros += 1
                    if duration > sketch.max:
                        sketch.max = duration
            elif kind == _HANDLED:
                handler = slot.handler
                if handler is not None:
                    handler(obj)
        self.first = first
        self.last = last
        self.read += len(batch)
        self.blank += blank
        self.filtered_out += filtered_out
        self.not_json += not_json
        self.not_object += not_object
        self.no_event += no_event

    def feed_stream(self, stream: Readable) -> None:
        """Read ``stream`` to the end; a read error ends the input and is reported."""
        try:
            for batch in read_batches(stream, counter=self.lines):
                self.feed(batch)
        except (OSError, EOFError, zlib.error) as exc:
            self.input_error = f"input ended early: {exc}"

    # -- handlers of the rarer events: each gets a dict whose fields may have any type.

    def _on_retry(self, obj: dict[str, Any]) -> None:
        status = obj.get("status")
        if type(status) is int:
            key = str(status)
        else:
            error_type = obj.get("error_type")
            key = error_type if type(error_type) is str and error_type else "(unknown)"
        _bump(self.retries, key)
        _bump(self.upstream_retries, _key(obj.get("name")))

    def _on_upstream_failed(self, obj: dict[str, Any]) -> None:
        _bump(self.failed, _key(obj.get("kind")))
        _bump(self.upstream_failed, _key(obj.get("name")))
        self._error_type(obj)

    def _on_unhandled(self, obj: dict[str, Any]) -> None:
        self._error_type(obj)

    def _on_mutation_failed(self, obj: dict[str, Any]) -> None:
        _bump(self.mutation_failures, _key(obj.get("session_id")))
        self._error_type(obj)

    def _error_type(self, obj: dict[str, Any]) -> None:
        error_type = obj.get("error_type")
        if type(error_type) is str and error_type:
            _bump(self.errors, error_type)

    def _on_stage(self, obj: dict[str, Any]) -> None:
        stage = _key(obj.get("stage"))
        stats = self.stages.get(stage)
        if stats is None:
            if len(self.stages) >= 64:
                stage = OTHER_KEY
            stats = self.stages.setdefault(stage, _Timed())
        stats.count += 1
        duration = _duration(obj.get("duration_ms"))
        if duration is not None:
            stats.sketch.add(duration)

    def _on_timed_out(self, obj: dict[str, Any]) -> None:
        _bump(self.timed_out_stage, _key(obj.get("stage")))

    def _on_completed(self, obj: dict[str, Any]) -> None:
        _bump(self.outcomes, _key(obj.get("state")))

    def _on_finalize_failed(self, obj: dict[str, Any]) -> None:
        _bump(self.failed_stage, _key(obj.get("stage")))

    def _on_bulkhead(self, obj: dict[str, Any]) -> None:
        self.bulkhead_rejected += 1

    # -- the report

    def report(self) -> SummaryReport:
        by_event: dict[str, int] = {}
        by_level: dict[str, int] = {}
        for slot in self._event_slots.values():
            if slot.count:
                by_event[slot.event] = by_event.get(slot.event, 0) + slot.count
                by_level[slot.level] = by_level.get(slot.level, 0) + slot.count
        counts: dict[str, int] = {}
        methods: dict[str, dict[str, int]] = {}
        classes: dict[str, dict[str, int]] = {}
        overall_classes: dict[str, int] = {}
        for request in self._request_slots.values():
            route = request.route
            counts[route] = counts.get(route, 0) + request.count
            by_method = methods.setdefault(route, {})
            by_method[request.method] = by_method.get(request.method, 0) + request.count
            by_class = classes.setdefault(route, {})
            cls = request.status_class
            by_class[cls] = by_class.get(cls, 0) + request.count
            overall_classes[cls] = overall_classes.get(cls, 0) + request.count
        overall = LatencySketch()
        by_route: dict[str, RouteReport] = {}
        for route, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            sketch = self.routes[route]
            overall.merge(sketch)
            p50, p95, p99 = sketch.quantiles((0.5, 0.95, 0.99))
            by_route[route] = {
                "count": count,
                "by_method": _by_count(methods[route]),
                "by_status_class": _status_classes(classes[route]),
                "p50_ms": _round(p50),
                "p95_ms": _round(p95),
                "p99_ms": _round(p99),
                "max_ms": _round(sketch.maximum()),
                "histogram": sketch.histogram(),
            }
        p50, p95, p99 = overall.quantiles((0.5, 0.95, 0.99))
        stages: dict[str, StageReport] = {}
        for stage, timed in sorted(self.stages.items(), key=lambda kv: (-kv[1].count, kv[0])):
            s50, s95, s99 = timed.sketch.quantiles((0.5, 0.95, 0.99))
            stages[stage] = {
                "count": timed.count,
                "p50_ms": _round(s50),
                "p95_ms": _round(s95),
                "p99_ms": _round(s99),
                "max_ms": _round(timed.sketch.maximum()),
            }
        names = sorted(set(self.upstream_retries) | set(self.upstream_failed))
        by_name: dict[str, UpstreamNameReport] = {
            name: {
                "retries": self.upstream_retries.get(name, 0),
                "failed": self.upstream_failed.get(name, 0),
            }
            for name in names
        }
        first = None if self.first is _FAR_FUTURE else self.first
        last = None if self.last is _FAR_PAST else self.last
        span = (last - first).total_seconds() if first is not None and last is not None else None
        counted = sum(by_event.values())
        skipped: SkippedReport = {
            "not_json": self.not_json,
            "not_object": self.not_object,
            "no_event": self.no_event,
            "too_long": self.lines.too_long,
        }
        return {
            "input": {"source": self.source, "gzip": self.gzip, "error": self.input_error},
            "filter": {"since": format_time(self.since), "until": format_time(self.until)},
            "lines": {
                "total": self.read - self.blank + self.lines.too_long,
                "counted": counted,
                "filtered_out": self.filtered_out,
                "skipped": skipped,
                "by_event": _by_count(by_event),
                "by_level": _by_count(by_level),
            },
            "window": {
                "first": format_time(first),
                "last": format_time(last),
                "span_s": None if span is None else round(span, 6),
            },
            "requests": {
                "total": sum(counts.values()),
                "by_status_class": _status_classes(overall_classes),
                "p50_ms": _round(p50),
                "p95_ms": _round(p95),
                "p99_ms": _round(p99),
                "max_ms": _round(overall.maximum()),
                "histogram": overall.histogram(),
                "by_route": by_route,
            },
            "upstream": {
                "retries": _by_count(self.retries),
                "retries_total": sum(self.retries.values()),
                "failed": _by_count(self.failed),
                "failed_total": sum(self.failed.values()),
                "by_name": by_name,
            },
            "finalize": {
                "by_outcome": _by_count(self.outcomes),
                "timed_out_stage": _by_count(self.timed_out_stage),
                "failed_stage": _by_count(self.failed_stage),
                "stages": stages,
            },
            "mutation_failures": _by_count(self.mutation_failures),
            "errors": _by_count(self.errors),
            "bulkhead": {"rejected": self.bulkhead_rejected},
        }


def summarize_file(
    path: str | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    stdin: BinaryIO | None = None,
) -> SummaryReport:
    """Summarise the log at ``path`` (``None``/``"-"``: stdin). Raises :class:`LogInputError`."""
    summary = LogSummary(since=since, until=until)
    with open_log(path, stdin=stdin) as source:
        summary.source = source.name
        summary.gzip = source.gzip
        summary.feed_stream(source.stream)
    return summary.report()


# --------------------------------------------------------------------------- text report


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _fmt_edge(ms: float) -> str:
    if math.isinf(ms):
        return "inf"
    if ms >= 1000:
        return f"{ms / 1000:g}s"
    return f"{ms:g}ms"


def _bin_label(item: HistogramBin) -> str:
    if item["lower_ms"] == 0:
        return f"< {_fmt_edge(item['upper_ms'])}"
    if math.isinf(item["upper_ms"]):
        return f">= {_fmt_edge(item['lower_ms'])}"
    return f"{_fmt_edge(item['lower_ms'])} - {_fmt_edge(item['upper_ms'])}"


def _counter_lines(title: str, table: Mapping[str, int], top: int) -> list[str]:
    if not table:
        return [f"{title}: none"]
    out = [f"{title}: {sum(table.values()):,}"]
    items = list(table.items())
    width = min(60, max(len(k) for k, _ in items[:top]))
    for key, n in items[:top]:
        out.append(f"  {key:<{width}}  {n:>10,}")
    if len(items) > top:
        rest = sum(n for _, n in items[top:])
        out.append(f"  ... {len(items) - top:,} more ({rest:,})")
    return out


def format_histogram(bins: list[HistogramBin], width: int = 40) -> list[str]:
    """Rows ``label | #### count`` with bars scaled to the fullest bin."""
    if not bins:
        return ["  (no durations)"]
    peak = max(b["count"] for b in bins)
    labels = [_bin_label(b) for b in bins]
    label_width = max(len(label) for label in labels)
    rows = []
    for label, item in zip(labels, bins, strict=True):
        n = item["count"]
        bar = "#" * (max(1, round(width * n / peak)) if n else 0)
        rows.append(f"  {label:>{label_width}} | {bar:<{width}} {n:,}")
    return rows


def format_summary_text(report: SummaryReport, *, top: int = 10) -> str:
    """The compact human-readable report printed by ``ballast logs summarize``."""
    lines = report["lines"]
    skipped = lines["skipped"]
    skipped_total = sum(
        (skipped["not_json"], skipped["not_object"], skipped["no_event"], skipped["too_long"])
    )
    out: list[str] = []
    source = report["input"]["source"]
    out.append(f"Log: {source}{' (gzip)' if report['input']['gzip'] else ''}")
    if report["input"]["error"]:
        out.append(f"WARNING: {report['input']['error']}")
    flt = report["filter"]
    if flt["since"] or flt["until"]:
        out.append(f"Filter: since {flt['since'] or '-'} until {flt['until'] or '-'}")
    window = report["window"]
    out.append(
        f"Window: {window['first'] or '-'} .. {window['last'] or '-'} (span {format_span(window['span_s'])})"
    )
    out.append(
        f"Lines: {lines['total']:,} total, {lines['counted']:,} counted, "
        f"{skipped_total:,} skipped (not JSON {skipped['not_json']:,}, "
        f"not an object {skipped['not_object']:,}, no event {skipped['no_event']:,}, "
        f"too long {skipped['too_long']:,}), {lines['filtered_out']:,} filtered out"
    )
    levels = "  ".join(f"{k} {n:,}" for k, n in lines["by_level"].items())
    out.append(f"By level: {levels or 'none'}")
    out += _counter_lines("By event", lines["by_event"], max(top, 20))
    out.append("")

    requests = report["requests"]
    out.append(
        f"Requests: {requests['total']:,}  p50 {_fmt_ms(requests['p50_ms'])} ms  "
        f"p95 {_fmt_ms(requests['p95_ms'])} ms  p99 {_fmt_ms(requests['p99_ms'])} ms  "
        f"max {_fmt_ms(requests['max_ms'])} ms"
    )
    if requests["by_route"]:
        classes = [c for c in STATUS_CLASSES if c not in ("1xx", "other")]
        for extra in ("1xx", "other"):
            if requests["by_status_class"].get(extra):
                classes.append(extra)
        routes = list(requests["by_route"].items())
        width = min(60, max(5, *(len(r) for r, _ in routes[: max(top, 30)])))
        header = f"  {'route':<{width}} {'count':>9}" + "".join(f" {c:>7}" for c in classes)
        out.append(header + f" {'p50':>8} {'p95':>8} {'p99':>8}  (ms)")
        for route, stats in routes[: max(top, 30)]:
            cells = "".join(f" {stats['by_status_class'].get(c, 0):>7,}" for c in classes)
            out.append(
                f"  {route:<{width}} {stats['count']:>9,}{cells}"
                f" {_fmt_ms(stats['p50_ms']):>8} {_fmt_ms(stats['p95_ms']):>8}"
                f" {_fmt_ms(stats['p99_ms']):>8}"
            )
        if len(routes) > max(top, 30):
            out.append(f"  ... {len(routes) - max(top, 30):,} more routes")
        out.append("Request latency (all routes):")
        out += format_histogram(requests["histogram"])
    out.append("")

    upstream = report["upstream"]
    out += _counter_lines("Upstream retries", upstream["retries"], top)
    out += _counter_lines("Upstream give-ups by kind", upstream["failed"], top)
    out.append("")
    finalize = report["finalize"]
    out += _counter_lines("Finalize jobs by outcome", finalize["by_outcome"], top)
    out += _counter_lines("Finalize timeouts by stage", finalize["timed_out_stage"], top)
    if finalize["failed_stage"]:
        out += _counter_lines("Finalize failures by stage", finalize["failed_stage"], top)
    out.append("")
    out += _counter_lines("Mutation failures by session", report["mutation_failures"], top)
    out += _counter_lines("Top error types", report["errors"], top)
    out.append(f"Bulkhead rejections: {report['bulkhead']['rejected']:,}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTML report


_HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:1.2em 0 .3em;font-family:ui-monospace,monospace}
table{border-collapse:collapse;margin:.3em 0}
td,th{padding:2px 8px;text-align:right;vertical-align:middle}
td:first-child,th:first-child{text-align:left;font-family:ui-monospace,monospace}
th{border-bottom:1px solid #aaa}
.hist td.bar{width:30em;text-align:left}
.bar div{background:#4a7bd0;height:.9em;min-width:1px}
.meta{color:#666}
.warn{color:#a00;font-weight:bold}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_counter(title: str, table: Mapping[str, int], top: int = 50) -> str:
    if not table:
        return f"<h3>{_esc(title)}</h3><p class=meta>none</p>"
    items = list(table.items())
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{n:,}</td></tr>" for k, n in items[:top])
    if len(items) > top:
        rest = sum(n for _, n in items[top:])
        rows += f"<tr><td class=meta>... {len(items) - top:,} more</td><td>{rest:,}</td></tr>"
    return f"<h3>{_esc(title)} ({sum(table.values()):,})</h3><table>{rows}</table>"


def _html_histogram(bins: list[HistogramBin]) -> str:
    if not bins:
        return "<p class=meta>no durations</p>"
    peak = max(b["count"] for b in bins) or 1
    rows = []
    for item in bins:
        pct = 100.0 * item["count"] / peak
        rows.append(
            f"<tr><td>{_esc(_bin_label(item))}</td>"
            f'<td class=bar><div style="width:{pct:.2f}%"></div></td>'
            f"<td>{item['count']:,}</td></tr>"
        )
    return f"<table class=hist>{''.join(rows)}</table>"


def render_html(report: SummaryReport) -> str:
    """A self-contained HTML page (inline CSS bars, no external assets) of the summary."""
    lines = report["lines"]
    requests = report["requests"]
    window = report["window"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>Ballast log summary: {_esc(report['input']['source'])}</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        f"<h1>Ballast log summary: {_esc(report['input']['source'])}</h1>",
        f"<p class=meta>{_esc(window['first'] or '-')} .. {_esc(window['last'] or '-')}"
        f" (span {_esc(format_span(window['span_s']))})</p>",
    ]
    if report["input"]["error"]:
        parts.append(f"<p class=warn>{_esc(report['input']['error'])}</p>")
    skipped = lines["skipped"]
    parts.append("<h2>Lines</h2><table>")
    for label, n in (
        ("total", lines["total"]),
        ("counted", lines["counted"]),
        ("filtered out", lines["filtered_out"]),
        ("skipped: not JSON", skipped["not_json"]),
        ("skipped: not an object", skipped["not_object"]),
        ("skipped: no event", skipped["no_event"]),
        ("skipped: too long", skipped["too_long"]),
    ):
        parts.append(f"<tr><td>{_esc(label)}</td><td>{n:,}</td></tr>")
    parts.append("</table>")
    parts.append(_html_counter("By event", lines["by_event"]))
    parts.append(_html_counter("By level", lines["by_level"]))

    parts.append(f"<h2>Requests ({requests['total']:,})</h2>")
    head = "".join(f"<th>{c}</th>" for c in STATUS_CLASSES)
    parts.append(
        f"<table><tr><th>route</th><th>count</th>{head}"
        "<th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th></tr>"
    )
    rows = [("all routes", requests["total"], requests)] + [
        (route, stats["count"], stats) for route, stats in requests["by_route"].items()
    ]
    for name, count, stats in rows:
        cells = "".join(f"<td>{stats['by_status_class'].get(c, 0):,}</td>" for c in STATUS_CLASSES)
        parts.append(
            f"<tr><td>{_esc(name)}</td><td>{count:,}</td>{cells}"
            f"<td>{_fmt_ms(stats['p50_ms'])}</td><td>{_fmt_ms(stats['p95_ms'])}</td>"
            f"<td>{_fmt_ms(stats['p99_ms'])}</td><td>{_fmt_ms(stats['max_ms'])}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h3>all routes</h3>")
    parts.append(_html_histogram(requests["histogram"]))
    for route, stats in requests["by_route"].items():
        parts.append(f"<h3>{_esc(route)} ({stats['count']:,})</h3>")
        parts.append(_html_histogram(stats["histogram"]))

    upstream = report["upstream"]
    parts.append("<h2>Upstream</h2>")
    parts.append(_html_counter("Retries by status or error type", upstream["retries"]))
    parts.append(_html_counter("Give-ups by kind", upstream["failed"]))
    finalize = report["finalize"]
    parts.append("<h2>Finalize</h2>")
    parts.append(_html_counter("Jobs by outcome", finalize["by_outcome"]))
    parts.append(_html_counter("Timeouts by stage", finalize["timed_out_stage"]))
    parts.append(_html_counter("Failures by stage", finalize["failed_stage"]))
    parts.append("<h2>Errors</h2>")
    parts.append(_html_counter("Mutation failures by session", report["mutation_failures"]))
    parts.append(_html_counter("Error types", report["errors"]))
    parts.append(
        f"<h3>Bulkhead</h3><table><tr><td>rejected</td>"
        f"<td>{report['bulkhead']['rejected']:,}</td></tr></table>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- trace


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


def _session_request_ids(stream: Readable, session_id: str, result: TraceResult) -> list[str]:
    found: dict[str, None] = {}
    for _, obj in _records(stream, _select_containing(_id_needle(session_id)), result):
        if obj.get("session_id") == session_id:
            rid = obj.get("request_id")
            if type(rid) is str:
                found[rid] = None
    return list(found)


def _trace_session_two_pass(path: str, session_id: str) -> TraceResult:
    result = TraceResult(None, session_id, [])
    with open_log(path) as source:
        result.request_ids = _session_request_ids(source.stream, session_id, result)
    wanted = set(result.request_ids)
    collector = _Collector()
    with open_log(path) as source:
        for seq, obj in _records(source.stream, _session_selector(session_id, wanted), result):
            rid = obj.get("request_id")
            if obj.get("session_id") == session_id or (type(rid) is str and rid in wanted):
                result.entries.append(collector.entry(seq, obj))
    return result


def _trace_session_streaming(stream: Readable, session_id: str) -> TraceResult:
    """One pass: hold in-flight requests' lines until they are known to matter or not."""
    result = TraceResult(None, session_id, [])
    collector = _Collector()
    matched: dict[str, None] = {}
    pending: OrderedDict[str, list[TraceEntry]] = OrderedDict()
    pending_lines = 0
    for seq, obj in _records(stream, _select_all, result):
        rid = obj.get("request_id")
        if type(rid) is not str:
            rid = None
        if obj.get("session_id") == session_id:
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
    stdin: BinaryIO | None = None,
) -> TraceResult:
    """Every line of one request or one session, sorted by timestamp (ties: file order).

    A session's trace also holds every line of each request that logged that session
    id. Exactly one of ``request_id`` and ``session_id`` must be given.
    """
    if (request_id is None) == (session_id is None):
        raise ValueError("give exactly one of request_id and session_id")
    if request_id is not None:
        with open_log(path, stdin=stdin) as source:
            result = _trace_request(source.stream, request_id)
    else:
        assert session_id is not None
        if path is not None and path != "-" and os.path.isfile(path):
            result = _trace_session_two_pass(path, session_id)
        else:
            with open_log(path, stdin=stdin) as source:
                result = _trace_session_streaming(source.stream, session_id)
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
    what = (
        f"request {result.request_id}"
        if result.request_id is not None
        else f"session {result.session_id} ({_plural(len(result.request_ids), 'request')})"
    )
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
    else:
        doc["session_id"] = result.session_id
    doc["request_ids"] = result.request_ids
    doc["lines"] = result.records()
    doc["summary"] = _trace_summary(result)
    doc["error"] = result.error
    return doc


# --------------------------------------------------------------------------- CLI


def _time_arg(text: str) -> datetime:
    return parse_time_arg(text)


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="logs_command", metavar="COMMAND", required=True)

    summarize = commands.add_parser(
        "summarize",
        help="counts, latency percentiles and failures of a JSON log",
        description="Summarise a Ballast JSON log (plain, gzip or stdin) in constant memory.",
    )
    summarize.add_argument("file", nargs="?", default="-", metavar="FILE", help="log file, - for stdin")
    summarize.add_argument("--json", action="store_true", help="print one JSON document")
    summarize.add_argument(
        "--since", type=_time_arg, metavar="TIME", help="ISO 8601 time, or a duration before now (30m, 1h)"
    )
    summarize.add_argument("--until", type=_time_arg, metavar="TIME", help="same forms as --since; exclusive")
    summarize.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML report")
    summarize.add_argument("--top", type=int, default=10, metavar="N", help="rows per table (default 10)")

    trace = commands.add_parser(
        "trace",
        help="every line of one request or session, in time order",
        description="Print every line of one request, or of one session and the requests that touched it.",
    )
    which = trace.add_mutually_exclusive_group(required=True)
    which.add_argument("--request-id", metavar="ID", help="the request id (X-Request-ID)")
    which.add_argument("--session", metavar="ID", help="the session id")
    trace.add_argument("file", nargs="?", default="-", metavar="FILE", help="log file, - for stdin")
    trace.add_argument("--json", action="store_true", help="print one JSON document")


def add_logs_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``logs`` (with ``summarize`` and ``trace``) to a CLI's sub-parsers.

    The parsed namespace carries ``func=run_logs``; call ``run_logs(args)`` for the exit code.
    """
    parser = subparsers.add_parser(
        "logs",
        help="summarise or trace JSON log files",
        description="Analyse Ballast's JSON log lines.",
    )
    _add_subcommands(parser)
    parser.set_defaults(func=run_logs)


def _write(out: TextIO, text: str) -> None:
    # Log text may hold anything; never fail on an encoding the terminal lacks.
    encoding = getattr(out, "encoding", None) or "utf-8"
    out.write(text.encode(encoding, "backslashreplace").decode(encoding))


def _run_summarize(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.since is not None and args.until is not None and args.since >= args.until:
        err.write("ballast logs summarize: --since must be before --until\n")
        return 2
    report = summarize_file(args.file, since=args.since, until=args.until)
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as fh:
                fh.write(render_html(report))
        except OSError as exc:
            err.write(f"ballast logs summarize: cannot write {args.html}: {exc.strerror or exc}\n")
            return 1
    if args.json:
        _write(out, orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _write(out, format_summary_text(report, top=max(1, args.top)))
    if report["input"]["error"]:
        err.write(f"ballast logs summarize: {report['input']['error']}\n")
        return 1
    return 0


def _run_trace(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = trace_file(args.file, request_id=args.request_id, session_id=args.session)
    if args.json:
        _write(out, orjson.dumps(trace_document(result), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _write(out, format_trace_text(result))
    if result.error:
        err.write(f"ballast logs trace: {result.error}\n")
        return 1
    return 0 if result.entries else 1


def run_logs(args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run a parsed ``logs`` command; the exit code (0 ok, 1 nothing found or I/O error, 2 usage)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        if args.logs_command == "summarize":
            return _run_summarize(args, out, err)
        if args.logs_command == "trace":
            return _run_trace(args, out, err)
    except LogInputError as exc:
        err.write(f"ballast logs {args.logs_command}: {exc}\n")
        return 1
    except BrokenPipeError:
        # The reader (head, less) went away: that is not an error.
        _silence_stdout()
        return 0
    err.write(f"ballast logs: unknown command {args.logs_command!r}\n")
    return 2


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m ballast.logtools summarize|trace ...``: the same as ``ballast logs``."""
    parser = argparse.ArgumentParser(prog="ballast logs", description="Analyse Ballast's JSON log lines.")
    _add_subcommands(parser)
    return run_logs(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
