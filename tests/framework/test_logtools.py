"""Tests of ``ballast logs summarize`` / ``ballast logs trace`` on real files and real stdin."""

from __future__ import annotations

import argparse
import gzip
import io
import math
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ballast.logs import (
    MAX_KEYS,
    LatencySketch,
    LineCounter,
    LogSummary,
    add_logs_parser,
    format_summary_text,
    format_trace_line,
    parse_time_arg,
    read_batches,
    render_html,
    run_logs,
    summarize_file,
    trace_file,
)

ROOT = Path(__file__).resolve().parents[2]


def record(event: str, ts: str = "2026-11-28T14:00:00.000000Z", level: str = "info", **fields: Any) -> bytes:
    return orjson.dumps({"timestamp": ts, "level": level, "event": event, **fields})


def write_log(path: Path, lines: list[bytes], *, gz: bool = False) -> Path:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ballast")
    commands = parser.add_subparsers(dest="command", required=True)
    add_logs_parser(commands)
    return parser


def run(*argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["logs", *argv])
    assert args.func is run_logs
    out, err = io.StringIO(), io.StringIO()
    code = run_logs(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str) -> dict[str, Any]:
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    doc: dict[str, Any] = orjson.loads(out)
    return doc


def request(rid: str, route: str | None, status: object, duration: object, **extra: Any) -> bytes:
    fields: dict[str, Any] = {"request_id": rid, "method": "GET", "status": status, "duration_ms": duration}
    if route is not None:
        fields["route"] = route
    return record("http.request", **fields, **extra)


# A crafted log: every count below is known exactly.
CRAFTED: list[bytes] = [
    record("server.started", host="127.0.0.1", port=8080),
    request("r1", "/v1/sessions/{session_id}", 200, 10.0, session_id="s1"),
    request("r2", "/v1/sessions/{session_id}", 201, 20.0, session_id="s1"),
    request("r3", "/v1/sessions/{session_id}", 404, 30.0, session_id="s2"),
    record("http.request", request_id="r4", method="POST", route="/v1/sessions", status=503, duration_ms=5),
    request("r5", "/healthz", 200, 0.5),
    request("r6", "/healthz", "abc", "fast"),  # wrong types: counted, status "other", no duration
    request("r7", None, 404, 1.0),  # unmatched path: no route
    request("r8", "/healthz", [500], {"x": 1}),  # unhashable field values
    record(
        "upstream.retry", level="warning", request_id="r9", name="inference.resolve", attempt=1, status=503
    ),
    record(
        "upstream.retry", level="warning", request_id="r9", name="inference.resolve", attempt=2, status=503
    ),
    record(
        "upstream.retry",
        level="warning",
        request_id="r9",
        name="inference.report",
        attempt=1,
        status=None,
        error_type="TimeoutError",
    ),
    record(
        "upstream.failed",
        level="error",
        request_id="r9",
        name="inference.resolve",
        attempts=3,
        kind="status",
        status=503,
        error_type="UpstreamError",
    ),
    record(
        "error.unhandled",
        level="error",
        request_id="r9",
        error_type="UpstreamError",
        error="boom",
        traceback="Traceback (most recent call last):\n  ...\nUpstreamError: boom\n",
        status=502,
    ),
    record(
        "error.unhandled", level="error", request_id="r10", error_type="ValueError", error="x", status=500
    ),
    record(
        "session.mutation_failed", level="error", session_id="s1", mutation_id="m1", error_type="KeyError"
    ),
    record(
        "session.mutation_failed", level="error", session_id="s1", mutation_id="m2", error_type="KeyError"
    ),
    record(
        "session.mutation_failed", level="error", session_id="s2", mutation_id="m3", error_type="KeyError"
    ),
    record("finalize.stage", session_id="s1", attempt=1, stage="freeze", state="succeeded", duration_ms=2.0),
    record("finalize.stage", session_id="s1", attempt=1, stage="report", state="succeeded", duration_ms=40.0),
    record("finalize.stage", session_id="s1", attempt=1, stage="report", state="failed", duration_ms="?"),
    record("finalize.timed_out", level="warning", session_id="s1", attempt=1, stage="report", budget_ms=100),
    record("finalize.completed", session_id="s1", attempt=1, state="timed_out", elapsed_ms=101.0),
    record(
        "finalize.failed", level="error", session_id="s2", attempt=1, stage="persist", error_type="OSError"
    ),
    record("finalize.completed", session_id="s2", attempt=1, state="failed", elapsed_ms=5.0),
    record("finalize.completed", session_id="s1", attempt=2, state="succeeded", elapsed_ms=50.0),
    record("finalize.completed", session_id="s3", attempt=1, state="succeeded", elapsed_ms=60.0),
    record("bulkhead.rejected", level="warning", in_flight=8, max_workers=8, max_queue=16),
    record("bulkhead.rejected", level="warning", in_flight=8, max_workers=8, max_queue=16),
    orjson.dumps({"timestamp": "2026-11-28T14:00:00Z", "event": "server.stopping"}),  # no level
    # Malformed lines.
    b"this is not json",
    b'{"timestamp": "2026-11-28T14:00:00Z", "event": "http.req',  # truncated
    b"\xff\xfe{\x00garbage",  # invalid UTF-8
    b'{"s": "\xc3\x28"}',  # invalid UTF-8 inside a string
    b"[1, 2, 3]",
    b'"just a string"',
    b"42",
    b'{"level": "info", "timestamp": "2026-11-28T14:00:00Z"}',
    b'{"event": 5}',
    b'{"event": null}',
    b"",
    b"   ",
    b"\r",
]


