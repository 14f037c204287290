"""Log analysis for Ballast's JSON log lines: ``ballast logs summarize | trace | query | tail``.

The server writes one JSON object per line with stable event names (``http.request``,
``upstream.retry``, ``finalize.completed``, ...; see "Log events" in the architecture
notes). Operators ask two questions of such a log, which may be gigabytes long: what
happened overall, and when (``summarize``), and what happened to one request, session or
trace (``trace``). This package answers both without loading the log into memory, so it
works on the production log as it is, gzipped or piped. ``query`` hands the log to
DuckDB for the next question, in SQL; ``tail`` watches a log as it grows.

Modules, one job each: :mod:`~ballast.logs.reading` (files, gzip, stdin, batches of
lines), :mod:`~ballast.logs.times` (timestamps, ``--since``/``--until``),
:mod:`~ballast.logs.report` (the summary document's types),
:mod:`~ballast.logs.sketch` (the latency sketch), :mod:`~ballast.logs.aggregate` and
:mod:`~ballast.logs.slots` (the streaming aggregator and its counters),
:mod:`~ballast.logs.timeline` and :mod:`~ballast.logs.protections` (counts over time;
the round-two protection events), :mod:`~ballast.logs.assemble` (counters to document),
:mod:`~ballast.logs.parallel` and :mod:`~ballast.logs.summarize` (several processes,
one result), :mod:`~ballast.logs.text`, :mod:`~ballast.logs.page` and
:mod:`~ballast.logs.charts` (text and HTML rendering), :mod:`~ballast.logs.trace`,
:mod:`~ballast.logs.query`, :mod:`~ballast.logs.tail` and :mod:`~ballast.logs.cli`.
This page is the contract of the summary document, field by field.

Input
-----
A file, a gzip file (recognised by its magic bytes, whatever its name) or standard input
(``-`` or no file). The input is read in fixed-size chunks and split into lines; a line
longer than ``max_line_bytes`` (8 MiB) is dropped as it streams past and counted as
``too_long``. Blank lines (JSON whitespace only) are ignored and not counted; a UTF-8
byte-order mark at the very start is ignored. A line that is not JSON (including invalid
UTF-8, and the bare ``null``) is counted as ``skipped.not_json``; JSON that is not an
object with a string ``event`` (arrays, numbers, strings, objects without one) as
``skipped.no_event``; both are otherwise ignored. What counts as JSON is fixed in
:mod:`~ballast.logs.jsonline` so that both engines read a line alike: strict JSON, plus
``NaN``/``Inf``/``Infinity`` literals, numbers beyond the double range (never usable
values) and one trailing comma; a repeated key keeps its first value. Fields of the
wrong type (``"status": "abc"``) are counted under a fallback key (``other``,
``(none)``) instead of failing. A gzip stream cut short is read up to the cut; the
summary says so in ``input.error`` and the command exits 1.

Engines
-------
:func:`summarize_file` has two engines with one output (the tests compare them byte for
byte). ``engine="auto"`` (the default, and ``ballast logs summarize``'s) uses DuckDB
(:mod:`~ballast.logs.duck`; optional, ``pip install 'ballast[logs]'``) for a plain
regular file of at least 1 MiB, and the streaming engine for everything else: standard
input, gzip files, small files, and any file the DuckDB engine declines (a line over
8 MiB, a string ``timestamp`` not in the form Ballast writes, UTC with ``Z``, a capped
table reaching its cap). ``engine="duckdb"`` uses DuckDB for any plain file (same
fallbacks); ``engine="stream"`` never does.

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
total stays exact. The timeline keeps at most ``MAX_BUCKETS`` (4,096) buckets of 14
counters. The streaming engine splits a large plain file across processes (each with the
same bounds) and merges the parts exactly; when a capped table fills, the file is read
again in one pass, so the document never depends on the number of processes. The DuckDB
engine runs with a memory limit (``duck.MEMORY_LIMIT``, 256 MB, spilling to a temporary
directory beyond it) and reads its grouped results in chunks into the same bounded
tables; its process peaks at about 190-230 MB resident on the 1M-line benchmark log and
on a 300,000-line log with a new second and duration on every line.

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
        "skipped": {"not_json": int, "no_event": int, "too_long": int},
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
      "bulkhead": {"rejected": int},
      "protections": {         # the round-two protections (ballast.logs.protections)
        "circuit": {"opened": int, "half_open": int, "closed": int,
                    "opened_by_upstream": {upstream: int}},
        "retry_denied": {kind: int},     # upstream.retry_denied
        "fallback": {operation: int},    # fallback.used
        "load_shed": {"lines": int, "requests": int,   # requests: the sum of `count`
                      "by_route": {route: int}},
        "auth_denied": {reason: int}
      },
      "series": {              # counts over time (ballast.logs.timeline)
        "interval_s": int | null, "times": [str],   # bucket starts, UTC
        "counts": {series: [int]},                  # one count per bucket
        "totals": {series: int}
      }
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

from ballast.logs.aggregate import LogSummary
from ballast.logs.cli import add_logs_parser, main, run_logs
from ballast.logs.page import render_html
from ballast.logs.reading import GunzipReader, LineCounter, LogInputError, open_log, read_batches
from ballast.logs.report import MAX_KEYS, MAX_ROUTES, SummaryReport
from ballast.logs.sketch import LatencySketch
from ballast.logs.summarize import summarize_file
from ballast.logs.text import format_histogram, format_summary_text
from ballast.logs.times import format_span, format_time, parse_time_arg, parse_timestamp
from ballast.logs.trace import TraceResult, format_trace_line, format_trace_text, trace_document, trace_file

__all__ = [
    "MAX_KEYS",
    "MAX_ROUTES",
    "GunzipReader",
    "LatencySketch",
    "LineCounter",
    "LogInputError",
    "LogSummary",
    "SummaryReport",
    "TraceResult",
    "add_logs_parser",
    "format_histogram",
    "format_span",
    "format_summary_text",
    "format_time",
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
