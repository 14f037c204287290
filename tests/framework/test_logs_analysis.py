"""``ballast logs``: the time series, the protection events, the parallel summary, ``trace --trace-id``.

The parallel summary is compared byte for byte with the one-pass summary on the same
files (crafted, malformed, capped), since "identical either way" is its whole contract.
"""

from __future__ import annotations

import gzip
import io
import itertools
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import PEAK_RSS_KIB
from support import run_logs_cli as run_cli

import ballast.logs.parallel as parallel
from ballast.logs import (
    MAX_KEYS,
    LogSummary,
    format_summary_text,
    render_html,
    summarize_file,
    trace_document,
    trace_file,
)
from ballast.logs.timeline import INTERVALS, MAX_BUCKETS, SERIES, parse_interval

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 28, 14, 0, 0, tzinfo=UTC)


def stamp(seconds: float, base: datetime = T0) -> str:
    return (base + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def line(event: str, at: float | None = 0.0, level: str = "info", **fields: Any) -> bytes:
    record: dict[str, Any] = {"level": level, "event": event, **fields}
    if at is not None:
        record["timestamp"] = stamp(at)
    return orjson.dumps(record)


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path




# ------------------------------------------------------------------------------ module layout


def test_every_logs_module_is_small() -> None:
    for module in (ROOT / "framework" / "logs").glob("*.py"):
        lines = module.read_text().count("\n")
        assert lines <= 400, f"{module.name} has {lines} lines"


def test_python_m_ballast_logs_runs_the_cli(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", [line("http.request", status=200, duration_ms=1.0, route="/x")])
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.logs", "summarize", "--json", str(log)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["requests"]["total"] == 1


# ------------------------------------------------------------------------------ time series


def timeline_log() -> list[bytes]:
    out = []
    for s in range(0, 600, 3):  # 200 requests over ten minutes, every 10th a 503
        status = 503 if s % 30 == 0 else 200
        out.append(line("http.request", s + 0.5, status=status, duration_ms=2.0, route="/v1/sessions"))
    out += [
        line("upstream.retry", 61.0, "warning", name="inference.resolve", status=503),
        line("upstream.failed", 62.0, "error", name="inference.resolve", kind="status"),
        line("circuit.opened", 120.0, "warning", upstream="openai:api.example", kind="circuit_open"),
        line("circuit.half_open", 125.0, upstream="openai:api.example", probes=1),
        line("circuit.closed", 126.0, upstream="openai:api.example"),
        line("upstream.retry_denied", 130.0, "warning", name="inference.resolve", kind="budget_exhausted"),
        line("fallback.used", 131.0, "warning", operation="resolve", kind="circuit_open"),
        line("load.shed", 200.0, "warning", count=7, total=7, route="/v1/sessions"),
        line("load.shed", 201.0, "warning", count=3, total=10, route="/v1/sessions/{session_id}"),
        line("load.shed", 202.0, "warning", count="many", route=None),  # stands for one request
        line("auth.denied", 300.0, "warning", reason="unknown", key_id=None),
        line("auth.denied", 301.0, "warning", reason="scope", key_id="k_1"),
        line("auth.denied", 302.0, "warning", reason="unknown", key_id=None),
        line("finalize.completed", 400.0, session_id="s1", state="succeeded"),
        line("finalize.completed", 401.0, session_id="s2", state="timed_out"),
        line("finalize.completed", 402.0, session_id="s3", state="failed"),
        line("finalize.completed", 403.0, session_id="s4", state="weird"),  # not a series
        line(
            "circuit.opened", None, "warning", upstream="openai:api.example"
        ),  # counted, not on the timeline
    ]
    return out


def test_series_counts_each_bucket_exactly(tmp_path: Path) -> None:
    report = summarize_file(str(write(tmp_path / "t.log", timeline_log())), interval_s=60)
    series = report["series"]
    assert series["interval_s"] == 60
    assert series["times"] == [stamp(60 * i) for i in range(10)]
    counts = series["counts"]
    assert set(counts) == set(SERIES)
    assert counts["requests"] == [20] * 10
    assert counts["5xx"] == [2] * 10
    assert counts["upstream.retry"] == [0, 1] + [0] * 8
    assert counts["upstream.failed"] == [0, 1] + [0] * 8
    assert counts["circuit.opened"] == [0, 0, 1] + [0] * 7
    assert counts["circuit.half_open"] == [0, 0, 1] + [0] * 7
    assert counts["circuit.closed"] == [0, 0, 1] + [0] * 7
    assert counts["upstream.retry_denied"] == [0, 0, 1] + [0] * 7
    assert counts["fallback.used"] == [0, 0, 1] + [0] * 7
    assert counts["load.shed"] == [0, 0, 0, 11] + [0] * 6
    assert counts["auth.denied"] == [0] * 5 + [3] + [0] * 4
    assert counts["finalize.succeeded"] == [0] * 6 + [1] + [0] * 3
    assert counts["finalize.timed_out"] == [0] * 6 + [1] + [0] * 3
    assert counts["finalize.failed"] == [0] * 6 + [1] + [0] * 3
    assert series["totals"]["requests"] == 200 and series["totals"]["load.shed"] == 11
    protections = report["protections"]
    assert protections["circuit"] == {
        "opened": 2,
        "half_open": 1,
        "closed": 1,
        "opened_by_upstream": {"openai:api.example": 2},
    }
    assert protections["retry_denied"] == {"budget_exhausted": 1}
    assert protections["fallback"] == {"resolve": 1}
    assert protections["load_shed"] == {
        "lines": 3,
        "requests": 11,
        "by_route": {"/v1/sessions": 7, "/v1/sessions/{session_id}": 3, "(none)": 1},
    }
    assert protections["auth_denied"] == {"unknown": 2, "scope": 1}


def test_interval_is_chosen_from_the_span(tmp_path: Path) -> None:
    report = summarize_file(str(write(tmp_path / "t.log", timeline_log())))
    series = report["series"]
    # Lines from 14:00:00 to 14:09:57: 120 buckets of 5 s, the most allowed.
    assert series["interval_s"] == 5
    assert len(series["times"]) == 120
    assert sum(series["counts"]["requests"]) == 200


def test_text_and_html_show_the_timeline_and_protections(tmp_path: Path) -> None:
    report = summarize_file(str(write(tmp_path / "t.log", timeline_log())), interval_s=60)
    text = format_summary_text(report)
    assert "Over time: 10 x 60s buckets from 2026-11-28 14:00:00 to 2026-11-28 14:09:00" in text
    assert (
        "Circuit breaker: opened 2, half-open 1, closed 1; opened by upstream: openai:api.example 2" in text
    )
    assert "Load shed: 11 requests (3 sampled lines)" in text
    assert "Auth denials by reason: unknown 2, scope 1" in text
    row = next(r for r in text.splitlines() if r.strip().startswith("circuit.opened ") and "|" in r)
    assert row.split("|")[1] == "  @       "  # one bucket, at its peak
    assert row.split()[1] == "1"  # the line without a timestamp is counted, but not on the timeline
    page = render_html(report)
    assert page.count("<figure class=chart") == sum(1 for n in report["series"]["totals"].values() if n)
    assert 'data-series="load.shed"' in page
    quiet = [x for x in timeline_log() if b'"auth.denied"' not in x]
    page = render_html(summarize_file(str(write(tmp_path / "q.log", quiet)), interval_s=60))
    assert '<figure class=chart data-series="load.shed"' in page
    assert '<figure class=chart data-series="auth.denied"' not in page


def test_a_fixed_interval_over_a_long_span_is_coarsened_to_the_bound(tmp_path: Path) -> None:
    lines = [line("http.request", 3600.0 * i, status=500, duration_ms=1.0) for i in range(6000)]
    report = summarize_file(str(write(tmp_path / "long.log", lines)), interval_s=1)
    series = report["series"]
    assert series["interval_s"] is not None and series["interval_s"] > 1
    assert len(series["times"]) <= MAX_BUCKETS
    assert sum(series["counts"]["requests"]) == 6000 == sum(series["counts"]["5xx"])


def test_parse_interval_forms() -> None:
    assert [parse_interval(x) for x in ("30", "30s", "5m", "1h", "2d", "1w")] == [
        30,
        30,
        300,
        3600,
        172800,
        604800,
    ]
    for bad in ("0", "-5s", "1.5m", "soon", ""):
        with pytest.raises(ValueError):
            parse_interval(bad)
    code = subprocess.run(
        [sys.executable, "-m", "ballast.logs", "summarize", "--interval", "soon", "x"],
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode
    assert code == 2


def test_intervals_each_divide_the_next() -> None:
    assert all(b % a == 0 for a, b in itertools.pairwise(INTERVALS))


# ------------------------------------------------------------------------------ parallel == one pass


def messy_log(n: int, seed: int) -> list[bytes]:
    """Every kind of line the summary treats specially, in random order, over hours."""
    rnd = random.Random(seed)
    events = [
        "upstream.retry",
        "upstream.failed",
        "error.unhandled",
        "session.mutation_failed",
        "finalize.stage",
        "finalize.timed_out",
        "finalize.completed",
        "finalize.failed",
        "bulkhead.rejected",
        "circuit.opened",
        "circuit.half_open",
        "circuit.closed",
        "upstream.retry_denied",
        "fallback.used",
        "load.shed",
        "auth.denied",
        "server.started",
    ]
    out: list[bytes] = []
    for i in range(n):
        roll = rnd.random()
        at = rnd.uniform(0, 5 * 3600)
        if roll < 0.02:
            out.append(
                rnd.choice(
                    [
                        b'{"event": "http.request", "status": ',
                        b"[1, 2]",
                        b'"x"',
                        b"\xff\xfe",
                        b"   ",
                        b"",
                        b'{"level": "info"}',
                        b'{"event": 5}',
                        b"{}",
                    ]
                )
            )
        elif roll < 0.04:
            out.append(
                orjson.dumps(
                    {
                        "event": "http.request",
                        "timestamp": rnd.choice(
                            ["yesterday", 12, None, "2026-11-28T15:00:00+02:00", "2026-11-28T13:00:00"]
                        ),
                        "status": rnd.choice([200, "500", None, 503.0, True]),
                        "duration_ms": rnd.choice([1, -1, "x"]),
                    }
                )
            )
        elif roll < 0.7:
            out.append(
                line(
                    "http.request",
                    at,
                    route=rnd.choice(["/a", "/b/{id}", "/c", None]),
                    method=rnd.choice(["GET", "POST"]),
                    status=rnd.choice([200, 201, 404, 500, 503]),
                    duration_ms=round(rnd.lognormvariate(1, 1.5), 3),
                    request_id=f"r{i}",
                )
            )
        else:
            event = rnd.choice(events)
            out.append(
                line(
                    event,
                    at,
                    rnd.choice(["info", "warning", "error"]),
                    name=rnd.choice(["inference.resolve", "inference.report"]),
                    status=rnd.choice([503, 429, None]),
                    error_type=rnd.choice(["E1", "E2", None]),
                    kind=rnd.choice(["status", "budget", "cooldown"]),
                    stage=rnd.choice(["report", "drain"]),
                    state=rnd.choice(["succeeded", "failed", "timed_out"]),
                    session_id=f"s{i % 50}",
                    duration_ms=rnd.uniform(0, 100),
                    count=rnd.choice([1, 5, 40]),
                    reason="unknown",
                    upstream="u1",
                    operation="resolve",
                    route="/a",
                )
            )
    return out


def assert_same_either_way(path: Path, **options: Any) -> dict[str, Any]:
    one_pass = summarize_file(str(path), workers=1, engine="stream", **options)
    for workers in (2, 3, 7):
        split = summarize_file(str(path), workers=workers, engine="stream", **options)
        assert orjson.dumps(split) == orjson.dumps(one_pass), workers
        assert format_summary_text(split) == format_summary_text(one_pass)
        assert render_html(split) == render_html(one_pass)
    return dict(one_pass)


@pytest.fixture
def split_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)


@pytest.mark.usefixtures("split_small_files")
def test_parallel_summary_is_identical_on_messy_logs(tmp_path: Path) -> None:
    for seed in (1, 2):
        log = write(tmp_path / f"messy{seed}.log", messy_log(3000, seed))
        report = assert_same_either_way(log)
        assert report["lines"]["skipped"]["not_json"] > 0 and report["lines"]["skipped"]["no_event"] > 0
        assert_same_either_way(log, interval_s=60)
        assert_same_either_way(log, since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3))


@pytest.mark.usefixtures("split_small_files")
def test_parallel_summary_is_identical_with_over_long_lines_and_no_final_newline(tmp_path: Path) -> None:
    lines = messy_log(200, 3)
    lines.insert(100, b'{"event":"x","pad":"' + b"y" * (9 << 20) + b'"}')
    log = tmp_path / "long.log"
    log.write_bytes(b"\n".join(lines))  # no newline at the end
    report = assert_same_either_way(log)
    assert report["lines"]["skipped"]["too_long"] == 1


@pytest.mark.usefixtures("split_small_files")
def test_parallel_summary_falls_back_to_one_pass_when_a_table_fills(tmp_path: Path) -> None:
    n = MAX_KEYS + 300
    lines = [
        line("session.mutation_failed", i, "error", session_id=f"s{i}", error_type="E") for i in range(n)
    ]
    random.Random(5).shuffle(lines)
    report = assert_same_either_way(write(tmp_path / "keys.log", lines))
    assert report["mutation_failures"]["(other)"] == 300


def test_gzip_and_stdin_are_read_in_one_pass(tmp_path: Path, split_small_files: None) -> None:
    data = b"\n".join(messy_log(500, 4)) + b"\n"
    plain = write(tmp_path / "p.log", [data.rstrip(b"\n")])
    gz = tmp_path / "p.log.gz"
    gz.write_bytes(gzip.compress(data))
    assert parallel.summarize_parallel(str(gz), workers=2) is None
    expected = summarize_file(str(plain), workers=1)
    got = summarize_file(str(gz), workers=2)
    assert got["requests"] == expected["requests"] and got["series"] == expected["series"]


# ------------------------------------------------------------------------------ bounded memory


def test_tables_timeline_and_sketches_stay_bounded(tmp_path: Path) -> None:
    summary = LogSummary(interval_s=1)
    rnd = random.Random(9)
    batch = []
    for i in range(60_000):
        batch.append(
            line(
                rnd.choice(["session.mutation_failed", "auth.denied", "http.request"]),
                float(i * 977),
                "error",
                session_id=f"s{i}",
                error_type=f"E{i}",
                reason=f"r{i}",
                route=f"/r{i}",
                method=f"M{i % 50}",
                status=200,
                duration_ms=rnd.uniform(0, 1e9),
            )
        )
    summary.feed(batch)
    assert len(summary.timeline.buckets) <= MAX_BUCKETS
    assert len(summary.mutation_failures) <= MAX_KEYS + 1 and len(summary.errors) <= MAX_KEYS + 1
    assert len(summary.protections.auth_denied) <= MAX_KEYS + 1
    assert len(summary.routes) <= 257
    assert all(len(s.buckets) <= 1400 for s in summary.routes.values())
    report = summary.report()
    assert report["lines"]["counted"] == 60_000


PEAK_RSS = PEAK_RSS_KIB + """
import sys
from ballast.logs import summarize_file
summarize_file(sys.argv[1], workers=1, engine="stream")
print(_peak_rss_kib())
"""


def _peak_rss_kb(path: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, timeout=300, check=True
    )
    return int(proc.stdout.strip())


def test_peak_memory_does_not_grow_with_the_log(tmp_path: Path) -> None:
    """Ten times the lines, all with new keys over a longer span: the peak RSS stays put."""

    def pathological(n: int) -> Path:
        path = tmp_path / f"p{n}.log"
        with open(path, "wb") as fh:
            for start in range(0, n, 10_000):
                fh.write(
                    b"".join(
                        line(
                            "session.mutation_failed",
                            float(i * 613),
                            "error",
                            session_id=f"sess-{i}",
                            error_type=f"Error{i}",
                            request_id=f"{i:032x}",
                        )
                        + b"\n"
                        for i in range(start, min(n, start + 10_000))
                    )
                )
        return path

    small, big = _peak_rss_kb(pathological(20_000)), _peak_rss_kb(pathological(200_000))
    assert big - small < 16 * 1024, f"peak RSS grew from {small} KiB to {big} KiB"


# ------------------------------------------------------------------------------ trace --trace-id


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def trace_log() -> list[bytes]:
    return [
        line("upstream.retry", 2.0, "warning", request_id="r1", trace_id=TRACE, span_id="00f067aa0ba902b7"),
        line("http.request", 1.0, request_id="r0", status=200, route="/healthz"),
        line("http.request", 3.0, request_id="r1", status=200, route="/v1/sessions/{session_id}/resolve"),
        line("finalize.stage", 4.0, request_id="r2", trace_id=TRACE, span_id="a", stage="report"),
        line("finalize.completed", 5.0, request_id="r2", state="succeeded"),
        line("upstream.retry", 6.0, "warning", request_id="r3", trace_id="0" * 31 + "1"),
    ]


def test_trace_by_trace_id_holds_its_requests_lines(tmp_path: Path) -> None:
    log = write(tmp_path / "t.log", trace_log())
    for source in (str(log), None):
        if source is None:
            result = trace_file("-", trace_id=TRACE, stdin=io.BytesIO(log.read_bytes()))
        else:
            result = trace_file(source, trace_id=TRACE)
        doc = trace_document(result)
        assert doc["trace_id"] == TRACE and "session_id" not in doc
        assert doc["request_ids"] == ["r1", "r2"]
        assert [(r["request_id"], r["event"]) for r in doc["lines"]] == [
            ("r1", "upstream.retry"),
            ("r1", "http.request"),
            ("r2", "finalize.stage"),
            ("r2", "finalize.completed"),
        ]
    code, out, _ = run_cli("trace", "--trace-id", TRACE, str(log))
    assert code == 0
    assert out.splitlines()[-1].startswith(f"-- trace {TRACE} (2 requests): 4 lines")
    assert run_cli("trace", "--trace-id", "f" * 32, str(log))[0] == 1


def test_span_one_bucket_over_the_limit_takes_the_next_interval(tmp_path: Path) -> None:
    lines = [line("http.request", 0.0, status=200), line("http.request", 600.0, status=200)]
    series = summarize_file(str(write(tmp_path / "t.log", lines)))["series"]
    assert series["interval_s"] == 10  # 5 s would need 121 buckets
    assert len(series["times"]) == 61 and series["counts"]["requests"] == [1] + [0] * 59 + [1]


def test_timestamps_at_the_ends_of_time_are_bucketed(tmp_path: Path) -> None:
    lines = [
        b'{"timestamp":"0001-01-01T00:00:00Z","event":"http.request","status":500}',
        b'{"timestamp":"9999-12-31T23:59:59.999999Z","event":"http.request","status":200}',
        b'{"timestamp":"1969-12-31T23:59:59.5Z","event":"auth.denied","reason":"x"}',
    ]
    log = write(tmp_path / "edge.log", lines)
    report = summarize_file(str(log))
    series = report["series"]
    assert len(series["times"]) <= 120
    assert series["times"][0].endswith("1-01-01T00:00:00.000000Z")  # the first second a datetime holds
    assert series["totals"]["requests"] == 2 and series["totals"]["auth.denied"] == 1
    assert format_summary_text(report) and render_html(report)
    with pytest.raises(ValueError):
        parse_interval("99999999999")
