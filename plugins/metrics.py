"""metrics: what every plugin records, as Prometheus text at ``GET /metrics``.

Plugins and the core record through :mod:`ballast.telemetry` (one catalogue, one
recording API); this plugin is the exporter behind it. It declares every metric of the
catalogue (:data:`ballast.telemetry.METRICS`) with the official ``prometheus-client``
in a registry of the app's own, attaches itself to ``app[TELEMETRY]`` and serves the
registry in the text format (``text/plain; version=0.0.4``).

Why an exporter object rather than prometheus-client calls all over the code: the
catalogue stays the one list of names (docs, dashboard and alert rules are checked
against it), and disabling the plugin makes recording free.

**One process** (the default). Every request records a counter and a histogram, so
recording is kept to plain Python: a value per label tuple in a dict (a histogram's
cell holds its per-bucket counts and sum; the bucket is found with ``bisect``), under
one lock for all metrics. prometheus-client's objects take a lock per value and
search the buckets in Python, several times the cost. A scrape turns the cells into
the same metric families prometheus-client would export (:class:`LocalCollector`:
names, types, help, labels, buckets; no ``_created`` series), and prometheus-client
writes the text.

**Several worker processes.** With ``PROMETHEUS_MULTIPROC_DIR`` set (``ballast serve
--workers N`` sets it and empties the directory on start), values live in memory-mapped
files there, one set per process, and a scrape of any process merges all of them
(prometheus-client's multiprocess mode). Counters and histograms add up. A gauge says
how its values combine (:data:`GAUGE_MODES`): quantities such as busy threads are
summed over live processes, states such as a circuit are the worst (highest) one.
Gauges whose value lives elsewhere (the executor's busy threads) are read at scrape time
in one process; in multiprocess mode each process copies them into its file every
``sample_interval_s`` and just before it answers a scrape.

Disabled: nothing is exported and ``/metrics`` does not exist; recording costs one
attribute read per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from pydantic import Field

from ballast.config import Config, PluginSection
from ballast.hookspecs import hookimpl
from ballast.keys import TELEMETRY
from ballast.telemetry import METRICS, MetricSpec

#: The exposition format the contract names (prometheus-client's 0.0.4 text format).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: The environment variable that switches prometheus-client to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: How a gauge's per-process values combine in multiprocess mode; others: "livesum".
GAUGE_MODES: dict[str, str] = {
    "ballast_circuit_state": "livemax",  # the worst state any live process sees
}

# ``*_created`` series double the output and nothing here graphs them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


#: Where the metrics are served: fixed, because admission control never sheds it and
#: the auth plugin guards it by this path.
PATH = "/metrics"


class Settings(PluginSection):
    sample_interval_s: float = Field(
        default=1.0, gt=0, le=60,
        description="multiprocess mode: how often sampled gauges are copied to the shared files")


def multiprocess_dir() -> str | None:
    """The multiprocess directory in force, or None in single-process mode."""
    path = os.environ.get(MULTIPROC_ENV)
    return path or None


#: A family's series at one moment: label values, a copy of the cell, its reader if sampled.
_Snapshot = list[tuple[tuple[str, ...], list[float], Callable[[], float] | None]]


class _Family:
    """One metric's values in single-process mode: a cell (a list of floats) per label
    tuple. A counter's or gauge's cell is ``[value]``; a histogram's is one count per
    bucket (``+Inf`` last, not cumulative) and then the sum."""

    __slots__ = ("bounds", "by_labels", "cells", "les", "reads", "spec")

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        #: Histogram upper bounds with ``+Inf`` appended, as prometheus-client keeps them.
        self.bounds: tuple[float, ...] = (*(float(b) for b in spec.buckets), float("inf")) \
            if spec.type == "histogram" else ()
        #: The bounds as ``le`` label values.
        self.les: tuple[str, ...] = tuple(floatToGoString(b) for b in self.bounds)  # type: ignore[no-untyped-call]
        #: The label values as recorded -> cell; values equal as strings share a cell
        #: (a ``Reason`` member and its string have different hashes).
        self.by_labels: dict[tuple[str, ...], list[float]] = {}
        #: The label values as exported (plain strings) -> cell, in first-recorded order.
        self.cells: dict[tuple[str, ...], list[float]] = {}
        #: Gauges read at scrape time, by exported label values.
        self.reads: dict[tuple[str, ...], Callable[[], float]] = {}
        if not spec.labels:  # an unlabelled metric is exported as zero before any call
            self.cell(())

    def cell(self, labels: tuple[str, ...]) -> list[float]:
        """The cell of ``labels``, made on first use (the slow path: checks the labels)."""
        cell = self.by_labels.get(labels)
        if cell is None:
            key = self.key(labels)
            cell = self.cells.get(key)
            if cell is None:
                cell = [0.0] * (len(self.bounds) + 1 if self.bounds else 1)
                self.cells[key] = cell
            self.by_labels[labels] = cell
        return cell

    def key(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) != len(self.spec.labels):
            raise ValueError(f"{self.spec.name} takes labels {self.spec.labels}, got {len(labels)} values")
        return tuple(str(v) for v in labels)

    def snapshot(self) -> _Snapshot:
        """Copies of the cells (taken under the exporter's lock)."""
        return [(key, cell.copy(), self.reads.get(key)) for key, cell in self.cells.items()]

    def metric(self, snapshot: _Snapshot) -> Metric:
        """This family as prometheus-client's own metric object would collect it."""
        spec = self.spec
        name = _family_name(spec)
        metric = Metric(name, spec.help, spec.type)
        labelnames = spec.labels
        for key, cell, read in snapshot:
            labels = dict(zip(labelnames, key, strict=True))
            if read is not None:
                metric.add_sample(name, labels, float(read()))
            elif spec.type == "counter":
                metric.add_sample(name + "_total", labels, cell[0])
            elif spec.type == "gauge":
                metric.add_sample(name, labels, cell[0])
            else:
                acc = 0.0
                for le, count in zip(self.les, cell, strict=False):
                    acc += count
                    metric.add_sample(name + "_bucket", {**labels, "le": le}, acc)
                metric.add_sample(name + "_count", labels, acc)
                if self.bounds[0] >= 0:
                    metric.add_sample(name + "_sum", labels, cell[-1])
        return metric


class LocalCollector(Collector):
    """Exports the single-process cells, every catalogue metric in catalogue order."""

    def __init__(self, families: dict[str, _Family], lock: threading.Lock) -> None:
        self._families = families
        self._lock = lock

    def collect(self) -> Iterator[Metric]:
        # Copied under the lock, so a histogram's buckets, count and sum agree; sampled
        # gauges are read after it is released (a reader may record metrics itself).
        with self._lock:
            snapshots = [(family, family.snapshot()) for family in self._families.values()]
        for family, snapshot in snapshots:
            yield family.metric(snapshot)

    def describe(self) -> Iterator[Metric]:
        for family in self._families.values():
            yield Metric(_family_name(family.spec), family.spec.help, family.spec.type)


def _family_name(spec: MetricSpec) -> str:
    """prometheus-client names a counter's family without ``_total`` (its sample has it)."""
    if spec.type == "counter" and spec.name.endswith("_total"):
        return spec.name[:-len("_total")]
    return spec.name


class PrometheusExporter:
    """A :class:`ballast.telemetry.Exporter` over prometheus-client, one per app."""

    def __init__(self, *, multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir
        if multiproc_dir is not None:
            # prometheus-client's values find their files through the environment.
            named = os.environ.setdefault(MULTIPROC_ENV, multiproc_dir)
            if named != multiproc_dir:
                raise ValueError(f"{MULTIPROC_ENV} names {named}, not {multiproc_dir}")
            os.makedirs(multiproc_dir, exist_ok=True)
        if multiproc_dir is not None and not getattr(prometheus_values.ValueClass, "_multiprocess", False):
            # prometheus-client picks its value class when first imported; the directory
            # may have been set after that (``ballast serve`` sets it before the workers
            # build their apps), so pick again.
            prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
        #: What a scrape reads in single-process mode.
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        #: Single-process mode: the values, by metric name; None in multiprocess mode.
        self._families: dict[str, _Family] | None = None
        self._metrics: dict[str, Any] = {}
        self._children: dict[str, dict[tuple[str, ...], Any]] = {name: {} for name in METRICS}
        self._samplers: list[tuple[Any, Callable[[], float]]] = []
        if multiproc_dir is None:
            self._families = {name: _Family(spec) for name, spec in METRICS.items()}
            self.registry.register(LocalCollector(self._families, self._lock))
        else:
            self._metrics = {name: self._declare(spec) for name, spec in METRICS.items()}

    def _declare(self, spec: MetricSpec) -> Any:
        # Multiprocess mode: the declared metrics are not registered anywhere: a scrape
        # reads the files of every process instead (see scrape()).
        kw: dict[str, Any] = {"labelnames": spec.labels, "registry": None}
        if spec.type == "counter":
            return prometheus_client.Counter(spec.name, spec.help, **kw)
        if spec.type == "histogram":
            return prometheus_client.Histogram(spec.name, spec.help, buckets=spec.buckets, **kw)
        return prometheus_client.Gauge(spec.name, spec.help,
                                       multiprocess_mode=GAUGE_MODES.get(spec.name, "livesum"),  # type: ignore[arg-type]
                                       **kw)

    def _child(self, spec: MetricSpec, labels: tuple[str, ...]) -> Any:
        children = self._children[spec.name]
        child = children.get(labels)
        if child is None:
            metric = self._metrics[spec.name]
            child = metric.labels(*labels) if spec.labels else metric
            children[labels] = child
        return child

    # -- the Exporter protocol: the per-call path --------------------------------------

    def bind(self, spec: MetricSpec, labels: tuple[str, ...]) -> Callable[[float], None]:
        """A recorder for one label set: ``inc`` of a counter, ``observe`` of a histogram."""
        if spec.type not in ("counter", "histogram"):
            raise TypeError(f"{spec.name} is a {spec.type}: only counters and histograms bind")
        families = self._families
        if families is None:
            child = self._child(spec, labels)
            recorder: Callable[[float], None] = child.inc if spec.type == "counter" else child.observe
            return recorder
        family = families[spec.name]
        with self._lock:
            cell = family.cell(labels)
        lock = self._lock
        if spec.type == "counter":
            def inc(amount: float) -> None:
                if amount < 0:
                    raise ValueError("Counters can only be incremented by non-negative amounts.")
                with lock:
                    cell[0] += amount

            return inc
        bounds = family.bounds

        def observe(value: float) -> None:
            with lock:
                if value == value:  # NaN falls in no bucket (but spoils the sum)
                    cell[bisect_left(bounds, value)] += 1
                cell[-1] += value

        return observe

    def inc(self, spec: MetricSpec, labels: tuple[str, ...], amount: float) -> None:
        families = self._families
        if families is None:
            self._child(spec, labels).inc(amount)
            return
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        family = families[spec.name]
        with self._lock:
            cell = family.by_labels.get(labels) or family.cell(labels)
            cell[0] += amount

    def observe(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        families = self._families
        if families is None:
            self._child(spec, labels).observe(value)
            return
        family = families[spec.name]
        with self._lock:
            cell = family.by_labels.get(labels) or family.cell(labels)
            if value == value:  # NaN falls in no bucket (but spoils the sum), as in prometheus-client
                cell[bisect_left(family.bounds, value)] += 1
            cell[-1] += value

    def set(self, spec: MetricSpec, labels: tuple[str, ...], value: float) -> None:
        families = self._families
        if families is None:
            self._child(spec, labels).set(value)
            return
        family = families[spec.name]
        with self._lock:
            cell = family.by_labels.get(labels) or family.cell(labels)
            cell[0] = float(value)

    def sample(self, spec: MetricSpec, labels: tuple[str, ...], read: Callable[[], float]) -> None:
        families = self._families
        if families is None:
            child = self._child(spec, labels)
            self._samplers.append((child, read))
            child.set(read())
            return
        family = families[spec.name]
        with self._lock:
            family.cell(labels)
            family.reads[family.key(labels)] = read

    # -- scraping -----------------------------------------------------------------------

    def refresh_samples(self) -> None:
        """Multiprocess mode: copy sampled gauges into this process's file."""
        for child, read in self._samplers:
            child.set(read())

    def scrape(self) -> bytes:
        """The text format of every metric (of every process, in multiprocess mode)."""
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        self.refresh_samples()
        merged = prometheus_client.CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def metrics_handler(exporter: PrometheusExporter) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        # Merging files of many processes reads the disk: keep it off the event loop then.
        if exporter.multiproc_dir is None:
            body = exporter.scrape()
        else:
            body = await asyncio.to_thread(exporter.scrape)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return handle


@hookimpl
def ballast_settings_model() -> type[PluginSection]:
    return Settings


@hookimpl
def ballast_app_built(app: web.Application,
                      config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    s: Settings = config.plugin("metrics")
    exporter = PrometheusExporter(multiproc_dir=multiprocess_dir())
    app[TELEMETRY].attach(exporter)
    app[EXPORTER] = exporter
    app.router.add_get(PATH, metrics_handler(exporter), allow_head=False)

    async def sampler(app: web.Application) -> AsyncIterator[None]:
        task = None
        if exporter.multiproc_dir is not None:
            task = asyncio.create_task(_refresh_forever(exporter, s.sample_interval_s),
                                       name="metrics:samples")
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return sampler


async def _refresh_forever(exporter: PrometheusExporter, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        exporter.refresh_samples()


#: The app's exporter (tests and tools read the registry through it).
EXPORTER = web.AppKey("ballast_metrics_exporter", PrometheusExporter)
