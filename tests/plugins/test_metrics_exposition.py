"""metrics: the single-process exporter shows exactly what prometheus-client would.

The exporter records into plain Python cells and builds the metric families at scrape
time; these tests record one script both through it and through prometheus-client's
own Counter/Gauge/Histogram objects declared from the same catalogue, and compare the
two expositions byte for byte (names, types, help, labels, bucket bounds, values).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
import pytest
from metrics_support import Scrape

from ballast.plugins.metrics import PrometheusExporter
from ballast.telemetry import METRICS, Reason, Telemetry

ROUTE = "/v1/sessions/{session_id}"


class Reference:
    """The same catalogue declared with prometheus-client objects, recorded directly."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        for name, spec in METRICS.items():
            kw: dict[str, Any] = {"labelnames": spec.labels, "registry": self.registry}
            if spec.type == "counter":
                self.metrics[name] = prometheus_client.Counter(name, spec.help, **kw)
            elif spec.type == "histogram":
                self.metrics[name] = prometheus_client.Histogram(name, spec.help, buckets=spec.buckets, **kw)
            else:
                self.metrics[name] = prometheus_client.Gauge(name, spec.help, **kw)

    def _of(self, name: str, labels: tuple[str, ...]) -> Any:
        metric = self.metrics[name]
        return metric.labels(*labels) if labels else metric

    def inc(self, name: str, *labels: str, amount: float = 1.0) -> None:
        self._of(name, labels).inc(amount)

    def observe(self, name: str, value: float, *labels: str) -> None:
        self._of(name, labels).observe(value)

    def set(self, name: str, value: float, *labels: str) -> None:
        self._of(name, labels).set(value)

    def sample(self, name: str, read: Callable[[], float], *labels: str) -> None:
        self._of(name, labels).set_function(read)

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class Ours:
    """The same calls through ballast.telemetry and the exporter."""

    def __init__(self) -> None:
        self.telemetry = Telemetry()
        self.exporter = PrometheusExporter()
        self.telemetry.attach(self.exporter)

    def inc(self, name: str, *labels: str, amount: float = 1.0) -> None:
        self.telemetry.counter(name).inc(*labels, amount=amount)

    def observe(self, name: str, value: float, *labels: str) -> None:
        self.telemetry.histogram(name).observe(value, *labels)

    def set(self, name: str, value: float, *labels: str) -> None:
        self.telemetry.gauge(name).set(value, *labels)

    def sample(self, name: str, read: Callable[[], float], *labels: str) -> None:
        self.telemetry.gauge(name).sample(read, *labels)

    def text(self) -> bytes:
        return self.exporter.scrape()


def _script(sink: Any, level: dict[str, float]) -> None:
    # Latencies on, between and beyond the bucket bounds, zero, and past the last bound.
    for i, seconds in enumerate([0.0004, 0.001, 0.0025, 0.003, 1e-9, 0.0, 60.0, 61.0, 0.5, 1e6, 0.025]):
        sink.inc("ballast_http_requests_total", "GET", ROUTE, "404" if i % 3 == 0 else "200")
        sink.observe("ballast_http_request_duration_seconds", seconds, ROUTE)
    sink.inc("ballast_http_requests_total", "POST", "/x", "500", amount=2.5)
    sink.observe("ballast_http_request_duration_seconds", 0.2, "(unmatched)")
    # A Reason member and its string are one series.
    sink.inc("ballast_upstream_retries_denied_total", "inference", Reason.BUDGET)
    sink.inc("ballast_upstream_retries_denied_total", "inference", "budget")
    sink.inc("ballast_upstream_retries_denied_total", "inference", Reason.COOLDOWN)
    sink.set("ballast_circuit_state", 2, "inference")
    sink.set("ballast_circuit_state", 1, "inference")
    sink.set("ballast_circuit_state", 0, "other")
    sink.set("ballast_concurrency_limit", 33.5)
    sink.sample("ballast_executor_in_use", lambda: level["busy"])
    sink.inc("ballast_mutations_committed_total", amount=3)
    for size in (3, 5000, 5001):
        sink.observe("ballast_commit_batch_size", size)
    sink.observe("ballast_finalize_stage_duration_seconds", 0.123456789, "persist")


def test_nothing_recorded_shows_the_same_as_prometheus_client() -> None:
    assert Ours().text() == Reference().text()


def test_a_recorded_script_shows_the_same_bytes_as_prometheus_client() -> None:
    level = {"busy": 2.0}
    reference, ours = Reference(), Ours()
    _script(reference, level)
    _script(ours, level)
    level["busy"] = 4.0  # sampled gauges are read at scrape time
    text = ours.text()
    assert text == reference.text()
    got = Scrape(text.decode())
    assert got.total("ballast_executor_in_use") == 4
    assert got.total("ballast_http_request_duration_seconds_count", route=ROUTE) == 11
    assert "_created" not in text.decode()


def test_recording_from_several_threads_loses_nothing() -> None:
    ours = Ours()
    counter = ours.telemetry.counter("ballast_http_requests_total")
    histogram = ours.telemetry.histogram("ballast_http_request_duration_seconds")

    def work() -> None:
        for _ in range(20_000):
            counter.inc("GET", ROUTE, "200")
            histogram.observe(0.003, ROUTE)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = Scrape(ours.text().decode())
    assert got.total("ballast_http_requests_total") == 80_000
    assert got.total("ballast_http_request_duration_seconds_bucket", le="0.005") == 80_000
    assert got.total("ballast_http_request_duration_seconds_count") == 80_000


def test_bad_calls_are_refused_as_prometheus_client_refuses_them() -> None:
    ours = Ours()
    with pytest.raises(ValueError):
        ours.inc("ballast_upstream_retries_total", "inference", amount=-1)
    with pytest.raises(ValueError):
        ours.inc("ballast_upstream_retries_total", "inference")  # one label value short
    assert Scrape(ours.text().decode()).total("ballast_upstream_retries_total") == 0


def test_a_sampled_gauge_may_record_while_it_is_read() -> None:
    ours = Ours()
    rejected = ours.telemetry.counter("ballast_executor_rejected_total")

    def read() -> float:
        rejected.inc()  # recording from inside a scrape must not wait on the scrape
        return 1.0

    ours.sample("ballast_executor_queued", read)
    texts: list[bytes] = []
    scraper = threading.Thread(target=lambda: texts.append(ours.text()), daemon=True)
    scraper.start()
    scraper.join(30)
    assert not scraper.is_alive(), "the scrape waited on itself"
    assert Scrape(texts[0].decode()).total("ballast_executor_queued") == 1
    # The next scrape shows the first read's count (values are copied before gauges are read).
    assert Scrape(ours.text().decode()).total("ballast_executor_rejected_total") == 1
