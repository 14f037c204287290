"""Summarising a large plain log file on several cores: split by bytes, aggregate, merge exactly.

Parsing JSON is the summary's cost, and it is per line, so a big regular file is cut
into byte ranges, four per worker (each cut moved to just after a newline, so no line
is split), each range is summarised by the same :class:`LogSummary` code in a pool of
forked processes, and the parts are merged in the parent as they arrive. Counts, sketches and
timelines add up exactly. The one thing that does not is a capped table (``MAX_KEYS``
and the like): which keys are kept before the rest fold into ``(other)`` depends on
the order lines are seen. So when any merged table reaches its cap, the parts are
thrown away and the file is summarised again in one pass: the output is always the
one the single-pass summary gives (the tests compare the two byte for byte).

Standard input, gzip files and small files (under ``MIN_PARALLEL_BYTES``) are read in
one pass: they cannot be split, or are not worth a process.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Mapping, Sized
from datetime import datetime
from typing import Any

from ballast.logs.aggregate import _MAX_EVENTS, _MAX_LEVELS, _MAX_METHODS, LogSummary
from ballast.logs.reading import GZIP_MAGIC, open_log
from ballast.logs.report import MAX_KEYS, MAX_ROUTES, SummaryReport
from ballast.logs.sketch import LatencySketch
from ballast.logs.slots import _RequestSlot, _Timed
from ballast.logs.timeline import MAX_BUCKETS, Timeline, _coarser

MIN_PARALLEL_BYTES = 16 << 20
_TABLES = (
    "retries", "failed", "upstream_retries", "upstream_failed", "outcomes", "timed_out_stage",
    "failed_stage", "mutation_failures", "errors",
)
MAX_WORKERS = 8
RANGES_PER_WORKER = 4


class _Range:
    """A readable window ``[start, end)`` of a file."""

    def __init__(self, path: str, start: int, end: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._fh.seek(start)
        self._left = end - start

    def read(self, size: int, /) -> bytes:
        if self._left <= 0:
            return b""
        data = self._fh.read(min(size, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()


def split_points(path: str, parts: int) -> list[int]:
    """Byte offsets cutting the file into ``parts`` ranges, each starting a line."""
    size = os.path.getsize(path)
    points = [0]
    with open(path, "rb") as fh:
        for k in range(1, parts):
            fh.seek(max(points[-1], size * k // parts))
            fh.readline()  # move to just after the next newline
            points.append(min(fh.tell(), size))
    points.append(size)
    return sorted(set(points))


def _summarise_range(job: tuple[str, int, int, dict[str, Any]]) -> LogSummary:
    path, start, end, options = job
    summary = LogSummary(**options)
    stream = _Range(path, start, end)
    try:
        summary.feed_stream(stream, at_start=start == 0)
    finally:
        stream.close()
    # The raw-key caches are rebuilt on demand; no need to send them back.
    summary._slots = {}
    summary._requests = {}
    return summary


def _add(into: dict[str, int], other: Mapping[str, int]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


def _merge_timeline(into: Timeline, other: Timeline) -> None:
    if other.high < other.low:
        return
    resolution = max(into.resolution, other.resolution)
    if into.resolution != resolution:
        into._rebucket(resolution)
    if other.resolution != resolution:
        other._rebucket(resolution)
    for start, row in other.buckets.items():
        mine = into.buckets.setdefault(start, [0] * len(row))
        for i, n in enumerate(row):
            mine[i] += n
    if into.high < into.low:
        into.low, into.high = other.low, other.high
    else:
        into.low, into.high = min(into.low, other.low), max(into.high, other.high)
    while len(into.buckets) > MAX_BUCKETS:
        into._rebucket(_coarser(into.resolution))


def merge(into: LogSummary, other: LogSummary) -> bool:
    """Add ``other``'s counts to ``into``; ``False`` if a capped table got full (then redo in one pass)."""
    for name in ("blank", "read", "filtered_out", "not_json", "no_event", "bulkhead_rejected"):
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.lines.too_long += other.lines.too_long
    if other.input_error is not None:
        return False
    if other.first < into.first:
        into.first = other.first
    if other.last > into.last:
        into.last = other.last
    for (event, level), slot in other._event_slots.items():
        mine = into._slot_for((event, level))
        assert mine is not None
        mine.count += slot.count
    for route, sketch in other.routes.items():
        into.routes.setdefault(route, LatencySketch()).merge(sketch)
    for (route, method, cls), request in other._request_slots.items():
        into._methods.setdefault(route, set()).add(method)
        key = (route, method, cls)
        mine_request = into._request_slots.get(key)
        if mine_request is None:
            mine_request = into._request_slots[key] = _RequestSlot(route, method, cls, into.routes[route])
        mine_request.count += request.count
    for stage, timed in other.stages.items():
        mine_timed = into.stages.setdefault(stage, _Timed())
        mine_timed.count += timed.count
        mine_timed.sketch.merge(timed.sketch)
    for name in _TABLES:
        _add(getattr(into, name), getattr(other, name))
    mine_p, theirs = into.protections, other.protections
    _add(mine_p.circuit, theirs.circuit)
    for name in ("opened_by_upstream", "retry_denied", "fallback", "shed_by_route", "auth_denied"):
        _add(getattr(mine_p, name), getattr(theirs, name))
    mine_p.shed_lines += theirs.shed_lines
    mine_p.shed_requests += theirs.shed_requests
    _merge_timeline(into.timeline, other.timeline)
    return within_caps(into)


