"""The counters the summary's hot loop lands on: one per (event, level), one per request kind.

Kept apart from :mod:`ballast.logs.aggregate` so the merge of parallel parts
(:mod:`ballast.logs.parallel`) can build them too. ``__slots__`` classes: the hot loop
touches their attributes once per line.
"""

from __future__ import annotations

from ballast.logs.protections import Handler
from ballast.logs.sketch import LatencySketch

# Kinds of event the hot loop tells apart (an int compare beats a string compare).
_PLAIN, _REQUEST, _HANDLED = 0, 1, 2


class _EventSlot:
    """Lines of one (event, level) pair, and what to do with each."""

    __slots__ = ("count", "event", "handler", "kind", "level")

    def __init__(
        self, event: str, level: str, kind: int, handler: Handler | None
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