def test_summarize_counts_a_crafted_log_exactly(tmp_path: Path) -> None:
    log = write_log(tmp_path / "app.log", CRAFTED)
    report = run_json("summarize", str(log))

    lines = report["lines"]
    assert lines["skipped"] == {"not_json": 4, "no_event": 6, "too_long": 0}  # 3 JSON, not objects
    assert lines["counted"] == 30
    assert lines["total"] == 30 + 10  # blank lines are not lines
    assert lines["filtered_out"] == 0
    assert lines["by_event"] == {
        "http.request": 8,
        "finalize.completed": 4,
        "upstream.retry": 3,
        "finalize.stage": 3,
        "session.mutation_failed": 3,
        "bulkhead.rejected": 2,
        "error.unhandled": 2,
        "finalize.failed": 1,
        "finalize.timed_out": 1,
        "server.started": 1,
        "server.stopping": 1,
        "upstream.failed": 1,
    }
    assert lines["by_level"] == {"info": 16, "error": 7, "warning": 6, "(none)": 1}
    assert sum(lines["by_event"].values()) == lines["counted"]

    requests = report["requests"]
    assert requests["total"] == 8
    assert requests["by_status_class"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 2, "5xx": 1, "other": 2}
    routes = requests["by_route"]
    assert list(routes) == ["/healthz", "/v1/sessions/{session_id}", "(none)", "/v1/sessions"]
    sessions_route = routes["/v1/sessions/{session_id}"]
    assert sessions_route["count"] == 3
    assert sessions_route["by_method"] == {"GET": 3}
    assert sessions_route["by_status_class"]["2xx"] == 2
    assert sessions_route["by_status_class"]["4xx"] == 1
    assert sessions_route["p50_ms"] == pytest.approx(20.0, rel=0.01)
    assert sessions_route["max_ms"] == 30.0
    healthz = routes["/healthz"]
    assert healthz["count"] == 3
    assert healthz["by_status_class"] == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 0, "other": 2}
    assert healthz["max_ms"] == 0.5  # only r5 had a usable duration
    assert sum(b["count"] for b in healthz["histogram"]) == 1
    assert routes["/v1/sessions"]["by_method"] == {"POST": 1}
    assert routes["/v1/sessions"]["p99_ms"] == pytest.approx(5.0, rel=0.01)

    assert report["upstream"] == {
        "retries": {"503": 2, "TimeoutError": 1},
        "retries_total": 3,
        "failed": {"status": 1},
        "failed_total": 1,
        "by_name": {
            "inference.report": {"retries": 1, "failed": 0},
            "inference.resolve": {"retries": 2, "failed": 1},
        },
    }
    finalize = report["finalize"]
    assert finalize["by_outcome"] == {"succeeded": 2, "failed": 1, "timed_out": 1}
    assert finalize["timed_out_stage"] == {"report": 1}
    assert finalize["failed_stage"] == {"persist": 1}
    assert finalize["stages"]["report"]["count"] == 2
    assert finalize["stages"]["report"]["max_ms"] == 40.0
    assert finalize["stages"]["freeze"]["count"] == 1
    assert report["mutation_failures"] == {"s1": 2, "s2": 1}
    assert report["errors"] == {"KeyError": 3, "UpstreamError": 2, "ValueError": 1}
    assert report["bulkhead"] == {"rejected": 2}
    assert report["window"] == {
        "first": "2026-11-28T14:00:00.000000Z",
        "last": "2026-11-28T14:00:00.000000Z",
        "span_s": 0.0,
    }
    assert report["input"] == {"source": str(log), "gzip": False, "error": None}
    assert report["filter"] == {"since": None, "until": None}


