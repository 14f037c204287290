"""The native engine of the summary: a C scanner on every core, the same counters, the same document.

``ballast.logs._scan`` (built from ``_scan.c`` when the package is installed with a C
compiler at hand; optional) reads the file in one range per usable core, without the
GIL. Each *simple* line (a flat JSON object without whitespace, escapes or control
characters, in well-formed UTF-8, with a timestamp in one of the forms Ballast writes:
every line Ballast writes without an escape) is counted into the three sets of groups
the DuckDB engine's query returns (:mod:`ballast.logs.duck`), with the same columns, so
:class:`~ballast.logs.groups.Filler` feeds both engines' groups to the streaming engine's counters.
Every other line is handed back by its offset and read here by the streaming engine's
own reader (:meth:`LogSummary.feed`), so what such a line means is decided by one piece
of code.

It declines (``None``; the caller then tries the next engine) on a line longer than
``MAX_LINE_BYTES``, more groups or handed-back lines than the scanner keeps (the limits
in ``_scan.c``: at most 2^19 groups and 2^20 handed-back lines per thread, about 110 MB
per thread at the very worst), a capped table reaching its cap, or a read error (which
the streaming engine then reports in its own words).
"""

from __future__ import annotations

import itertools
import os
import struct
import types
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ballast.logs import groups
from ballast.logs.aggregate import LogSummary
from ballast.logs.parallel import split_points, usable_cores, within_caps
from ballast.logs.reading import MAX_LINE_BYTES
from ballast.logs.report import SummaryReport
from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS

#: A file is split into one range per core, each of at least this many bytes.
MIN_RANGE_BYTES = 1 << 20
#: Handed-back lines fed to the streaming engine per batch.
BATCH_LINES = 4096

_scan: types.ModuleType | None
try:
    from ballast.logs import _scan
except ImportError:  # built without a C compiler: the other engines remain
    _scan = None


def available() -> bool:
    return _scan is not None


def _bound(when: datetime | None) -> bytes | None:
    return None if when is None else groups.stamp_key(when).encode()


def _handed_back(fh: Any, offsets: bytes) -> Iterator[list[bytes]]:
    """The handed-back lines, read from ``fh`` in batches, in file order per range."""
    batch: list[bytes] = []
    for offset, length in struct.iter_unpack("=qq", offsets):
        fh.seek(offset)
        batch.append(fh.read(length))
        if len(batch) >= BATCH_LINES:
            yield batch
            batch = []
    if batch:
        yield batch


def summarize_native(
    path: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    interval_s: int | None = None,
    threads: int | None = None,
) -> SummaryReport | None:
    """The summary of the plain file ``path`` computed by the native scanner; ``None`` if declined.

    ``threads``: the ranges the file is cut into, one thread each (default: one per
    usable core, each of at least ``MIN_RANGE_BYTES``).
    """
    if _scan is None:
        return None
    try:
        return _summarize(path, since, until, interval_s, threads)
    except OSError:
        return None


def _summarize(
    path: str, since: datetime | None, until: datetime | None, interval_s: int | None, threads: int | None,
) -> SummaryReport | None:
    assert _scan is not None
    summary = LogSummary(since=since, until=until, interval_s=interval_s)
    summary.source = path
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        parts = max(1, min(16, threads or min(usable_cores(), 1 + size // MIN_RANGE_BYTES)))
        points = split_points(path, parts)
        ranges = list(itertools.pairwise(points)) or [(0, 0)]
        result = _scan.scan(
            fh.fileno(), ranges, MAX_LINE_BYTES, _bound(since), _bound(until),
            [groups.json_text(e).encode() for e in groups.RARE],
            [groups.json_text(e).encode() for e in groups.TIMED],
            _MIN_MS, _INV_LOG_GAMMA, groups.ZERO_BUCKET,
        )
        if result is None:
            return None
        lines, buckets, seconds, offsets, _simple = result
        for batch in _handed_back(fh, offsets):
            summary.feed(batch)
    try:
        groups.fill(summary, lines, buckets, seconds)
    except groups.Declined:
        return None
    if not within_caps(summary):
        return None
    return summary.report()

