"""The summary document's types (``summarize --json``) and the small rules every table follows.

The report is a plain JSON-ready dict, typed here so that the aggregator, the text and
HTML renderers and the engines that fill it agree on its shape. The helpers fix how a
table is keyed and bounded: ``(none)`` for a missing or mistyped value, ``(other)`` for
keys beyond a table's cap, counters ordered by count, then key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from ballast.logs.protections import ProtectionsReport
    from ballast.logs.timeline import SeriesReport

MAX_KEYS = 10_000
MAX_ROUTES = 256
OTHER_KEY = "(other)"
NONE_KEY = "(none)"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
# int status -> class, precomputed so the hot loop does one dict lookup.
_STATUS_CLASS = {code: f"{code // 100}xx" for code in range(100, 600)}


class SkippedReport(TypedDict):
    not_json: int
    no_event: int
    too_long: int


class LinesReport(TypedDict):
    total: int
    counted: int
    filtered_out: int
    skipped: SkippedReport
    by_event: dict[str, int]
    by_level: dict[str, int]


class InputReport(TypedDict):
    source: str
    gzip: bool
    error: str | None


class FilterReport(TypedDict):
    since: str | None
    until: str | None


class WindowReport(TypedDict):
    first: str | None
    last: str | None
    span_s: float | None


class HistogramBin(TypedDict):
    lower_ms: float
    upper_ms: float
    count: int


class RouteReport(TypedDict):
    count: int
    by_method: dict[str, int]
    by_status_class: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    histogram: list[HistogramBin]


class RequestsReport(TypedDict):
    total: int
    by_status_class: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    histogram: list[HistogramBin]
    by_route: dict[str, RouteReport]


class UpstreamNameReport(TypedDict):
    retries: int
    failed: int


class UpstreamReport(TypedDict):
    retries: dict[str, int]
    retries_total: int
    failed: dict[str, int]
    failed_total: int
    by_name: dict[str, UpstreamNameReport]


class StageReport(TypedDict):
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class FinalizeReport(TypedDict):
    by_outcome: dict[str, int]
    timed_out_stage: dict[str, int]
    failed_stage: dict[str, int]
    stages: dict[str, StageReport]


class BulkheadReport(TypedDict):
    rejected: int


class SummaryReport(TypedDict):
    input: InputReport
    filter: FilterReport
    lines: LinesReport
    window: WindowReport
    requests: RequestsReport
    upstream: UpstreamReport
    finalize: FinalizeReport
    mutation_failures: dict[str, int]
    errors: dict[str, int]
    bulkhead: BulkheadReport
    protections: ProtectionsReport
    series: SeriesReport



def _bump(table: dict[str, int], key: str, n: int = 1, cap: int = MAX_KEYS) -> None:
    """Count ``key`` ``n`` times, folding new keys into ``(other)`` once ``cap`` keys exist."""
    if key in table:
        table[key] += n
    elif len(table) < cap:
        table[key] = n
    else:
        table[OTHER_KEY] = table.get(OTHER_KEY, 0) + n


def _key(value: object) -> str:
    """A table key from a log field: strings as they are, else ``(none)``."""
    return value if type(value) is str else NONE_KEY


def _duration(value: object) -> float | None:
    """A usable duration in ms: a JSON number (not a bool), non-negative and finite."""
    if isinstance(value, (int, float)) and type(value) is not bool and 0 <= value < 1e15:
        return float(value)
    return None


def _by_count(table: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted(table.items(), key=lambda kv: (-kv[1], kv[0])))


def _status_classes(counts: Mapping[str, int]) -> dict[str, int]:
    return {cls: counts.get(cls, 0) for cls in STATUS_CLASSES}


def _status_class(status: object) -> str:
    return _STATUS_CLASS.get(status, "other") if type(status) is int else "other"
