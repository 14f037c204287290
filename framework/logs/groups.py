"""The grouped form of a log, shared by the summary's DuckDB and native engines.

Both engines count a log as groups of lines with equal fields, in three sets: every line
by the fields of its own event (``LINES_KEY``: event, level, a request's
route/method/status, the keys a rare event's handler reads, the second of a timed one,
the time window), latency-sketch buckets by route or stage (``BUCKETS_KEY``), and
requests per second (``SECONDS_KEY``). Field values are their JSON texts. A
:class:`Filler` feeds such rows to the streaming engine's own counters, handlers and
timeline (a :class:`~ballast.logs.aggregate.LogSummary`), so the tables, caps,
percentiles and rendering are the same code whichever engine ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ballast.logs.aggregate import LogSummary
from ballast.logs.jsonline import read_field as read_value
from ballast.logs.report import _key, _status_class
from ballast.logs.sketch import LatencySketch
from ballast.logs.timeline import ERRORS_5XX, REQUESTS
from ballast.logs.times import epoch_second

ZERO_BUCKET = -(1 << 31)  # the bucket index standing for "below 0.001 ms"

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


def json_text(value: str) -> str:
    """The JSON text DuckDB hands over for a plain string (the event names compared here)."""
    return '"' + value + '"'


def stamp_key(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


#: Columns of the fields rare events read (status, route and stage have their own).
RARE_COLUMNS = {"status": "stj", "route": "rj", "stage": "sj", "session_id": "sess"}
RARE_COLUMNS.update({name: f"f_{name}" for name in ("name", "kind", "error_type", "state", "upstream",
                                                      "operation", "count", "reason")})
# The three grouping sets: every line by the fields of its own event (event, level, the
# request's route/method/status, the rare events' keys); latency buckets; seconds.
LINES_KEY = ("bad", "ej", "lj", "tshape", "rj", "mj", "stj", "sj", "f_name", "f_kind", "f_error_type",
              "f_state", "f_upstream", "f_operation", "f_count", "f_reason", "sess", "tpr", "win")
BUCKETS_KEY = ("ej", "rj", "sj", "b", "win")
SECONDS_KEY = ("tp", "isreq", "stj", "win")
_WIN = LINES_KEY.index("win")
_TPR = LINES_KEY.index("tpr")
_RARE_AT = {name: LINES_KEY.index(column) for name, column in RARE_COLUMNS.items()}


class Declined(Exception):
    """The engine cannot promise the streaming engine's answer for this input."""


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


class Filler:
    """Feeds grouped lines to a summary's counters, as the streaming engine counts them.

    Rows come in any order, one at a time (:meth:`line`: ``LINES_KEY`` + count, first
    and last ``timestamp`` texts; :meth:`second`: ``SECONDS_KEY`` + count;
    :meth:`bucket`: ``BUCKETS_KEY`` + count, largest duration), field values as their
    JSON texts (``None`` when absent); :meth:`finish` ends it. Only the latency-bucket
    rows are kept until then (their sketches exist once every line row is counted).
    Any call may raise :class:`Declined` where the streaming engine's answer could differ.
    """

    def __init__(self, summary: LogSummary) -> None:
        self.summary = summary
        self.second_of = _Seconds()
        self._values: dict[str | None, object] = {}
        self._extremes: dict[int, list[str]] = {}  # timestamp form -> [first, last] text
        self._buckets: list[tuple[Any, ...]] = []

    def read_field(self, raw: str | None) -> object:
        values = self._values
        try:
            return values[raw]
        except KeyError:
            if len(values) >= 4096:
                values.clear()
            value = values[raw] = read_value(raw)
            return value

    def line(self, row: tuple[Any, ...]) -> None:
        summary, read_field = self.summary, self.read_field
        bad, ej, lj, tshape, rj, mj, stj = row[:7]
        n, lo, hi = row[-3:]
        summary.read += n
        if bad:
            summary.not_json += n
            return
        event = read_field(ej)
        if type(event) is not str:
            summary.no_event += n
            return
        if tshape == 3:
            raise Declined  # a timestamp only Python's parser reads exactly
        slot = summary._slot_for((event, read_field(lj)))
        if slot is None or not row[_WIN]:
            summary.filtered_out += n
            return
        slot.count += n
        if tshape in (1, 2):
            # Texts of one form order as their times do: keep the extremes, parse them once.
            ends = self._extremes.get(tshape)
            if ends is None:
                self._extremes[tshape] = [lo, hi]
            else:
                if lo < ends[0]:
                    ends[0] = lo
                if hi > ends[1]:
                    ends[1] = hi
        if event == "http.request":
            key = (read_field(rj), read_field(mj), read_field(stj))
            summary._request_slot_for(key).count += n
        elif event in RARE:
            obj = {name: read_field(row[_RARE_AT[name]]) for name in RARE[event]}
            tpr = row[_TPR]
            summary._handlers[event](obj, None if tpr is None else self.second_of(tpr), n)

    def second(self, row: tuple[Any, ...]) -> None:
        tp, isreq, stj, win, n = row
        if tp is not None:
            second = self.second_of(tp)
            if isreq and win:
                timeline = self.summary.timeline
                timeline.add(second, REQUESTS, n)
                if _status_class(self.read_field(stj)) == "5xx":
                    timeline.add(second, ERRORS_5XX, n)

    def bucket(self, row: tuple[Any, ...]) -> None:
        if row[3] is not None and row[4]:  # b, win
            self._buckets.append(row)

    def finish(self) -> None:
        summary, read_field = self.summary, self.read_field
        for text in (text for ends in self._extremes.values() for text in ends):
            try:
                when = datetime.fromisoformat(text[1:-1])
            except ValueError:
                raise Declined from None
            summary.first = min(summary.first, when)
            summary.last = max(summary.last, when)
        for ej, rj, sj, b, _win, n, dmax in self._buckets:
            event = read_field(ej)
            if event == "http.request":
                _bucket(summary.routes.get(_key(read_field(rj))), b, n, dmax)
            elif event == "finalize.stage":
                timed = summary.stages.get(_key(read_field(sj)))
                _bucket(None if timed is None else timed.sketch, b, n, dmax)
        self._buckets.clear()


def fill(
    summary: LogSummary,
    lines: Iterable[tuple[Any, ...]],
    buckets: Iterable[tuple[Any, ...]],
    seconds: Iterable[tuple[Any, ...]],
) -> None:
    """The three sets of grouped rows (as :class:`Filler` takes them) into ``summary``."""
    filler = Filler(summary)
    for row in lines:
        filler.line(row)
    for row in seconds:
        filler.second(row)
    for row in buckets:
        filler.bucket(row)
    filler.finish()


def _bucket(sketch: LatencySketch | None, b: int, n: int, dmax: float) -> None:
    if sketch is None:
        raise Declined  # a key folded into "(other)": over a cap, declined below anyway
    if b == ZERO_BUCKET:
        sketch.zeros += n
    else:
        sketch.buckets[b] = sketch.buckets.get(b, 0) + n
    if dmax > sketch.max:
        sketch.max = float(dmax)
