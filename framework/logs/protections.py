"""The protections that remember (round two): breaker, retry budget, fallback, shedding, auth.

Their events are what an operator looks for first in an incident ("did the breaker
open? were we shedding load? was it auth?"), so the summary counts each by its reason
and puts it on the timeline. Events are taken by name from the log event contract
(docs/logging.md): ``circuit.opened`` / ``circuit.half_open`` / ``circuit.closed``
(``upstream``), ``upstream.retry_denied`` (``kind``), ``fallback.used``
(``operation``), ``load.shed`` (sampled: at most one line a second, whose ``count``
says how many requests it stands for), ``auth.denied`` (``reason``).
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

from ballast.logs.report import _bump, _by_count, _key
from ballast.logs.timeline import INDEX, Timeline


class Handler(Protocol):
    """A rare event's handler: the line's fields, its second (``None``: no time), how many lines."""

    def __call__(self, obj: dict[str, Any], second: int | None, n: int = 1, /) -> None: ...


class CircuitReport(TypedDict):
    opened: int
    half_open: int
    closed: int
    opened_by_upstream: dict[str, int]


class LoadShedReport(TypedDict):
    lines: int
    requests: int
    by_route: dict[str, int]


class ProtectionsReport(TypedDict):
    circuit: CircuitReport
    retry_denied: dict[str, int]
    fallback: dict[str, int]
    load_shed: LoadShedReport
    auth_denied: dict[str, int]


def _shed_count(value: object) -> int:
    """How many requests one sampled ``load.shed`` line stands for (at least the line itself)."""
    if type(value) is int and 0 < value < 1 << 53:
        return value
    return 1


class Protections:
    """Counters of the round-two protection events, and their handlers for the aggregator."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.circuit = {"opened": 0, "half_open": 0, "closed": 0}
        self.opened_by_upstream: dict[str, int] = {}
        self.retry_denied: dict[str, int] = {}
        self.fallback: dict[str, int] = {}
        self.shed_lines = 0
        self.shed_requests = 0
        self.shed_by_route: dict[str, int] = {}
        self.auth_denied: dict[str, int] = {}

    def handlers(self) -> dict[str, Handler]:
        return {
            "circuit.opened": self._on_opened,
            "circuit.half_open": self._on_half_open,
            "circuit.closed": self._on_closed,
            "upstream.retry_denied": self._on_retry_denied,
            "fallback.used": self._on_fallback,
            "load.shed": self._on_shed,
            "auth.denied": self._on_auth_denied,
        }

    def _mark(self, series: str, second: int | None, n: int) -> None:
        if second is not None:
            self.timeline.add(second, INDEX[series], n)

    def _on_opened(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        self.circuit["opened"] += n
        _bump(self.opened_by_upstream, _key(obj.get("upstream")), n)
        self._mark("circuit.opened", second, n)

    def _on_half_open(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        self.circuit["half_open"] += n
        self._mark("circuit.half_open", second, n)

    def _on_closed(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        self.circuit["closed"] += n
        self._mark("circuit.closed", second, n)

    def _on_retry_denied(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        _bump(self.retry_denied, _key(obj.get("kind")), n)
        self._mark("upstream.retry_denied", second, n)

    def _on_fallback(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        _bump(self.fallback, _key(obj.get("operation")), n)
        self._mark("fallback.used", second, n)

    def _on_shed(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        requests = _shed_count(obj.get("count")) * n
        self.shed_lines += n
        self.shed_requests += requests
        route = _key(obj.get("route"))
        table = self.shed_by_route
        if route in table or len(table) < 256:
            table[route] = table.get(route, 0) + requests
        else:
            table["(other)"] = table.get("(other)", 0) + requests
        self._mark("load.shed", second, requests)

    def _on_auth_denied(self, obj: dict[str, Any], second: int | None, n: int = 1) -> None:
        _bump(self.auth_denied, _key(obj.get("reason")), n)
        self._mark("auth.denied", second, n)

    def report(self) -> ProtectionsReport:
        return {
            "circuit": {
                "opened": self.circuit["opened"],
                "half_open": self.circuit["half_open"],
                "closed": self.circuit["closed"],
                "opened_by_upstream": _by_count(self.opened_by_upstream),
            },
            "retry_denied": _by_count(self.retry_denied),
            "fallback": _by_count(self.fallback),
            "load_shed": {
                "lines": self.shed_lines,
                "requests": self.shed_requests,
                "by_route": _by_count(self.shed_by_route),
            },
            "auth_denied": _by_count(self.auth_denied),
        }