def within_caps(summary: LogSummary) -> bool:
    """Whether no capped table is full: below its cap no key was folded into ``(other)``,
    so the counts do not depend on the order lines were seen in."""
    protections = summary.protections
    capped: list[tuple[Sized, int]] = [
        (summary._events, _MAX_EVENTS), (summary._levels, _MAX_LEVELS), (summary.routes, MAX_ROUTES),
        (summary.stages, 64), (protections.shed_by_route, 256),
    ]
    capped += [(methods, _MAX_METHODS) for methods in summary._methods.values()]
    capped += [(getattr(summary, name), MAX_KEYS) for name in _TABLES]
    capped += [(getattr(protections, name), MAX_KEYS) for name in ("opened_by_upstream", "retry_denied",
                                                                   "fallback", "auth_denied")]
    return all(len(table) < cap for table, cap in capped)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _workers() -> int:
    return max(1, min(MAX_WORKERS, usable_cores()))


def summarize_parallel(
    path: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    interval_s: int | None = None,
    workers: int | None = None,
) -> SummaryReport | None:
    """The summary of a plain regular file, computed on ``workers`` processes.

    ``None`` when the file is not worth splitting (small, gzip, not a regular file) or a
    capped table filled up: the caller then summarises it in one pass.
    """
    count = workers if workers is not None else _workers()
    try:
        if count < 2 or not os.path.isfile(path) or os.path.getsize(path) < MIN_PARALLEL_BYTES:
            return None
        with open(path, "rb") as fh:
            if fh.read(2) == GZIP_MAGIC:
                return None
        # More ranges than processes: on a shared machine a process that gets less CPU
        # takes fewer ranges, instead of the whole summary waiting for it.
        points = split_points(path, count * RANGES_PER_WORKER)
    except OSError:
        return None  # the one-pass reader reports the error in its own words
    options = {"since": since, "until": until, "interval_s": interval_s}
    jobs = [(path, a, b, options) for a, b in itertools.pairwise(points)]
    if len(jobs) < 2:
        return None  # nothing to split (an empty file, or one line)
    total = LogSummary(since=since, until=until, interval_s=interval_s)
    with open_log(path) as source:
        total.source, total.gzip = source.name, source.gzip
    with multiprocessing.get_context("fork").Pool(min(count, len(jobs))) as pool:
        # Merged as they arrive, so the parent holds one part at a time.
        for part in pool.imap(_summarise_range, jobs):
            if not merge(total, part):
                return None
    return total.report()
