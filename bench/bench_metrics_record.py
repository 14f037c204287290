"""The per-request cost of recording metrics, in one process, with ``timeit``.

What the core records for every request (``ballast_http_requests_total`` and
``ballast_http_request_duration_seconds``, through ``ballast.telemetry`` as
``framework/app.py`` does) is timed against three exporters, side by side in one
process and in alternating repeats: the ``metrics`` plugin's exporter as it is, the
exporter it replaced (a cached prometheus-client label child per call, its locked
``inc``/``observe``), and no exporter (the plugin disabled). Prints the best of the
repeats in µs per recorded request; writes nothing.

    python bench/bench_metrics_record.py [--number 200000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import prometheus_client

from ballast.plugins.metrics import PrometheusExporter
from ballast.telemetry import METRICS, MetricSpec, Telemetry

ROUTE = "/v1/sessions/{session_id}"


class ClientObjectsExporter:
    """The previous single-process exporter's per-call path: prometheus-client objects."""

    def __init__(self) -> None:
        registry = prometheus_client.CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        for name, spec in METRICS.items():
            kw: dict[str, Any] = {"labelnames": spec.labels, "registry": registry}
            if spec.type == "counter":
                self._metrics[name] = prometheus_client.Counter(name, spec.help, **kw)
            elif spec.type == "histogram":
                self._metrics[name] = prometheus_client.Histogram(name, spec.help, buckets=spec.buckets, **kw)
        self._children: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in METRICS}

    def _child(self, spec: MetricSpec, labels: tuple[str, ...]) -> Any:
        children = self._children[spec.name]
        child = children.get(labels)
        if child is None:
            metric = self._metrics[spec.name]
            child = children[labels] = metric.labels(*labels) if spec.labels else metric
        return child

    def inc(self, spec: MetricSpec, labels: tuple[str, ...], amount: float) -> None:
        self._child(spec, labels).inc(amount)

    def observe(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        self._child(spec, labels).observe(value)


def recorder(exporter: Any) -> Any:
    telemetry = Telemetry()
    if exporter is not None:
        telemetry.attach(exporter)
    requests = telemetry.counter("ballast_http_requests_total")
    duration = telemetry.histogram("ballast_http_request_duration_seconds")

    def record() -> None:  # as framework/app.py's _RequestMetrics.record
        requests.inc("GET", ROUTE, "200")
        duration.observe(0.0004, ROUTE)

    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=7, help="alternating repeats (the best is shown)")
    args = parser.parse_args()
    cases = {"prometheus-client objects (before)": recorder(ClientObjectsExporter()),
             "PrometheusExporter (now)": recorder(PrometheusExporter()),
             "no exporter (metrics disabled)": recorder(None)}
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeat):
        for name, record in cases.items():
            best[name] = min(best[name], timeit.timeit(record, number=args.number) / args.number)
    for name, seconds in best.items():
        print(f"{name:40} {seconds * 1e6:6.3f} µs per recorded request")


if __name__ == "__main__":
    main()
