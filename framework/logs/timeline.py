"""Counts over time: the summary's per-interval series ("when did errors start?").

A summary of a whole log says what failed; an incident review first needs *when*: when
the 5xx began, when the breaker opened, whether retries spiked before or after. So the
summary keeps, for a fixed list of series (requests, 5xx, retries, give-ups, the
round-two protections, finalize outcomes), counts per time bucket.

Buckets are aligned to multiples of the interval since the Unix epoch (UTC), so two
summaries of overlapping logs put the same line in the same bucket. While streaming,
buckets start at one second; when more than ``MAX_BUCKETS`` exist they are merged into
the next coarser interval of :data:`INTERVALS` (each one a multiple of the one before),
so memory is bounded by ``MAX_BUCKETS x len(SERIES)`` counters whatever the log's span.
At the end the interval is chosen from the span (the smallest of :data:`INTERVALS`
giving at most ``MAX_POINTS`` points), unless ``--interval`` fixed it. Because the
coarsening only ever happens at more than ``MAX_BUCKETS`` buckets, which implies a span
needing an interval coarser than the one reached, the result does not depend on the
order lines arrived in.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TypedDict

from ballast.logs.times import format_time

#: The series, in the order they are reported. ``load.shed`` sums the sampled lines'
#: ``count`` field; every other series counts lines.
SERIES: tuple[str, ...] = (
    "requests",
    "5xx",
    "upstream.retry",
    "upstream.failed",
    "upstream.retry_denied",
    "circuit.opened",
    "circuit.half_open",
    "circuit.closed",
    "fallback.used",
    "load.shed",
    "auth.denied",
    "finalize.succeeded",
    "finalize.failed",
    "finalize.timed_out",
)
INDEX = {name: i for i, name in enumerate(SERIES)}
REQUESTS, ERRORS_5XX = INDEX["requests"], INDEX["5xx"]
#: Intervals the automatic choice and the coarsening use, in seconds; each divides the next.
INTERVALS: tuple[int, ...] = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 21600, 86400, 604800)
MAX_POINTS = 120
MAX_BUCKETS = 4096
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The first second a datetime can hold: a bucket starting earlier is labelled with it.
_FIRST_SECOND = -62_135_596_800
MAX_INTERVAL_S = 10 * 366 * 86400
_INTERVAL_ARG = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class SeriesReport(TypedDict):
    interval_s: int | None
    times: list[str]
    counts: dict[str, list[int]]
    totals: dict[str, int]


def parse_interval(text: str) -> int:
    """``--interval`` as whole seconds: ``30s``, ``5m``, ``1h``, ``1d`` or a plain number."""
    match = _INTERVAL_ARG.match(text)
    seconds = int(match.group(1)) * _UNIT[match.group(2) or "s"] if match else 0
    if seconds <= 0 or seconds > MAX_INTERVAL_S:
        raise ValueError(f"invalid interval {text!r}: whole seconds or 30s, 5m, 1h, 1d; at most 10 years")
    return seconds


def _label(start: int) -> str:
    return format_time(_EPOCH + timedelta(seconds=max(start, _FIRST_SECOND))) or ""


def _coarser(resolution: int) -> int:
    for candidate in INTERVALS:
        if candidate > resolution and candidate % resolution == 0:
            return candidate
    return resolution * 10


class Timeline:
    """Per-bucket counts of :data:`SERIES`; feed with :meth:`add` (epoch seconds, UTC)."""

    __slots__ = ("buckets", "fixed", "high", "low", "resolution")

    def __init__(self, interval_s: int | None = None) -> None:
        self.fixed = interval_s
        self.resolution = interval_s or 1
        self.buckets: dict[int, list[int]] = {}
        # The first and last second seen: the automatic interval is chosen from these,
        # not from bucket starts, so it does not depend on the coarsening so far.
        self.low = 0
        self.high = -1

    def add(self, second: int, series: int, n: int = 1) -> None:
        if self.high < self.low:
            self.low = self.high = second
        elif second < self.low:
            self.low = second
        elif second > self.high:
            self.high = second
        start = second - second % self.resolution
        row = self.buckets.get(start)
        if row is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._rebucket(_coarser(self.resolution))
                start = second - second % self.resolution
                row = self.buckets.get(start)
            if row is None:
                row = self.buckets[start] = [0] * len(SERIES)
        row[series] += n

    def _rebucket(self, resolution: int) -> None:
        merged: dict[int, list[int]] = {}
        for start, row in self.buckets.items():
            key = start - start % resolution
            into = merged.get(key)
            if into is None:
                merged[key] = list(row)
            else:
                for i, n in enumerate(row):
                    into[i] += n
        self.buckets = merged
        self.resolution = resolution

    def _interval(self) -> int:
        if not self.buckets:
            return self.resolution
        low, high = self.low, self.high
        interval = self.resolution
        if self.fixed is None:
            for candidate in INTERVALS:
                if candidate >= interval and candidate % interval == 0:
                    interval = candidate
                    if high // interval - low // interval + 1 <= MAX_POINTS:
                        break
            while high // interval - low // interval + 1 > MAX_POINTS:  # spans of years
                interval = _coarser(interval)
        while high // interval - low // interval + 1 > MAX_BUCKETS:
            interval = _coarser(interval)
        return interval

    def report(self) -> SeriesReport:
        """Contiguous buckets from the first to the last (empty ones as zeros)."""
        totals = [0] * len(SERIES)
        for row in self.buckets.values():
            for i, n in enumerate(row):
                totals[i] += n
        if not self.buckets:
            return {
                "interval_s": self.fixed,
                "times": [],
                "counts": {name: [] for name in SERIES},
                "totals": dict(zip(SERIES, totals, strict=True)),
            }
        interval = self._interval()
        if interval != self.resolution:
            self._rebucket(interval)
        low, high = min(self.buckets), max(self.buckets)
        starts = range(low, high + 1, interval)
        empty = [0] * len(SERIES)
        rows = [self.buckets.get(start, empty) for start in starts]
        return {
            "interval_s": interval,
            "times": [_label(start) for start in starts],
            "counts": {name: [row[i] for row in rows] for i, name in enumerate(SERIES)},
            "totals": dict(zip(SERIES, totals, strict=True)),
        }
