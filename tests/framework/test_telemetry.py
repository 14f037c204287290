"""The recording API: free without an exporter, exact with one, names from one catalogue."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ballast.telemetry import METRICS, MetricSpec, Reason, Telemetry


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[str, ...], float]] = []
        self.sampled: dict[tuple[str, tuple[str, ...]], Callable[[], float]] = {}

    def inc(self, spec: MetricSpec, labels: tuple[str, ...], amount: float) -> None:
        self.calls.append(("inc", spec.name, labels, amount))

    def observe(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        self.calls.append(("observe", spec.name, labels, value))

    def set(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        self.calls.append(("set", spec.name, labels, value))

    def sample(self, spec: MetricSpec, labels: tuple[str, ...], read: Callable[[], float]) -> None:
        self.sampled[(spec.name, labels)] = read


def test_without_an_exporter_recording_does_nothing() -> None:
    t = Telemetry()
    t.counter("ballast_upstream_attempts_total").inc("inference", "ok")
    t.histogram("ballast_commit_batch_size").observe(3)
    t.gauge("ballast_concurrency_limit").set(10)
    assert t.exporter is None


def test_an_attached_exporter_sees_each_call_with_labels_in_catalogue_order() -> None:
    t = Telemetry()
    attempts = t.counter("ballast_upstream_attempts_total")
    limit = t.gauge("ballast_concurrency_limit")
    limit.sample(lambda: 42.0)  # before the exporter exists
    rec = Recorder()
    t.attach(rec)
    attempts.inc("inference", "ok")
    attempts.inc("inference", "status", amount=2)
    t.histogram("ballast_commit_batch_size").observe(5)
    assert rec.calls == [("inc", "ballast_upstream_attempts_total", ("inference", "ok"), 1.0),
                         ("inc", "ballast_upstream_attempts_total", ("inference", "status"), 2.0),
                         ("observe", "ballast_commit_batch_size", (), 5)]
    assert rec.sampled[("ballast_concurrency_limit", ())]() == 42.0
    assert METRICS["ballast_upstream_attempts_total"].labels == ("upstream", "outcome")


def test_names_come_from_the_catalogue_and_types_must_match() -> None:
    t = Telemetry()
    with pytest.raises(KeyError, match="declare it there"):
        t.counter("ballast_made_up_total")
    with pytest.raises(TypeError, match="is a gauge"):
        t.counter("ballast_concurrency_limit")


def test_catalogue_is_prometheus_shaped() -> None:
    for name, spec in METRICS.items():
        assert spec.name == name and name.startswith("ballast_")
        assert name.endswith("_total") == (spec.type == "counter"), name
        assert bool(spec.buckets) == (spec.type == "histogram"), name
    assert Reason.BUDGET_EXHAUSTED == "budget_exhausted"
