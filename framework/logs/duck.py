"""The DuckDB engine of the summary: one scan in DuckDB, the same counters, the same document.

DuckDB parses the log (``read_json``, newline-delimited, on every core), reading only
the fields the summary uses, each as its JSON text, and returns grouped counts from one
query with three ``GROUPING SETS``: every line by the fields of its own event (event,
level, a request's route/method/status, the keys a rare event's handler reads, with
the window's first and last timestamps); latency-sketch buckets (the bucket index of
:mod:`ballast.logs.sketch`, computed in SQL) by route or stage; and counts per second
for the timeline. Python turns each group's field texts into values with ``orjson``
(:func:`ballast.logs.jsonline.read_field`) and feeds the counts to the streaming
engine's own counters, handlers and timeline (a :class:`LogSummary`), so the tables,
caps, percentiles and rendering are the same code whichever engine ran.

It declines (returns ``None``; the caller then uses the streaming engine) when it
cannot promise the streaming engine's answer: a line longer than ``MAX_LINE_BYTES``; a
string ``timestamp`` not in the form Ballast writes (UTC, ``Z``, no fraction or six
digits), which only Python's parser reads exactly; a capped table reaching its cap (as
the parallel engine does); a file name with ``*``, ``?`` or ``[`` (DuckDB would read
it as a pattern); a DuckDB error. Memory: DuckDB runs with ``MEMORY_LIMIT``
and spills grouped state to a temporary directory beyond it; the grouped rows are read
in chunks into the bounded counters.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from ballast.logs.aggregate import LogSummary
from ballast.logs.jsonline import read_field as read_value
from ballast.logs.parallel import within_caps
from ballast.logs.reading import MAX_LINE_BYTES
from ballast.logs.report import SummaryReport, _key, _status_class
from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS, LatencySketch
from ballast.logs.timeline import ERRORS_5XX, REQUESTS
from ballast.logs.times import epoch_second

MEMORY_LIMIT = "256MB"
THREADS = 4
FETCH_ROWS = 10_000
_ZERO = -(1 << 31)  # the bucket index standing for "below 0.001 ms"

#: Rare events and the fields their handlers read (the keys of the group).
RARE: dict[str, tuple[str, ...]] = {
    "upstream.retry": ("status", "error_type", "name"),
    "upstream.failed": ("kind", "name", "error_type"),
    "error.unhandled": ("error_type",),
    "session.mutation_failed": ("session_id", "error_type"),
    "finalize.stage": ("stage",),
    "finalize.timed_out": ("stage",),
    "finalize.completed": ("state",),
    "finalize.failed": ("stage",),
    "bulkhead.rejected": (),
    "circuit.opened": ("upstream",),
    "circuit.half_open": (),
    "circuit.closed": (),
    "upstream.retry_denied": ("kind",),
    "fallback.used": ("operation",),
    "load.shed": ("count", "route"),
    "auth.denied": ("reason",),
}
#: Rare events whose handlers put a mark on the timeline (they need the second).
TIMED = frozenset({
    "upstream.retry", "upstream.failed", "finalize.completed", "circuit.opened", "circuit.half_open",
    "circuit.closed", "upstream.retry_denied", "fallback.used", "load.shed", "auth.denied",
})
FIELDS = ("timestamp", "level", "event", "route", "method", "status", "duration_ms", "name", "kind",
          "error_type", "session_id", "stage", "state", "upstream", "operation", "count", "reason")
_DIGIT = "[0-9]"
_STAMP = f'"{_DIGIT * 4}-{_DIGIT * 2}-{_DIGIT * 2}T{_DIGIT * 2}:{_DIGIT * 2}:{_DIGIT * 2}'
_GLOB_US = _STAMP + "." + _DIGIT * 6 + 'Z"'
_GLOB_S = _STAMP + 'Z"'


def available() -> bool:
    try:
        import duckdb  # noqa: F401
    except ImportError:
        return False
    return True


def _threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(THREADS, cores))


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def longest_line_fits(path: str, limit: int = MAX_LINE_BYTES, probe: int = 1 << 16) -> bool:
    """Whether no line of the file is longer than ``limit`` bytes.

    It jumps ``limit`` bytes at a time and reads back from there (``probe`` bytes at a
    time) to the last newline, so a file of ordinary lines costs one small read per
    ``limit`` bytes, not a scan.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = 0  # the start of a line
        while size - pos > limit:
            end = pos + limit + 1  # a newline in [pos, end) ends this line in time
            while True:
                start = max(pos, end - probe)
                fh.seek(start)
                newline = fh.read(end - start).rfind(b"\n")
                if newline >= 0:
                    pos = start + newline + 1
                    break
                if start == pos:
                    return False
                end = start
    return True