def test_summarize_text_report_shows_every_section(tmp_path: Path) -> None:
    log = write_log(tmp_path / "app.log", CRAFTED)
    code, out, err = run("summarize", str(log))
    assert code == 0, err
    assert "Lines: 40 total, 30 counted, 10 skipped (not JSON 4, no event 6" in out
    assert "By level: info 16  error 7  warning 6  (none) 1" in out
    assert "Requests: 8" in out
    assert "/v1/sessions/{session_id}" in out
    assert "Request latency (all routes):" in out
    assert any(line.count("#") and "|" in line for line in out.splitlines())
    assert "Upstream retries: 3" in out
    assert "Upstream give-ups by kind: 1" in out
    assert "Finalize jobs by outcome: 4" in out
    assert "Finalize timeouts by stage: 1" in out
    assert "Mutation failures by session: 3" in out
    assert "Top error types: 6" in out
    assert "Bulkhead rejections: 2" in out


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_percentiles_are_within_one_percent(tmp_path: Path) -> None:
    rng = random.Random(5)
    uniform = [float(v) for v in range(1, 1001)]
    lognormal = [round(rng.lognormvariate(3.0, 1.5), 3) for _ in range(20_000)]
    lines = [request(f"u{i}", "/uniform", 200, v) for i, v in enumerate(uniform)]
    lines += [request(f"l{i}", "/lognormal", 200, v) for i, v in enumerate(lognormal)]
    rng.shuffle(lines)
    report = run_json("summarize", str(write_log(tmp_path / "app.log", lines)))

    for route, values in (("/uniform", uniform), ("/lognormal", lognormal)):
        stats = report["requests"]["by_route"][route]
        assert stats["count"] == len(values)
        assert stats["max_ms"] == max(values)
        for key, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            assert stats[key] == pytest.approx(exact_percentile(values, q), rel=0.0101), (route, key)
        assert sum(b["count"] for b in stats["histogram"]) == len(values)
    overall = report["requests"]
    assert overall["p99_ms"] == pytest.approx(exact_percentile(uniform + lognormal, 0.99), rel=0.0101)
    assert sum(b["count"] for b in overall["histogram"]) == len(uniform) + len(lognormal)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e7, allow_nan=False), min_size=1, max_size=300))
def test_sketch_quantiles_track_exact_ranks(values: list[float]) -> None:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    assert sketch.count == len(values)
    assert sketch.maximum() == max(values)
    for q, estimate in zip(
        (0.0, 0.5, 0.95, 0.99, 1.0), sketch.quantiles((0.0, 0.5, 0.95, 0.99, 1.0)), strict=True
    ):
        exact = exact_percentile(values, q)
        assert estimate is not None
        if exact < 0.001:
            assert estimate == 0.0
        else:
            assert estimate == pytest.approx(exact, rel=0.0101)


def test_gzip_is_detected_by_magic_bytes_not_name(tmp_path: Path) -> None:
    plain = run_json("summarize", str(write_log(tmp_path / "plain.log", CRAFTED)))
    gz_path = write_log(tmp_path / "rotated.log.1", CRAFTED, gz=True)  # no .gz suffix
    packed = run_json("summarize", str(gz_path))
    assert packed["input"]["gzip"] is True
    for key in ("lines", "requests", "upstream", "finalize", "errors", "window"):
        assert packed[key] == plain[key]


