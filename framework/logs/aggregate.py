"""The streaming aggregator: :class:`LogSummary` counts batches of raw lines in bounded memory.

This is the hot loop of ``ballast logs summarize``: one ``orjson.loads`` per line, one
timestamp parse, and a lookup keyed by raw field values that lands on a pre-validated
counter. It keeps counters and latency sketches, never lines; tables keyed by values
taken from the log are capped (``MAX_KEYS``, ``MAX_ROUTES``), with later keys folded
into ``(other)`` so totals stay exact. Building the report from the counters lives in
:mod:`ballast.logs.assemble`.
"""

from __future__ import annotations

import math
import zlib
from datetime import UTC, datetime
from typing import Any

import orjson

from ballast.logs.assemble import assemble_report
from ballast.logs.jsonline import INVALID, first_wins, read_lenient
from ballast.logs.protections import Handler, Protections
from ballast.logs.reading import LineCounter, Readable, read_batches
from ballast.logs.report import (
    MAX_ROUTES,
    NONE_KEY,
    OTHER_KEY,
    SummaryReport,
    _bump,
    _duration,
    _key,
    _status_class,
)
from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS, LatencySketch
from ballast.logs.slots import _HANDLED, _PLAIN, _REQUEST, _EventSlot, _RequestSlot, _Timed
from ballast.logs.timeline import ERRORS_5XX, INDEX, REQUESTS, Timeline
from ballast.logs.times import FAR_FUTURE, FAR_PAST, epoch_second

_MAX_EVENTS = 1000
_MAX_LEVELS = 100
_MAX_METHODS = 32
_MAX_RAW_KEYS = 10_000
UTF8_BOM = b"\xef\xbb\xbf"