def _stamp_key(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


#: Columns of the fields rare events read (status, route and stage have their own).
_RARE_COLUMNS = {"status": "stj", "route": "rj", "stage": "sj", "session_id": "sess"}
_RARE_COLUMNS.update({name: f"f_{name}" for name in ("name", "kind", "error_type", "state", "upstream",
                                                      "operation", "count", "reason")})
# The three grouping sets: every line by the fields of its own event (event, level, the
# request's route/method/status, the rare events' keys); latency buckets; seconds.
_LINES_KEY = ("bad", "ej", "lj", "tshape", "rj", "mj", "stj", "sj", "f_name", "f_kind", "f_error_type",
              "f_state", "f_upstream", "f_operation", "f_count", "f_reason", "sess", "tpr", "win")
_BUCKETS_KEY = ("ej", "rj", "sj", "b", "win")
_SECONDS_KEY = ("tp", "isreq", "stj", "win")
_COLUMNS = tuple(dict.fromkeys(_LINES_KEY + _BUCKETS_KEY + _SECONDS_KEY))


def build_sql(path: str, since: datetime | None, until: datetime | None) -> str:
    struct = ", ".join(f'"{name}" JSON' for name in FIELDS)
    source = (f"read_json({_lit(path)}, format = 'newline_delimited', records = false, "
              f"ignore_errors = true, columns = {{j: 'STRUCT({struct})'}})")
    timed = ", ".join(_lit(_json_text(e)) for e in TIMED)
    window = "true"
    if since is not None or until is not None:
        tk = "CASE tshape WHEN 1 THEN substr(tsj, 2, 26) WHEN 2 THEN substr(tsj, 2, 19) || '.000000' END"
        parts = [f"({tk}) >= {_lit(_stamp_key(since))}" if since is not None else "",
                 f"({tk}) < {_lit(_stamp_key(until))}" if until is not None else ""]
        window = "coalesce(" + " AND ".join(p for p in parts if p) + ", false)"
    rare = ", ".join(f"j.{name}::VARCHAR AS {column}" for name, column in _RARE_COLUMNS.items()
                     if column.startswith("f_"))

    def grouping(key: tuple[str, ...]) -> str:
        return "(" + ", ".join(key) + ")"

    return f"""
WITH raw AS (
  SELECT j IS NULL AS bad, j.event::VARCHAR AS ej, j.level::VARCHAR AS lj, j.timestamp::VARCHAR AS tsj,
    j.route::VARCHAR AS rj, j.method::VARCHAR AS mj, j.status::VARCHAR AS stj, j.stage::VARCHAR AS sj,
    TRY_CAST(j.duration_ms::VARCHAR AS DOUBLE) AS d0, {rare},
    CASE WHEN j.event::VARCHAR = '"session.mutation_failed"' THEN j.session_id::VARCHAR END AS sess
  FROM {source}
), shaped AS (
  SELECT *, ej = '"http.request"' AS isreq,
    CASE WHEN tsj IS NULL OR left(tsj, 1) <> '"' THEN 0
         WHEN length(tsj) = 29 AND tsj GLOB {_lit(_GLOB_US)} THEN 1
         WHEN length(tsj) = 22 AND tsj GLOB {_lit(_GLOB_S)} THEN 2 ELSE 3 END AS tshape,
    CASE WHEN d0 >= 0 AND d0 < 1e15 THEN d0 END AS d
  FROM raw
), lines AS (
  SELECT *, {window} AS win,
    CASE WHEN tshape IN (1, 2) THEN substr(tsj, 2, 19) END AS tp,
    CASE WHEN tshape IN (1, 2) AND ej IN ({timed}) THEN substr(tsj, 2, 19) END AS tpr,
    CASE WHEN d >= {_MIN_MS!r} THEN CAST(ceil(ln(d) * {_INV_LOG_GAMMA!r}) AS BIGINT)
         WHEN d IS NOT NULL THEN {_ZERO} END AS b
  FROM shaped
)
SELECT GROUPING({", ".join(_COLUMNS)}) AS g, {", ".join(_COLUMNS)},
  count(*) AS n, min(tsj) AS lo, max(tsj) AS hi, max(d) AS dmax
FROM lines
GROUP BY GROUPING SETS ({grouping(_LINES_KEY)}, {grouping(_BUCKETS_KEY)}, {grouping(_SECONDS_KEY)})
"""


def _json_text(value: str) -> str:
    """The JSON text DuckDB hands over for a plain string (the event names compared here)."""
    return '"' + value + '"'


def _mask(key: tuple[str, ...]) -> int:
    # GROUPING() sets a bit per column *not* grouped, the first column the highest bit.
    width = len(_COLUMNS)
    return sum(1 << (width - 1 - i) for i, name in enumerate(_COLUMNS) if name not in key)


_LINES = _mask(_LINES_KEY)
_WIN = _LINES_KEY.index("win")
_TPR = _LINES_KEY.index("tpr")
_BUCKETS = _mask(_BUCKETS_KEY)
_SECONDS = _mask(_SECONDS_KEY)


class Declined(Exception):
    """The engine cannot promise the streaming engine's answer for this input."""


def _rows(cursor: Any) -> Iterator[tuple[Any, ...]]:
    while True:
        chunk = cursor.fetchmany(FETCH_ROWS)
        if not chunk:
            return
        yield from chunk


class _Seconds:
    """Second prefixes (``2026-11-28T14:03:58``) to epoch seconds, as Python reads them."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, prefix: str) -> int:
        second = self._cache.get(prefix)
        if second is None:
            try:
                when = datetime.fromisoformat(prefix + "Z")
            except ValueError:
                raise Declined from None  # Python reads this line as having no time
            if when.strftime("%Y-%m-%dT%H:%M:%S") != prefix:
                raise Declined  # read, but as another time (24:00:00)
            if len(self._cache) >= 4096:
                self._cache.clear()
            second = self._cache[prefix] = epoch_second(when)
        return second


def _split(cursor: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The query's rows as :func:`fill` takes them: each grouping set's key and aggregates."""
    at = {name: i for i, name in enumerate(_COLUMNS, start=1)}
    lines_at = [at[name] for name in _LINES_KEY]
    buckets_at = [at[name] for name in _BUCKETS_KEY]
    seconds_at = [at[name] for name in _SECONDS_KEY]
    lines: list[tuple[Any, ...]] = []
    buckets: list[tuple[Any, ...]] = []
    seconds: list[tuple[Any, ...]] = []
    for row in _rows(cursor):
        g, n = row[0], row[-4]
        if g == _LINES:
            lines.append((*(row[i] for i in lines_at), n, row[-3], row[-2]))
        elif g == _BUCKETS:
            buckets.append((*(row[i] for i in buckets_at), n, row[-1]))
        elif g == _SECONDS:
            seconds.append((*(row[i] for i in seconds_at), n))
    return lines, buckets, seconds


def fill(
    summary: LogSummary,
    lines: Iterable[tuple[Any, ...]],
    buckets: Iterable[tuple[Any, ...]],
    seconds: Iterable[tuple[Any, ...]],
) -> None:
    """Feed grouped lines to ``summary``'s counters, as the streaming engine counts them.

    ``lines``: ``_LINES_KEY`` + (count, first and last ``timestamp`` texts);
    ``buckets``: ``_BUCKETS_KEY`` + (count, largest duration); ``seconds``:
    ``_SECONDS_KEY`` + (count,). Field values are JSON texts (``None`` when absent).
    Raises :class:`Declined` where the streaming engine's answer could differ.
    """
    second_of = _Seconds()
    values: dict[str | None, object] = {}

    def read_field(raw: str | None) -> object:
        try:
            return values[raw]
        except KeyError:
            if len(values) >= 4096:
                values.clear()
            value = values[raw] = read_value(raw)
            return value

    rare_at = {name: _LINES_KEY.index(column) for name, column in _RARE_COLUMNS.items()}
    extremes: dict[int, list[str]] = {}  # timestamp form -> [first, last] text
    for row in lines:
        bad, ej, lj, tshape, rj, mj, stj = row[:7]
        n, lo, hi = row[-3:]
        summary.read += n
        if bad:
            summary.not_json += n
            continue
        event = read_field(ej)
        if type(event) is not str:
            summary.no_event += n
            continue
        if tshape == 3:
            raise Declined  # a timestamp only Python's parser reads exactly
        slot = summary._slot_for((event, read_field(lj)))
        if slot is None or not row[_WIN]:
            summary.filtered_out += n
            continue
        slot.count += n
        if tshape in (1, 2):
            # Texts of one form order as their times do: keep the extremes, parse them once.
            ends = extremes.get(tshape)
            if ends is None:
                extremes[tshape] = [lo, hi]
            else:
                if lo < ends[0]:
                    ends[0] = lo
                if hi > ends[1]:
                    ends[1] = hi
        if event == "http.request":
            key = (read_field(rj), read_field(mj), read_field(stj))
            summary._request_slot_for(key).count += n
        elif event in RARE:
            obj = {name: read_field(row[rare_at[name]]) for name in RARE[event]}
            tpr = row[_TPR]
            summary._handlers[event](obj, None if tpr is None else second_of(tpr), n)
    for text in (text for ends in extremes.values() for text in ends):
        try:
            when = datetime.fromisoformat(text[1:-1])
        except ValueError:
            raise Declined from None
        summary.first = min(summary.first, when)
        summary.last = max(summary.last, when)
    for tp, isreq, stj, win, n in seconds:
        if tp is not None:
            second = second_of(tp)
            if isreq and win:
                summary.timeline.add(second, REQUESTS, n)
                if _status_class(read_field(stj)) == "5xx":
                    summary.timeline.add(second, ERRORS_5XX, n)
    for ej, rj, sj, b, win, n, dmax in buckets:
        if b is None or not win:
            continue
        event = read_field(ej)
        if event == "http.request":
            _bucket(summary.routes.get(_key(read_field(rj))), b, n, dmax)
        elif event == "finalize.stage":
            timed = summary.stages.get(_key(read_field(sj)))
            _bucket(None if timed is None else timed.sketch, b, n, dmax)


def _bucket(sketch: LatencySketch | None, b: int, n: int, dmax: float) -> None:
    if sketch is None:
        raise Declined  # a key folded into "(other)": over a cap, declined below anyway
    if b == _ZERO:
        sketch.zeros += n
    else:
        sketch.buckets[b] = sketch.buckets.get(b, 0) + n
    if dmax > sketch.max:
        sketch.max = float(dmax)


def summarize_duckdb(
    path: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    interval_s: int | None = None,
) -> SummaryReport | None:
    """The summary of the plain file ``path`` computed by DuckDB; ``None`` if declined."""
    import duckdb

    if any(c in path for c in "*?["):
        return None  # DuckDB would read the name as a pattern of file names
    try:
        if not longest_line_fits(path):
            return None
    except OSError:
        return None  # the streaming engine reports the error in its own words
    summary = LogSummary(since=since, until=until, interval_s=interval_s)
    summary.source = path
    with tempfile.TemporaryDirectory(prefix="ballast-summary-") as spill:
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"SET memory_limit = {_lit(MEMORY_LIMIT)}")
            con.execute(f"SET temp_directory = {_lit(spill)}")
            con.execute(f"SET threads = {_threads()}")
            con.execute("SET enable_progress_bar = false")
            con.execute("SET preserve_insertion_order = false")
            fill(summary, *_split(con.execute(build_sql(path, since, until))))
        except (Declined, duckdb.Error):
            return None
        finally:
            con.close()
    if not within_caps(summary):
        return None
    return summary.report()
