"""The plain-text summary ``ballast logs summarize`` prints: compact tables and bar histograms."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ballast.logs.charts import protections_lines, timeline_lines
from ballast.logs.report import STATUS_CLASSES, HistogramBin, SummaryReport
from ballast.logs.times import format_span


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _fmt_edge(ms: float) -> str:
    if math.isinf(ms):
        return "inf"
    if ms >= 1000:
        return f"{ms / 1000:g}s"
    return f"{ms:g}ms"


def _bin_label(item: HistogramBin) -> str:
    if item["lower_ms"] == 0:
        return f"< {_fmt_edge(item['upper_ms'])}"
    if math.isinf(item["upper_ms"]):
        return f">= {_fmt_edge(item['lower_ms'])}"
    return f"{_fmt_edge(item['lower_ms'])} - {_fmt_edge(item['upper_ms'])}"


def _counter_lines(title: str, table: Mapping[str, int], top: int) -> list[str]:
    if not table:
        return [f"{title}: none"]
    out = [f"{title}: {sum(table.values()):,}"]
    items = list(table.items())
    width = min(60, max(len(k) for k, _ in items[:top]))
    for key, n in items[:top]:
        out.append(f"  {key:<{width}}  {n:>10,}")
    if len(items) > top:
        rest = sum(n for _, n in items[top:])
        out.append(f"  ... {len(items) - top:,} more ({rest:,})")
    return out


def format_histogram(bins: list[HistogramBin], width: int = 40) -> list[str]:
    """Rows ``label | #### count`` with bars scaled to the fullest bin."""
    if not bins:
        return ["  (no durations)"]
    peak = max(b["count"] for b in bins)
    labels = [_bin_label(b) for b in bins]
    label_width = max(len(label) for label in labels)
    rows = []
    for label, item in zip(labels, bins, strict=True):
        n = item["count"]
        bar = "#" * (max(1, round(width * n / peak)) if n else 0)
        rows.append(f"  {label:>{label_width}} | {bar:<{width}} {n:,}")
    return rows


def format_summary_text(report: SummaryReport, *, top: int = 10) -> str:
    """The compact human-readable report printed by ``ballast logs summarize``."""
    lines = report["lines"]
    skipped = lines["skipped"]
    skipped_total = sum((skipped["not_json"], skipped["no_event"], skipped["too_long"]))
    out: list[str] = []
    source = report["input"]["source"]
    out.append(f"Log: {source}{' (gzip)' if report['input']['gzip'] else ''}")
    if report["input"]["error"]:
        out.append(f"WARNING: {report['input']['error']}")
    flt = report["filter"]
    if flt["since"] or flt["until"]:
        out.append(f"Filter: since {flt['since'] or '-'} until {flt['until'] or '-'}")
    window = report["window"]
    out.append(
        f"Window: {window['first'] or '-'} .. {window['last'] or '-'} (span {format_span(window['span_s'])})"
    )
    out.append(
        f"Lines: {lines['total']:,} total, {lines['counted']:,} counted, "
        f"{skipped_total:,} skipped (not JSON {skipped['not_json']:,}, "
        f"no event {skipped['no_event']:,}, "
        f"too long {skipped['too_long']:,}), {lines['filtered_out']:,} filtered out"
    )
    levels = "  ".join(f"{k} {n:,}" for k, n in lines["by_level"].items())
    out.append(f"By level: {levels or 'none'}")
    out += _counter_lines("By event", lines["by_event"], max(top, 20))
    out.append("")

    requests = report["requests"]
    out.append(
        f"Requests: {requests['total']:,}  p50 {_fmt_ms(requests['p50_ms'])} ms  "
        f"p95 {_fmt_ms(requests['p95_ms'])} ms  p99 {_fmt_ms(requests['p99_ms'])} ms  "
        f"max {_fmt_ms(requests['max_ms'])} ms"
    )
    if requests["by_route"]:
        classes = [c for c in STATUS_CLASSES if c not in ("1xx", "other")]
        for extra in ("1xx", "other"):
            if requests["by_status_class"].get(extra):
                classes.append(extra)
        routes = list(requests["by_route"].items())
        width = min(60, max(5, *(len(r) for r, _ in routes[: max(top, 30)])))
        header = f"  {'route':<{width}} {'count':>9}" + "".join(f" {c:>7}" for c in classes)
        out.append(header + f" {'p50':>8} {'p95':>8} {'p99':>8}  (ms)")
        for route, stats in routes[: max(top, 30)]:
            cells = "".join(f" {stats['by_status_class'].get(c, 0):>7,}" for c in classes)
            out.append(
                f"  {route:<{width}} {stats['count']:>9,}{cells}"
                f" {_fmt_ms(stats['p50_ms']):>8} {_fmt_ms(stats['p95_ms']):>8}"
                f" {_fmt_ms(stats['p99_ms']):>8}"
            )
        if len(routes) > max(top, 30):
            out.append(f"  ... {len(routes) - max(top, 30):,} more routes")
        out.append("Request latency (all routes):")
        out += format_histogram(requests["histogram"])
    out.append("")

    upstream = report["upstream"]
    out += _counter_lines("Upstream retries", upstream["retries"], top)
    out += _counter_lines("Upstream give-ups by kind", upstream["failed"], top)
    out.append("")
    finalize = report["finalize"]
    out += _counter_lines("Finalize jobs by outcome", finalize["by_outcome"], top)
    out += _counter_lines("Finalize timeouts by stage", finalize["timed_out_stage"], top)
    if finalize["failed_stage"]:
        out += _counter_lines("Finalize failures by stage", finalize["failed_stage"], top)
    out.append("")
    out += _counter_lines("Mutation failures by session", report["mutation_failures"], top)
    out += _counter_lines("Top error types", report["errors"], top)
    out.append(f"Bulkhead rejections: {report['bulkhead']['rejected']:,}")
    out.append("")
    out += protections_lines(report["protections"])
    out.append("")
    out += timeline_lines(report["series"])
    return "\n".join(out) + "\n"
