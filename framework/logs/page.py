"""The summary as one self-contained HTML page (``summarize --html``): inline CSS, no external assets.

A page to attach to an incident ticket: it must open anywhere, offline, years later, so
it loads nothing from the network and every value taken from the log is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

from ballast.logs.charts import CHART_STYLE, protections_html, timeline_html
from ballast.logs.report import STATUS_CLASSES, HistogramBin, SummaryReport
from ballast.logs.text import _bin_label, _fmt_ms
from ballast.logs.times import format_span

_HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:1.2em 0 .3em;font-family:ui-monospace,monospace}
table{border-collapse:collapse;margin:.3em 0}
td,th{padding:2px 8px;text-align:right;vertical-align:middle}
td:first-child,th:first-child{text-align:left;font-family:ui-monospace,monospace}
th{border-bottom:1px solid #aaa}
.hist td.bar{width:30em;text-align:left}
.bar div{background:#4a7bd0;height:.9em;min-width:1px}
.meta{color:#666}
.warn{color:#a00;font-weight:bold}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_counter(title: str, table: Mapping[str, int], top: int = 50) -> str:
    if not table:
        return f"<h3>{_esc(title)}</h3><p class=meta>none</p>"
    items = list(table.items())
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{n:,}</td></tr>" for k, n in items[:top])
    if len(items) > top:
        rest = sum(n for _, n in items[top:])
        rows += f"<tr><td class=meta>... {len(items) - top:,} more</td><td>{rest:,}</td></tr>"
    return f"<h3>{_esc(title)} ({sum(table.values()):,})</h3><table>{rows}</table>"


def _html_histogram(bins: list[HistogramBin]) -> str:
    if not bins:
        return "<p class=meta>no durations</p>"
    peak = max(b["count"] for b in bins) or 1
    rows = []
    for item in bins:
        pct = 100.0 * item["count"] / peak
        rows.append(
            f"<tr><td>{_esc(_bin_label(item))}</td>"
            f'<td class=bar><div style="width:{pct:.2f}%"></div></td>'
            f"<td>{item['count']:,}</td></tr>"
        )
    return f"<table class=hist>{''.join(rows)}</table>"


def render_html(report: SummaryReport) -> str:
    """A self-contained HTML page (inline CSS bars, no external assets) of the summary."""
    lines = report["lines"]
    requests = report["requests"]
    window = report["window"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>Ballast log summary: {_esc(report['input']['source'])}</title>",
        f"<style>{_HTML_STYLE}{CHART_STYLE}</style></head><body>",
        f"<h1>Ballast log summary: {_esc(report['input']['source'])}</h1>",
        f"<p class=meta>{_esc(window['first'] or '-')} .. {_esc(window['last'] or '-')}"
        f" (span {_esc(format_span(window['span_s']))})</p>",
    ]
    if report["input"]["error"]:
        parts.append(f"<p class=warn>{_esc(report['input']['error'])}</p>")
    skipped = lines["skipped"]
    # When things happened comes first: it is the first question about an incident.
    parts.append(timeline_html(report["series"]))
    parts.append("<h2>Lines</h2><table>")
    for label, n in (
        ("total", lines["total"]),
        ("counted", lines["counted"]),
        ("filtered out", lines["filtered_out"]),
        ("skipped: not JSON", skipped["not_json"]),
        ("skipped: no event (or not an object)", skipped["no_event"]),
        ("skipped: too long", skipped["too_long"]),
    ):
        parts.append(f"<tr><td>{_esc(label)}</td><td>{n:,}</td></tr>")
    parts.append("</table>")
    parts.append(_html_counter("By event", lines["by_event"]))
    parts.append(_html_counter("By level", lines["by_level"]))

    parts.append(f"<h2>Requests ({requests['total']:,})</h2>")
    head = "".join(f"<th>{c}</th>" for c in STATUS_CLASSES)
    parts.append(
        f"<table><tr><th>route</th><th>count</th>{head}"
        "<th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th></tr>"
    )
    rows = [("all routes", requests["total"], requests)] + [
        (route, stats["count"], stats) for route, stats in requests["by_route"].items()
    ]
    for name, count, stats in rows:
        cells = "".join(f"<td>{stats['by_status_class'].get(c, 0):,}</td>" for c in STATUS_CLASSES)
        parts.append(
            f"<tr><td>{_esc(name)}</td><td>{count:,}</td>{cells}"
            f"<td>{_fmt_ms(stats['p50_ms'])}</td><td>{_fmt_ms(stats['p95_ms'])}</td>"
            f"<td>{_fmt_ms(stats['p99_ms'])}</td><td>{_fmt_ms(stats['max_ms'])}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h3>all routes</h3>")
    parts.append(_html_histogram(requests["histogram"]))
    for route, stats in requests["by_route"].items():
        parts.append(f"<h3>{_esc(route)} ({stats['count']:,})</h3>")
        parts.append(_html_histogram(stats["histogram"]))

    upstream = report["upstream"]
    parts.append("<h2>Upstream</h2>")
    parts.append(_html_counter("Retries by status or error type", upstream["retries"]))
    parts.append(_html_counter("Give-ups by kind", upstream["failed"]))
    finalize = report["finalize"]
    parts.append("<h2>Finalize</h2>")
    parts.append(_html_counter("Jobs by outcome", finalize["by_outcome"]))
    parts.append(_html_counter("Timeouts by stage", finalize["timed_out_stage"]))
    parts.append(_html_counter("Failures by stage", finalize["failed_stage"]))
    parts.append("<h2>Errors</h2>")
    parts.append(_html_counter("Mutation failures by session", report["mutation_failures"]))
    parts.append(_html_counter("Error types", report["errors"]))
    parts.append(
        f"<h3>Bulkhead</h3><table><tr><td>rejected</td>"
        f"<td>{report['bulkhead']['rejected']:,}</td></tr></table>"
    )
    parts.append(protections_html(report["protections"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)
