"""Rendering the timeline and the protections: text sparklines and inline SVG bar charts.

The text form gives one line per series that has any count: its total, a sparkline over
the buckets (ASCII, so it survives any terminal and any pager), and when it peaked and
first appeared. The HTML form draws one SVG bar chart per series, inline in the page:
no script, no stylesheet or font to fetch, so the page renders the same offline.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

from ballast.logs.protections import ProtectionsReport
from ballast.logs.timeline import SeriesReport

_RAMP = " .:-=+*#@"
_CHART_W, _CHART_H = 720, 90


def _clock(stamp: str) -> str:
    """``2026-11-28T14:03:00.000000Z`` -> ``2026-11-28 14:03:00`` (the bucket start)."""
    return stamp[:19].replace("T", " ")


def sparkline(counts: list[int]) -> str:
    peak = max(counts, default=0)
    if peak == 0:
        return " " * len(counts)
    top = len(_RAMP) - 1
    return "".join(_RAMP[0 if n == 0 else max(1, round(top * n / peak))] for n in counts)


def timeline_lines(series: SeriesReport) -> list[str]:
    """The "Over time" block of the text summary."""
    times = series["times"]
    if not times:
        return ["Over time: no timestamped lines"]
    out = [
        f"Over time: {len(times):,} x {series['interval_s']}s buckets from {_clock(times[0])}"
        f" to {_clock(times[-1])} (UTC; | marks each bucket's count, scaled to the series' peak)"
    ]
    shown = [(name, counts) for name, counts in series["counts"].items() if any(counts)]
    width = max((len(name) for name, _ in shown), default=0)
    for name, counts in shown:
        peak = max(counts)
        first = next(i for i, n in enumerate(counts) if n)
        out.append(
            f"  {name:<{width}} {series['totals'][name]:>10,} |{sparkline(counts)}| "
            f"first {_clock(times[first])[11:]}, peak {peak:,} at {_clock(times[counts.index(peak)])[11:]}"
        )
    return out


def _counts(table: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in table.items()) or "none"


def protections_lines(report: ProtectionsReport) -> list[str]:
    """The "Protections" block: breaker, retry budget, fallback, shedding, auth."""
    circuit = report["circuit"]
    shed = report["load_shed"]
    return [
        f"Circuit breaker: opened {circuit['opened']:,}, half-open {circuit['half_open']:,}, "
        f"closed {circuit['closed']:,}; opened by upstream: {_counts(circuit['opened_by_upstream'])}",
        f"Retries denied by kind: {_counts(report['retry_denied'])}",
        f"Fallbacks by operation: {_counts(report['fallback'])}",
        f"Load shed: {shed['requests']:,} requests ({shed['lines']:,} sampled lines); "
        f"by route: {_counts(shed['by_route'])}",
        f"Auth denials by reason: {_counts(report['auth_denied'])}",
    ]


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def svg_chart(name: str, times: list[str], counts: list[int], interval_s: int | None) -> str:
    """One bar chart: a bar per bucket, height scaled to the peak, a tooltip per bar."""
    peak = max(counts, default=0) or 1
    slot = _CHART_W / max(1, len(counts))
    bar_w = max(1.0, slot * 0.8)
    bars = []
    for i, (stamp, n) in enumerate(zip(times, counts, strict=True)):
        if not n:
            continue
        h = max(1.0, _CHART_H * n / peak)
        bars.append(
            f'<rect x="{i * slot:.2f}" y="{_CHART_H - h:.2f}" width="{bar_w:.2f}" height="{h:.2f}">'
            f"<title>{_esc(_clock(stamp))}: {n:,}</title></rect>"
        )
    total = sum(counts)
    return (
        f'<figure class=chart data-series="{_esc(name)}">'
        f"<figcaption>{_esc(name)}: {total:,} "
        f"(peak {max(counts, default=0):,} per {interval_s}s)</figcaption>"
        f'<svg role=img aria-label="{_esc(name)} per {interval_s}s" viewBox="0 0 {_CHART_W} {_CHART_H}" '
        f'width="{_CHART_W}" height="{_CHART_H}" preserveAspectRatio="none">'
        f'<line x1="0" y1="{_CHART_H}" x2="{_CHART_W}" y2="{_CHART_H}" class=axis></line>'
        f"{''.join(bars)}</svg>"
        f"<div class=meta>{_esc(_clock(times[0]) if times else '-')} .. "
        f"{_esc(_clock(times[-1]) if times else '-')} UTC</div></figure>"
    )


CHART_STYLE = (
    ".chart{margin:.8em 0}.chart svg{display:block;background:#f6f8fb;border:1px solid #dde}"
    ".chart rect{fill:#4a7bd0}"
    # Failures and refusals in red, so the eye finds them first.
    ".chart[data-series=\"5xx\"] rect,.chart[data-series=\"circuit.opened\"] rect,"
    ".chart[data-series=\"upstream.failed\"] rect,.chart[data-series=\"upstream.retry_denied\"] rect,"
    ".chart[data-series=\"load.shed\"] rect,.chart[data-series=\"auth.denied\"] rect,"
    ".chart[data-series=\"finalize.failed\"] rect,.chart[data-series=\"finalize.timed_out\"] rect"
    "{fill:#c0392b}"
    ".chart .axis{stroke:#999}.chart figcaption{font-family:ui-monospace,monospace}"
)


def timeline_html(series: SeriesReport) -> str:
    """The "Over time" section of the HTML page: one chart per series with any count."""
    times = series["times"]
    shown = [(name, counts) for name, counts in series["counts"].items() if any(counts)]
    if not shown:
        return "<h2>Over time</h2><p class=meta>no timestamped lines</p>"
    charts = "".join(svg_chart(name, times, counts, series["interval_s"]) for name, counts in shown)
    return (
        f"<h2>Over time</h2><p class=meta>{len(times):,} buckets of {series['interval_s']}s</p>{charts}"
    )


def protections_html(report: ProtectionsReport) -> str:
    rows = []
    for line in protections_lines(report):
        title, detail = line.split(":", 1)
        rows.append(f"<tr><td>{_esc(title)}</td><td>{_esc(detail.strip())}</td></tr>")
    return f"<h2>Protections</h2><table class=prot>{''.join(rows)}</table>"
