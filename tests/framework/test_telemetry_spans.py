"""The span half of ballast.telemetry: a no-op without a tracer, the tracer's span with one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import pytest

from ballast.telemetry import Telemetry


class ListTracer:
    """Records the spans opened, closed and failed, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, str | int]]] = []

    def span(self, name: str, attributes: Mapping[str, str | int]) -> AbstractContextManager[object]:
        return self._span(name, dict(attributes))

    @contextmanager
    def _span(self, name: str, attributes: dict[str, str | int]) -> Iterator[object]:
        self.events.append(("start", name, attributes))
        try:
            yield self
        except BaseException as exc:
            self.events.append(("failed", name, {"error": type(exc).__name__}))
            raise
        self.events.append(("end", name, attributes))


def test_without_a_tracer_span_is_one_shared_no_op() -> None:
    telemetry = Telemetry()
    first = telemetry.span("finalize freeze", stage="freeze")
    assert first is telemetry.span("other")
    with first, first:  # re-entrant: nothing to set up, nothing to tear down
        pass


def test_an_attached_tracer_gets_each_span_with_its_attributes() -> None:
    telemetry = Telemetry()
    tracer = ListTracer()
    telemetry.attach_tracer(tracer)
    with telemetry.span("finalize stats", stage="stats"):
        pass
    with pytest.raises(ValueError), telemetry.span("finalize report", stage="report"):
        raise ValueError("boom")
    assert tracer.events == [
        ("start", "finalize stats", {"stage": "stats"}),
        ("end", "finalize stats", {"stage": "stats"}),
        ("start", "finalize report", {"stage": "report"}),
        ("failed", "finalize report", {"error": "ValueError"}),
    ]
