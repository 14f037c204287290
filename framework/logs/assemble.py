"""Turning an aggregator's counters into the summary document (``summarize --json``).

Separate from the hot loop in :mod:`ballast.logs.aggregate`: this runs once per
summary, so it favours clarity (sorting, rounding, merging the per-route sketches into
the overall one) over speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ballast.logs.report import (
    RouteReport,
    SkippedReport,
    StageReport,
    SummaryReport,
    UpstreamNameReport,
    _by_count,
    _status_classes,
)
from ballast.logs.sketch import LatencySketch, _round
from ballast.logs.times import FAR_FUTURE, FAR_PAST, format_time

if TYPE_CHECKING:
    from ballast.logs.aggregate import LogSummary



def assemble_report(summary: LogSummary) -> SummaryReport:
    """The summary document from an aggregator's counters (sorted, rounded, percentiles)."""
    by_event: dict[str, int] = {}
    by_level: dict[str, int] = {}
    for slot in summary._event_slots.values():
        if slot.count:
            by_event[slot.event] = by_event.get(slot.event, 0) + slot.count
            by_level[slot.level] = by_level.get(slot.level, 0) + slot.count
    counts: dict[str, int] = {}
    methods: dict[str, dict[str, int]] = {}
    classes: dict[str, dict[str, int]] = {}
    overall_classes: dict[str, int] = {}
    for request in summary._request_slots.values():
        route = request.route
        counts[route] = counts.get(route, 0) + request.count
        by_method = methods.setdefault(route, {})
        by_method[request.method] = by_method.get(request.method, 0) + request.count
        by_class = classes.setdefault(route, {})
        cls = request.status_class
        by_class[cls] = by_class.get(cls, 0) + request.count
        overall_classes[cls] = overall_classes.get(cls, 0) + request.count
    overall = LatencySketch()
    by_route: dict[str, RouteReport] = {}
    for route, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        sketch = summary.routes[route]
        overall.merge(sketch)
        p50, p95, p99 = sketch.quantiles((0.5, 0.95, 0.99))
        by_route[route] = {
            "count": count,
            "by_method": _by_count(methods[route]),
            "by_status_class": _status_classes(classes[route]),
            "p50_ms": _round(p50),
            "p95_ms": _round(p95),
            "p99_ms": _round(p99),
            "max_ms": _round(sketch.maximum()),
            "histogram": sketch.histogram(),
        }
    p50, p95, p99 = overall.quantiles((0.5, 0.95, 0.99))
    stages: dict[str, StageReport] = {}
    for stage, timed in sorted(summary.stages.items(), key=lambda kv: (-kv[1].count, kv[0])):
        s50, s95, s99 = timed.sketch.quantiles((0.5, 0.95, 0.99))
        stages[stage] = {
            "count": timed.count,
            "p50_ms": _round(s50),
            "p95_ms": _round(s95),
            "p99_ms": _round(s99),
            "max_ms": _round(timed.sketch.maximum()),
        }
    names = sorted(set(summary.upstream_retries) | set(summary.upstream_failed))
    by_name: dict[str, UpstreamNameReport] = {
        name: {
            "retries": summary.upstream_retries.get(name, 0),
            "failed": summary.upstream_failed.get(name, 0),
        }
        for name in names
    }
    first = None if summary.first is FAR_FUTURE else summary.first
    last = None if summary.last is FAR_PAST else summary.last
    span = (last - first).total_seconds() if first is not None and last is not None else None
    counted = sum(by_event.values())
    skipped: SkippedReport = {
        "not_json": summary.not_json,
        "no_event": summary.no_event,
        "too_long": summary.lines.too_long,
    }
    return {
        "input": {"source": summary.source, "gzip": summary.gzip, "error": summary.input_error},
        "filter": {"since": format_time(summary.since), "until": format_time(summary.until)},
        "lines": {
            "total": summary.read - summary.blank + summary.lines.too_long,
            "counted": counted,
            "filtered_out": summary.filtered_out,
            "skipped": skipped,
            "by_event": _by_count(by_event),
            "by_level": _by_count(by_level),
        },
        "window": {
            "first": format_time(first),
            "last": format_time(last),
            "span_s": None if span is None else round(span, 6),
        },
        "requests": {
            "total": sum(counts.values()),
            "by_status_class": _status_classes(overall_classes),
            "p50_ms": _round(p50),
            "p95_ms": _round(p95),
            "p99_ms": _round(p99),
            "max_ms": _round(overall.maximum()),
            "histogram": overall.histogram(),
            "by_route": by_route,
        },
        "upstream": {
            "retries": _by_count(summary.retries),
            "retries_total": sum(summary.retries.values()),
            "failed": _by_count(summary.failed),
            "failed_total": sum(summary.failed.values()),
            "by_name": by_name,
        },
        "finalize": {
            "by_outcome": _by_count(summary.outcomes),
            "timed_out_stage": _by_count(summary.timed_out_stage),
            "failed_stage": _by_count(summary.failed_stage),
            "stages": stages,
        },
        "mutation_failures": _by_count(summary.mutation_failures),
        "errors": _by_count(summary.errors),
        "bulkhead": {"rejected": summary.bulkhead_rejected},
        "protections": summary.protections.report(),
        "series": summary.timeline.report(),
    }