def test_truncated_gzip_reports_what_was_read_and_fails(tmp_path: Path) -> None:
    data = gzip.compress(b"\n".join(CRAFTED * 50) + b"\n")
    path = tmp_path / "cut.log.gz"
    path.write_bytes(data[: len(data) // 2])
    code, out, err = run("summarize", str(path), "--json")
    assert code == 1
    report = orjson.loads(out)
    assert report["input"]["error"].startswith("input ended early")
    assert 0 < report["lines"]["total"] < len(CRAFTED) * 50
    assert "input ended early" in err


def test_multi_member_gzip_with_padding_reads_every_member() -> None:
    first, second = b"\n".join(CRAFTED[:10]) + b"\n", b"\n".join(CRAFTED[10:]) + b"\n"
    stream = io.BytesIO(gzip.compress(first) + b"\x00" * 16 + gzip.compress(second))
    report = summarize_file(None, stdin=stream)
    assert report["input"] == {"source": "-", "gzip": True, "error": None}
    assert report["lines"]["counted"] == 30
    assert report["lines"]["total"] == 40


def at(hour: int, minute: int = 0) -> str:
    return datetime(2026, 11, 28, hour, minute, tzinfo=UTC).isoformat().replace("+00:00", "Z")


def test_since_and_until_select_a_half_open_window(tmp_path: Path) -> None:
    lines = [
        record("tick", ts=at(14, 0)),
        record("tick", ts=at(14, 30)),
        record("tick", ts="2026-11-28T17:00:00+02:00"),  # 15:00 UTC
        record("tick", ts="2026-11-28T15:15:00"),  # no zone: UTC
        record("tick", ts=at(15, 30)),
        record("tick", ts="yesterday"),
        record("tick", ts="0001-01-01T00:00:00+05:00"),  # before year 1 in UTC
        orjson.dumps({"event": "tick", "timestamp": 1_700_000_000}),
        orjson.dumps({"event": "tick"}),
    ]
    log = str(write_log(tmp_path / "app.log", lines))

    unfiltered = run_json("summarize", log)
    assert unfiltered["lines"]["counted"] == 9
    assert unfiltered["window"]["first"] == "0001-01-01T00:00:00+05:00"
    assert unfiltered["window"]["last"] == "2026-11-28T15:30:00.000000Z"

    filtered = run_json(
        "summarize", log, "--since", "2026-11-28T14:30:00Z", "--until", "2026-11-28T15:30:00Z"
    )
    assert filtered["lines"]["counted"] == 3  # 14:30, 15:00, 15:15
    assert filtered["lines"]["filtered_out"] == 6  # three outside, three without a usable timestamp
    assert filtered["lines"]["total"] == 9
    assert filtered["window"]["first"] == "2026-11-28T14:30:00.000000Z"
    assert filtered["window"]["last"] == "2026-11-28T15:15:00.000000Z"
    assert filtered["filter"] == {
        "since": "2026-11-28T14:30:00.000000Z",
        "until": "2026-11-28T15:30:00.000000Z",
    }

    only_since = run_json("summarize", log, "--since", "2026-11-28T15:00:00+00:00")
    assert only_since["lines"]["counted"] == 3


def test_relative_since_counts_back_from_now(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    lines = [
        record("old", ts=(now - timedelta(hours=2)).isoformat()),
        record("recent", ts=(now - timedelta(minutes=10)).isoformat()),
    ]
    log = str(write_log(tmp_path / "app.log", lines))
    assert run_json("summarize", log, "--since", "1h")["lines"]["by_event"] == {"recent": 1}
    assert run_json("summarize", log, "--until", "30m")["lines"]["by_event"] == {"old": 1}


def test_parse_time_arg_forms_and_errors() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_time_arg("90s", now=now) == now - timedelta(seconds=90)
    assert parse_time_arg("30m", now=now) == now - timedelta(minutes=30)
    assert parse_time_arg("2d", now=now) == now - timedelta(days=2)
    assert parse_time_arg("2026-11-28T10:00:00Z") == datetime(2026, 11, 28, 10, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601"):
        parse_time_arg("last tuesday")


def test_bad_time_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["logs", "summarize", "--since", "soon"])
    assert exited.value.code == 2
    assert "invalid time 'soon'" in capsys.readouterr().err


def test_missing_file_is_reported_not_raised(tmp_path: Path) -> None:
    code, out, err = run("summarize", str(tmp_path / "nope.log"))
    assert code == 1
    assert out == ""
    assert "cannot read" in err and "nope.log" in err


def test_over_long_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    huge = record("http.request", route="/big", status=200, duration_ms=1.0, pad="x" * (9 << 20))
    lines = [record("before"), huge, record("after"), b"y" * (9 << 20)]
    report = run_json("summarize", str(write_log(tmp_path / "app.log", lines)))
    assert report["lines"]["skipped"]["too_long"] == 2
    assert report["lines"]["by_event"] == {"after": 1, "before": 1}
    assert report["lines"]["total"] == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
    st.integers(min_value=1, max_value=25),
    st.booleans(),
)
def test_read_batches_splits_lines_exactly(lines: list[bytes], limit: int, trailing_newline: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    counter = LineCounter()
    got = [
        line
        for batch in read_batches(io.BytesIO(data), max_line_bytes=limit, counter=counter)
        for line in batch
    ]
    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert got == [line for line in expected if len(line) <= limit]
    assert counter.too_long == sum(1 for line in expected if len(line) > limit)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["http.request", "upstream.retry", "finalize.stage", "2026-11-28T14:00:00Z", "info"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = st.sampled_from(
    [
        *("event", "level", "timestamp", "route", "method", "status", "duration_ms"),
        *("session_id", "request_id", "stage", "state", "kind", "error_type", "name", "traceback"),
    ]
)
EVENTS = st.sampled_from(
    [
        "http.request",
        "upstream.retry",
        "upstream.failed",
        "error.unhandled",
        "session.mutation_failed",
        "finalize.stage",
        "finalize.timed_out",
        "finalize.completed",
        "finalize.failed",
        "bulkhead.rejected",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(
                lambda event, extra: {"event": event, **extra}, EVENTS, st.dictionaries(FIELDS, JSON_VALUES)
            ),
            st.dictionaries(FIELDS, JSON_VALUES),
            JSON_VALUES,
        ).map(orjson.dumps)
        | st.binary(max_size=30),
        max_size=25,
    ),
    st.booleans(),
)
def test_any_input_is_summarised_without_error(lines: list[bytes], filtered: bool) -> None:
    summary = LogSummary(since=datetime(2026, 1, 1, tzinfo=UTC) if filtered else None)
    summary.feed([line.replace(b"\n", b" ") for line in lines])
    report = summary.report()
    counts = report["lines"]
    skipped = counts["skipped"]
    dropped = skipped["not_json"] + skipped["no_event"] + skipped["too_long"]
    assert counts["total"] == counts["counted"] + counts["filtered_out"] + dropped
    assert report["requests"]["total"] == counts["by_event"].get("http.request", 0)
    assert sum(report["requests"]["by_status_class"].values()) == report["requests"]["total"]
    assert format_summary_text(report)
    assert render_html(report).endswith("</html>\n")
    for line in lines:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            assert format_trace_line(obj)


def test_distinct_keys_are_bounded_but_totals_exact(tmp_path: Path) -> None:
    n = MAX_KEYS + 500
    lines = [record("session.mutation_failed", session_id=f"s{i}", error_type="E") for i in range(n)]
    report = run_json("summarize", str(write_log(tmp_path / "app.log", lines)))
    failures = report["mutation_failures"]
    assert len(failures) == MAX_KEYS + 1
    assert failures["(other)"] == 500
    assert sum(failures.values()) == n
    assert report["errors"] == {"E": n}


def run_module(*argv: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ballast.logs", *argv],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_summarize_reads_plain_and_gzip_stdin(tmp_path: Path) -> None:
    expected = run_json("summarize", str(write_log(tmp_path / "app.log", CRAFTED)))
    data = b"\n".join(CRAFTED) + b"\n"
    for payload, argv in (
        (data, ["summarize", "--json"]),
        (gzip.compress(data), ["summarize", "-", "--json"]),
    ):
        proc = run_module(*argv, stdin=payload)
        assert proc.returncode == 0, proc.stderr
        report = orjson.loads(proc.stdout)
        assert report["input"]["source"] == "-"
        assert report["lines"] == expected["lines"]
        assert report["requests"] == expected["requests"]


def test_html_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    lines = [*CRAFTED, request("x1", "/evil/<script>alert(1)</script>", 200, 3.0)]
    log = write_log(tmp_path / "app.log", lines)
    out_html = tmp_path / "report.html"
    code, out, err = run("summarize", str(log), "--html", str(out_html))
    assert code == 0, err
    assert "Requests: 9" in out
    page = out_html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    lowered = page.lower()
    for forbidden in ("http://", "https://", "src=", "href=", "<script", "@import", "url("):
        assert forbidden not in lowered, forbidden
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # One latency histogram for all routes and one per route, drawn with CSS bars.
    assert page.count("<table class=hist>") == 1 + 5
    assert 'class=bar><div style="width:100.00%"></div>' in page
    assert "/v1/sessions/{session_id}" in page


def test_unwritable_html_path_fails_cleanly(tmp_path: Path) -> None:
    log = write_log(tmp_path / "app.log", CRAFTED)
    code, _, err = run("summarize", str(log), "--html", str(tmp_path / "missing" / "r.html"))
    assert code == 1
    assert "cannot write" in err


# --------------------------------------------------------------------------- trace


TRACE_LOG: list[bytes] = [
    record("server.started", ts="2026-11-28T14:00:00.000000Z"),
    # r1 touches s1; its retry line carries no session id and comes first.
    record("upstream.retry", ts="2026-11-28T14:00:01.000000Z", request_id="r1", attempt=1, status=503),
    record("unrelated", ts="2026-11-28T14:00:01.500000Z", request_id="r2"),
    # Out of file order: this line is earlier than the retry above.
    record("request.started", ts="2026-11-28T14:00:00.500000Z", request_id="r1"),
    record(
        "error.unhandled",
        ts="2026-11-28T14:00:02.000000Z",
        level="error",
        request_id="r1",
        session_id="s1",
        error_type="ValueError",
        error="bad value",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad value\n',
    ),
    record("http.request", ts="2026-11-28T14:00:02.000000Z", request_id="r2", route="/healthz", status=200),
    # Same timestamp as the error above: file order decides.
    record(
        "http.request",
        ts="2026-11-28T14:00:02.000000Z",
        request_id="r1",
        session_id="s1",
        status=500,
        duration_ms=9.5,
    ),
    record(
        "finalize.stage", ts="2026-11-28T14:00:03.000000Z", session_id="s1", stage="freeze", state="succeeded"
    ),
    record("finalize.completed", ts="2026-11-28T14:00:04.250000Z", session_id="s1", state="succeeded"),
    record("http.request", ts="2026-11-28T14:00:05.000000Z", request_id="r3", session_id="s2", status=200),
    b"not json at all",
    record("late", ts="2026-11-28T14:00:06.000000Z", request_id="r1", note="after the canonical line"),
]


def events(doc: dict[str, Any]) -> list[str]:
    return [line["event"] for line in doc["lines"]]


def test_trace_request_orders_by_time_then_file_order(tmp_path: Path) -> None:
    log = str(write_log(tmp_path / "app.log", TRACE_LOG))
    doc = run_json("trace", "--request-id", "r1", log)
    assert events(doc) == ["request.started", "upstream.retry", "error.unhandled", "http.request", "late"]
    assert doc["request_id"] == "r1"
    assert doc["error"] is None
    assert doc["summary"] == {
        "lines": 5,
        "first": "2026-11-28T14:00:00.500000Z",
        "last": "2026-11-28T14:00:06.000000Z",
        "span_s": 5.5,
    }


def test_trace_text_is_one_line_per_record_with_indented_traceback(tmp_path: Path) -> None:
    log = str(write_log(tmp_path / "app.log", TRACE_LOG))
    code, out, err = run("trace", "--request-id", "r1", log)
    assert code == 0, err
    rows = out.splitlines()
    assert rows[0].startswith("2026-11-28T14:00:00.500000Z info     request.started request_id=r1")
    error_row = rows.index(next(r for r in rows if " error.unhandled " in r))
    assert 'error="bad value"' in rows[error_row]
    assert "traceback" not in rows[error_row]
    assert rows[error_row + 1] == "    traceback:"
    assert rows[error_row + 2] == "      Traceback (most recent call last):"
    assert rows[error_row + 3] == '        File "x.py", line 1'
    assert rows[error_row + 5].startswith("2026-11-28T14:00:02.000000Z info     http.request request_id=r1")
    assert rows[-1] == (
        "-- request r1: 5 lines, 2026-11-28T14:00:00.500000Z .. 2026-11-28T14:00:06.000000Z, span 5.500s"
    )


def test_trace_session_expands_to_requests_that_touched_it(tmp_path: Path) -> None:
    log = str(write_log(tmp_path / "app.log", TRACE_LOG))
    doc = run_json("trace", "--session", "s1", log)
    assert doc["session_id"] == "s1"
    assert doc["request_ids"] == ["r1"]
    assert events(doc) == [
        "request.started",
        "upstream.retry",
        "error.unhandled",
        "http.request",
        "finalize.stage",
        "finalize.completed",
        "late",
    ]


def test_trace_session_from_stdin_buffers_only_in_flight_requests(tmp_path: Path) -> None:
    data = b"\n".join(TRACE_LOG) + b"\n"
    from_file = run_json("trace", "--session", "s1", str(write_log(tmp_path / "app.log", TRACE_LOG)))

    in_process = trace_file(None, session_id="s1", stdin=io.BufferedReader(io.BytesIO(data)))
    assert [r["event"] for r in in_process.records()] == events(from_file)

    proc = run_module("trace", "--session", "s1", "--json", stdin=gzip.compress(data))
    assert proc.returncode == 0, proc.stderr
    doc = orjson.loads(proc.stdout)
    assert doc["lines"] == from_file["lines"]
    assert doc["request_ids"] == ["r1"]

    text = run_module("trace", "--session", "s1", stdin=data)
    assert text.returncode == 0, text.stderr
    assert text.stdout.decode().splitlines()[-1].startswith("-- session s1 (1 request): 7 lines")


def test_trace_of_a_truncated_gzip_keeps_what_was_read(tmp_path: Path) -> None:
    data = gzip.compress(b"\n".join(TRACE_LOG * 200) + b"\n")
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) * 3 // 4])
    code, out, err = run("trace", "--session", "s1", str(path), "--json")
    assert code == 1
    assert "input ended early" in err
    doc = orjson.loads(out)
    assert doc["error"].startswith("input ended early")
    assert len(doc["lines"]) > 7


def test_trace_session_finds_request_lines_in_any_json_layout(tmp_path: Path) -> None:
    lines = [
        record("http.request", ts="2026-11-28T14:00:05Z", request_id="r1", session_id="s1"),
        # Written by other encoders: spaces after the colon, and a nested request_id first.
        b'{"timestamp": "2026-11-28T14:00:01Z", "event": "spaced", "request_id": "r1"}',
        b'{"timestamp":"2026-11-28T14:00:02Z","event":"nested","ctx":{"request_id":"zz"},"request_id":"r1"}',
        b'{"timestamp":"2026-11-28T14:00:03Z","event":"escaped","request_id":"\\u0072\\u0031"}',
        b'{"timestamp":"2026-11-28T14:00:04Z","event":"other","request_id":"r2"}',
    ]
    result = trace_file(str(write_log(tmp_path / "app.log", lines)), session_id="s1")
    assert [r["event"] for r in result.records()] == ["spaced", "nested", "escaped", "http.request"]


def test_trace_with_no_match_exits_1(tmp_path: Path) -> None:
    log = str(write_log(tmp_path / "app.log", TRACE_LOG))
    code, out, _ = run("trace", "--request-id", "missing", log)
    assert code == 1
    assert out.strip() == "-- request missing: 0 lines, - .. -, span -"


def test_trace_needs_exactly_one_selector(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["logs", "trace", "--request-id", "a", "--session", "b"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["logs", "trace", "app.log"])
    capsys.readouterr()


def test_trace_ids_that_json_may_escape_are_still_found(tmp_path: Path) -> None:
    odd = 'we/ird "id" é'
    lines = [
        record("a", ts="2026-11-28T14:00:00Z", request_id=odd),
        # The same id as another encoder writes it: ASCII-only, escaped slash.
        b'{"timestamp": "2026-11-28T14:00:01Z", "event": "b", "request_id": "we\\/ird \\"id\\" \\u00e9"}',
    ]
    result = trace_file(str(write_log(tmp_path / "app.log", lines)), request_id=odd)
    assert [r["event"] for r in result.records()] == ["a", "b"]


def test_format_trace_line_escapes_control_characters() -> None:
    line = format_trace_line(
        {"timestamp": "t", "level": "info", "event": "e", "msg": "a\x1b[31mred", "n": 3, "none": None}
    )
    assert "\x1b" not in line
    assert line == 't info     e msg="a\\u001b[31mred" n=3 none=null'