class LogSummary:
    """Streaming aggregation of log lines: :meth:`feed` batches, then read :meth:`report`.

    The per-line path is one ``orjson.loads``, one timestamp parse, and a lookup keyed by
    the raw ``(event, level)`` pair (and, for requests, the raw ``(route, method,
    status)`` triple) that lands on a pre-validated counter; fields are validated only
    the first time a key is seen. Raw keys are cached only when every part has the
    expected JSON type, so a malformed value is re-examined each time it appears.
    """

    def __init__(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        interval_s: int | None = None,
    ) -> None:
        self.since = since
        self.until = until
        self.timeline = Timeline(interval_s)
        self._seconds: dict[str, int] = {}
        self.protections = Protections(self.timeline)
        self.blank = 0
        self.read = 0
        self.filtered_out = 0
        self.not_json = 0
        self.no_event = 0
        self.lines = LineCounter()
        self.first = FAR_FUTURE
        self.last = FAR_PAST
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
        self._handlers: dict[str, Handler] = {
            "upstream.retry": self._on_retry,
            "upstream.failed": self._on_upstream_failed,
            "error.unhandled": self._on_unhandled,
            "session.mutation_failed": self._on_mutation_failed,
            "finalize.stage": self._on_stage,
            "finalize.timed_out": self._on_timed_out,
            "finalize.completed": self._on_completed,
            "finalize.failed": self._on_finalize_failed,
            "bulkhead.rejected": self._on_bulkhead,
            **self.protections.handlers(),
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
        # Requests per second in this batch, added to the timeline once per second seen.
        per_second: dict[int, int] = {}
        errors_per_second: dict[int, int] = {}
        seconds = self._seconds
        since = self.since if self.since is not None else FAR_PAST
        until = self.until if self.until is not None else FAR_FUTURE
        filtering = self.since is not None or self.until is not None
        first = self.first
        last = self.last
        blank = filtered_out = not_json = no_event = 0
        for line in batch:
            try:
                obj = loads(line)
            except decode_error:
                if not line.strip():
                    blank += 1
                    continue
                obj = read_lenient(line)
            else:
                if type(obj) is dict and line.count(b'":') != len(obj):
                    obj = first_wins(line, obj)  # maybe a repeated key: the first counts
            if type(obj) is not dict:
                if obj is None or obj is INVALID:
                    not_json += 1
                else:
                    no_event += 1  # an array, a string, a number: JSON, but no event
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
            second = None
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
                    # Seconds since the epoch (for the timeline), cached by the text up to
                    # the seconds for UTC stamps: converting each datetime costs more.
                    if ts[-1] == "Z":
                        second = seconds.get(ts[:19])
                        if second is None:
                            if len(seconds) >= 4096:
                                seconds.clear()
                            second = seconds[ts[:19]] = epoch_second(when)
                    else:
                        second = epoch_second(when)
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
                if second is not None:
                    per_second[second] = per_second.get(second, 0) + 1
                    if request.status_class == "5xx":
                        errors_per_second[second] = errors_per_second.get(second, 0) + 1
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
                        sketch.max = float(duration)
            elif kind == _HANDLED:
                handler = slot.handler
                if handler is not None:
                    handler(obj, second)
        add = self.timeline.add
        for second, n in per_second.items():
            add(second, REQUESTS, n)
        for second, n in errors_per_second.items():
            add(second, ERRORS_5XX, n)
        self.first = first
        self.last = last
        self.read += len(batch)
        self.blank += blank
        self.filtered_out += filtered_out
        self.not_json += not_json
        self.no_event += no_event

    def feed_stream(self, stream: Readable, *, at_start: bool = True) -> None:
        """Read ``stream`` to the end; a read error ends the input and is reported.

        ``at_start``: the stream starts the input, so a UTF-8 byte-order mark there is
        not part of the first line (as DuckDB reads a file).
        """
        try:
            for batch in read_batches(stream, counter=self.lines):
                if at_start:
                    at_start = False
                    if batch[0].startswith(UTF8_BOM):
                        batch[0] = batch[0][len(UTF8_BOM):]
                self.feed(batch)
        except (OSError, EOFError, zlib.error) as exc:
            self.input_error = f"input ended early: {exc}"

    # -- handlers of the rarer events: each gets a dict whose fields may have any type, the
    # line's second (None: no time) and how many such lines (the DuckDB engine groups them).

    def _on_retry(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        if second is not None:
            self.timeline.add(second, INDEX["upstream.retry"], n)
        status = obj.get("status")
        if type(status) is int:
            key = str(status)
        else:
            error_type = obj.get("error_type")
            key = error_type if type(error_type) is str and error_type else "(unknown)"
        _bump(self.retries, key, n)
        _bump(self.upstream_retries, _key(obj.get("name")), n)

    def _on_upstream_failed(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        if second is not None:
            self.timeline.add(second, INDEX["upstream.failed"], n)
        _bump(self.failed, _key(obj.get("kind")), n)
        _bump(self.upstream_failed, _key(obj.get("name")), n)
        self._error_type(obj, n)

    def _on_unhandled(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        self._error_type(obj, n)

    def _on_mutation_failed(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        _bump(self.mutation_failures, _key(obj.get("session_id")), n)
        self._error_type(obj, n)

    def _error_type(self, obj: dict[str, Any], n: int) -> None:
        error_type = obj.get("error_type")
        if type(error_type) is str and error_type:
            _bump(self.errors, error_type, n)

    def _on_stage(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        stage = _key(obj.get("stage"))
        stats = self.stages.get(stage)
        if stats is None:
            if len(self.stages) >= 64:
                stage = OTHER_KEY
            stats = self.stages.setdefault(stage, _Timed())
        stats.count += n
        duration = _duration(obj.get("duration_ms"))
        if duration is not None:
            for _ in range(n):
                stats.sketch.add(duration)

    def _on_timed_out(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        _bump(self.timed_out_stage, _key(obj.get("stage")), n)

    def _on_completed(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        state = _key(obj.get("state"))
        _bump(self.outcomes, state, n)
        series = INDEX.get("finalize." + state)
        if series is not None and second is not None:
            self.timeline.add(second, series, n)

    def _on_finalize_failed(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        _bump(self.failed_stage, _key(obj.get("stage")), n)

    def _on_bulkhead(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        self.bulkhead_rejected += n

    # -- the report

    def report(self) -> SummaryReport:
        """The summary document of everything fed so far."""
        return assemble_report(self)
