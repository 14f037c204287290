"""The DuckDB engine of the summary: one scan in DuckDB, the same counters, the same document.

DuckDB parses the log (``read_json``, newline-delimited, on every core), reading only
the fields the summary uses, each as its JSON text, and returns grouped counts from one
query with three ``GROUPING SETS``: every line by the fields of its own event (event,
level, a request's route/method/status, the keys a rare event's handler reads, with
the window's first and last timestamps); latency-sketch buckets (the bucket index of
:mod:`ballast.logs.sketch`, computed in SQL) by route or stage; and counts per second
for the timeline (the grouped form of :mod:`ballast.logs.groups`, which the native
engine returns too). :class:`~ballast.logs.groups.Filler` turns each group's field texts
into values with ``orjson`` and feeds the counts to the streaming engine's own counters,
handlers and timeline, so the tables, caps, percentiles and rendering are the same code
whichever engine ran.

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
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ballast.logs.aggregate import LogSummary
from ballast.logs.groups import (
    BUCKETS_KEY,
    FIELDS,
    LINES_KEY,
    RARE_COLUMNS,
    SECONDS_KEY,
    TIMED,
    ZERO_BUCKET,
    Declined,
    Filler,
    json_text,
    stamp_key,
)
from ballast.logs.parallel import usable_cores, within_caps
from ballast.logs.reading import MAX_LINE_BYTES
from ballast.logs.report import SummaryReport
from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS

MEMORY_LIMIT = "256MB"
THREADS = 4
FETCH_ROWS = 10_000

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
    return max(1, min(THREADS, usable_cores()))


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


_COLUMNS = tuple(dict.fromkeys(LINES_KEY + BUCKETS_KEY + SECONDS_KEY))


def build_sql(path: str, since: datetime | None, until: datetime | None) -> str:
    struct = ", ".join(f'"{name}" JSON' for name in FIELDS)
    source = (f"read_json({_lit(path)}, format = 'newline_delimited', records = false, "
              f"ignore_errors = true, columns = {{j: 'STRUCT({struct})'}})")
    timed = ", ".join(_lit(json_text(e)) for e in TIMED)
    window = "true"
    if since is not None or until is not None:
        tk = "CASE tshape WHEN 1 THEN substr(tsj, 2, 26) WHEN 2 THEN substr(tsj, 2, 19) || '.000000' END"
        parts = [f"({tk}) >= {_lit(stamp_key(since))}" if since is not None else "",
                 f"({tk}) < {_lit(stamp_key(until))}" if until is not None else ""]
        window = "coalesce(" + " AND ".join(p for p in parts if p) + ", false)"
    rare = ", ".join(f"j.{name}::VARCHAR AS {column}" for name, column in RARE_COLUMNS.items()
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
         WHEN d IS NOT NULL THEN {ZERO_BUCKET} END AS b
  FROM shaped
)
SELECT GROUPING({", ".join(_COLUMNS)}) AS g, {", ".join(_COLUMNS)},
  count(*) AS n, min(tsj) AS lo, max(tsj) AS hi, max(d) AS dmax
FROM lines
GROUP BY GROUPING SETS ({grouping(LINES_KEY)}, {grouping(BUCKETS_KEY)}, {grouping(SECONDS_KEY)})
"""


def _mask(key: tuple[str, ...]) -> int:
    # GROUPING() sets a bit per column *not* grouped, the first column the highest bit.
    width = len(_COLUMNS)
    return sum(1 << (width - 1 - i) for i, name in enumerate(_COLUMNS) if name not in key)


_LINES = _mask(LINES_KEY)
_BUCKETS = _mask(BUCKETS_KEY)
_SECONDS = _mask(SECONDS_KEY)


def _rows(cursor: Any) -> Iterator[tuple[Any, ...]]:
    while True:
        chunk = cursor.fetchmany(FETCH_ROWS)
        if not chunk:
            return
        yield from chunk


def _fill_from_cursor(summary: LogSummary, cursor: Any) -> None:
    """The query's rows, fetched ``FETCH_ROWS`` at a time, into ``summary``."""
    at = {name: i for i, name in enumerate(_COLUMNS, start=1)}
    lines_at = [at[name] for name in LINES_KEY]
    buckets_at = [at[name] for name in BUCKETS_KEY]
    seconds_at = [at[name] for name in SECONDS_KEY]
    filler = Filler(summary)
    for row in _rows(cursor):
        g, n = row[0], row[-4]
        if g == _LINES:
            filler.line((*(row[i] for i in lines_at), n, row[-3], row[-2]))
        elif g == _BUCKETS:
            filler.bucket((*(row[i] for i in buckets_at), n, row[-1]))
        elif g == _SECONDS:
            filler.second((*(row[i] for i in seconds_at), n))
    filler.finish()


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
            _fill_from_cursor(summary, con.execute(build_sql(path, since, until)))
        except (Declined, duckdb.Error):
            return None
        finally:
            con.close()
    if not within_caps(summary):
        return None
    return summary.report()
