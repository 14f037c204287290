"""Test support for outage protection: a clock to drive by hand and a recording exporter.

State machines on the outbound path read time from the registry's clock, so tests
move a :class:`FakeClock` instead of sleeping; a :class:`RecordingExporter` attached to
a :class:`ballast.telemetry.Telemetry` shows exactly what was recorded.
"""

from __future__ import annotations

from typing import Any

from ballast.telemetry import MetricSpec


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingExporter:
    """Telemetry exporter that keeps what was recorded, and samples gauges on demand."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[str, ...]], float] = {}
        self.samplers: dict[tuple[str, tuple[str, ...]], Any] = {}

    def inc(self, spec: MetricSpec, labels: tuple[str, ...], amount: float) -> None:
        key = (spec.name, labels)
        self.counts[key] = self.counts.get(key, 0) + amount

    def observe(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        pass

    def set(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        self.samplers[(spec.name, labels)] = lambda: value

    def sample(self, spec: MetricSpec, labels: tuple[str, ...], read: Any) -> None:
        self.samplers[(spec.name, labels)] = read

    def count(self, name: str, *labels: str) -> float:
        return self.counts.get((name, labels), 0)

    def gauge(self, name: str, *labels: str) -> float:
        return float(self.samplers[(name, labels)]())
