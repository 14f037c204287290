"""``ballast logs`` against the log of a real server run whose every failure is known.

One module-scoped scenario drives a real ``ballast serve`` process (openai provider
pointed at a fake upstream, SQLite with a trigger that rejects one chosen mutation)
through a scripted run: ``MUTATION_BATCHES`` good mutation requests, one poisoned
mutation, a resolve that succeeds after two 503s, a resolve that gives up after three,
and a finalize job whose report stage hangs past the job's budget. The tests then check
that ``ballast logs summarize --json`` counts exactly that, and that ``ballast logs
trace`` tells the failed resolve's story in order. The malformed-input tests need no
server.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sqlite3
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstreamProcess
from support import ServerProcess, request, run_cli

SESSION = "alpha"
MUTATION_BATCHES = 5
POISON_ID = "poison-1"
FINALIZE_MS = 1000
MUTATIONS_ROUTE = "/v1/sessions/{session_id}/mutations"
RESOLVE_ROUTE = "/v1/sessions/{session_id}/resolve"
FINALIZE_ROUTE = "/v1/sessions/{session_id}/finalize"
REPORT_ROUTE = "/v1/sessions/{session_id}/report"
STAGES_BEFORE_REPORT = ("freeze", "drain", "replay", "reconcile", "stats", "events")

# A trigger makes exactly one mutation id fail inside the store, as a corrupt row or a
# failing disk would: the store's own error path, not a client error.
POISON_TRIGGER = f"""
CREATE TRIGGER reject_poison BEFORE INSERT ON mutations
WHEN NEW.mutation_id = '{POISON_ID}'
BEGIN
    SELECT RAISE(ABORT, 'mutation rejected by the test trigger');
END
"""


@dataclass
class Scenario:
    """What the scenario did, as the client saw it."""

    log_path: Path
    starts: int = 0
    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # route, method, class
    failed_resolve_rid: str = ""
    retried_resolve_rid: str = ""
    poison_rid: str = ""
    finalize_rid: str = ""
    finalize_job: dict[str, Any] = field(default_factory=dict)

    def note(self, route: str, method: str, status: int) -> None:
        self.requests[(route, method, f"{status // 100}xx")] += 1


def utterance(i: int) -> dict[str, Any]:
    text = ["Hello, I'm Alice.", "Bob here."][i % 2] if i < 2 else f"point {i} about the plan"
    return {"id": f"m-{i}", "type": "utterance", "speaker": f"spk_{i % 2}",
            "start_ms": i * 1000, "end_ms": i * 1000 + 900, "text": text}


def start(server: ServerProcess, scenario: Scenario) -> None:
    server.start()
    scenario.starts += 1
    scenario.note("/readyz", "GET", 200)  # start() polls /readyz until the first 200


def run_scenario(workdir: Path) -> Scenario:
    with FakeUpstreamProcess(default="ok") as fake:
        config = f"""
[inference]
provider = "openai"
base_url = "{fake.base_url}"
model = "fake-model"
api_key_env = "BALLAST_SCENARIO_KEY"
timeout_ms = 10000
[plugins.retry]
start_timeout_s = 0.05
max_timeout_s = 0.1
jitter = false
[plugins.timeout_budget]
finalize_ms = {FINALIZE_MS}
"""
        server = ServerProcess(workdir, config, env={"BALLAST_SCENARIO_KEY": "sk-scenario-0123456789"})
        scenario = Scenario(server.log_path)
        try:
            # First start creates the schema; the trigger is added while the server is down.
            start(server, scenario)
            server.stop()
            with sqlite3.connect(server.db) as conn:
                conn.execute(POISON_TRIGGER)
            conn.close()
            start(server, scenario)
            drive(server.base_url, fake, scenario)
        finally:
            fake.set_default("ok")
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
    return scenario


def drive(base: str, fake: FakeUpstreamProcess, scenario: Scenario) -> None:
    sessions = f"{base}/v1/sessions"
    status, _, _ = request("POST", sessions, {"session_id": SESSION,
                                              "participants": [{"name": "Alice"}, {"name": "Bob"}]})
    assert status == 201
    scenario.note("/v1/sessions", "POST", status)

    for i in range(MUTATION_BATCHES):
        status, _, _ = request("POST", f"{sessions}/{SESSION}/mutations", {"mutations": [utterance(i)]})
        assert status == 200
        scenario.note(MUTATIONS_ROUTE, "POST", status)

    fake.script("503", "503", "ok")
    status, headers, body = request("POST", f"{sessions}/{SESSION}/resolve")
    assert status == 200, body
    scenario.note(RESOLVE_ROUTE, "POST", status)
    scenario.retried_resolve_rid = headers["X-Request-ID"]

    fake.script("503", "503", "503")
    status, headers, body = request("POST", f"{sessions}/{SESSION}/resolve")
    assert status == 502, body
    scenario.note(RESOLVE_ROUTE, "POST", status)
    scenario.failed_resolve_rid = headers["X-Request-ID"]

    poison = {"id": POISON_ID, "type": "note", "text": "this one is rejected"}
    status, headers, body = request("POST", f"{sessions}/{SESSION}/mutations", {"mutations": [poison]})
    assert status == 500, body
    scenario.note(MUTATIONS_ROUTE, "POST", status)
    scenario.poison_rid = headers["X-Request-ID"]

    fake.set_default("hang:30")
    status, headers, body = request("POST", f"{sessions}/{SESSION}/finalize")
    assert status == 202, body
    scenario.note(FINALIZE_ROUTE, "POST", status)
    scenario.finalize_rid = headers["X-Request-ID"]
    deadline = time.monotonic() + 20
    while True:
        status, _, body = request("GET", f"{sessions}/{SESSION}/finalize")
        assert status == 200, body
        scenario.note(FINALIZE_ROUTE, "GET", status)
        if body["job"]["state"] != "running":
            break
        assert time.monotonic() < deadline, "the finalize job never ended"
        time.sleep(0.05)
    scenario.finalize_job = body["job"]
    fake.set_default("ok")

    status, _, _ = request("GET", f"{sessions}/{SESSION}/report")
    assert status == 404
    scenario.note(REPORT_ROUTE, "GET", status)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return run_scenario(tmp_path_factory.mktemp("logs_scenario"))


@pytest.fixture(scope="module")
def raw_lines(scenario: Scenario) -> list[dict[str, Any]]:
    return [json.loads(line) for line in scenario.log_path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def summary(scenario: Scenario) -> dict[str, Any]:
    result = run_cli("logs", "summarize", "--json", str(scenario.log_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def finalize_give_ups(raw_lines: list[dict[str, Any]], scenario: Scenario) -> list[dict[str, Any]]:
    """The report stage's upstream call may notice the end of the budget first and give up.

    Whether it does is a race between two timers set for the same instant, so the test
    takes it from the log, and checks that it belongs to the finalize job and is a
    budget give-up.
    """
    found = [r for r in raw_lines
             if r["event"] == "upstream.failed" and r.get("request_id") == scenario.finalize_rid]
    for line in found:
        assert line["name"] == "inference.report"
        assert line["kind"] in ("budget", "timeout")
    assert len(found) <= 1
    return found


def test_the_job_timed_out_in_the_report_stage(scenario: Scenario) -> None:
    job = scenario.finalize_job
    assert job["state"] == "timed_out"
    assert [s["state"] for s in job["stages"]] == ["succeeded"] * 6 + ["timed_out", "skipped"]


def test_lines_and_events_are_counted_exactly(
        summary: dict[str, Any], scenario: Scenario, raw_lines: list[dict[str, Any]]) -> None:
    lines = summary["lines"]
    assert lines["total"] == lines["counted"] == len(raw_lines)
    assert lines["skipped"] == {"not_json": 0, "no_event": 0, "too_long": 0}
    assert lines["filtered_out"] == 0
    give_ups = len(finalize_give_ups(raw_lines, scenario))
    starts = scenario.starts
    expected = {
        "server.ready": starts, "server.started": starts,
        "server.stopping": starts, "server.stopped": starts,
        "http.request": sum(scenario.requests.values()),
        "upstream.retry": 4,
        "upstream.failed": 1 + give_ups,
        "error.unhandled": 2,  # the failed resolve (502) and the poisoned mutation (500)
        "session.mutation_failed": 1,
        "finalize.stage": len(STAGES_BEFORE_REPORT),
        "finalize.timed_out": 1,
        "finalize.completed": 1,
    }
    assert lines["by_event"] == {k: v for k, v in expected.items() if v}
    # upstream.failed (resolve), error.unhandled x2, session.mutation_failed, a report give-up
    errors = 1 + 2 + 1 + give_ups
    warnings = 4 + 1  # upstream.retry x4, finalize.timed_out
    assert lines["by_level"] == {"info": len(raw_lines) - errors - warnings, "warning": warnings,
                                 "error": errors}
    assert summary["input"] == {"source": str(scenario.log_path), "gzip": False, "error": None}


def test_requests_per_route_and_status_class(summary: dict[str, Any], scenario: Scenario) -> None:
    requests = summary["requests"]
    expected: dict[str, dict[str, Any]] = {}
    for (route, method, cls), n in scenario.requests.items():
        entry = expected.setdefault(route, {"count": 0, "by_method": Counter(), "classes": Counter()})
        entry["count"] += n
        entry["by_method"][method] += n
        entry["classes"][cls] += n
    assert set(requests["by_route"]) == set(expected)
    for route, want in expected.items():
        got = requests["by_route"][route]
        assert got["count"] == want["count"], route
        assert got["by_method"] == dict(want["by_method"]), route
        assert {k: v for k, v in got["by_status_class"].items() if v} == dict(want["classes"]), route
        assert got["p50_ms"] is not None and got["p50_ms"] <= got["max_ms"]
    # The scenario's own figures, spelled out.
    assert requests["by_route"][MUTATIONS_ROUTE]["by_status_class"]["2xx"] == MUTATION_BATCHES
    assert requests["by_route"][MUTATIONS_ROUTE]["by_status_class"]["5xx"] == 1
    assert requests["by_route"][RESOLVE_ROUTE]["by_status_class"] == {
        "1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1, "other": 0}
    assert requests["by_route"][REPORT_ROUTE]["by_status_class"]["4xx"] == 1
    assert requests["total"] == sum(scenario.requests.values())
    assert requests["by_status_class"]["5xx"] == 2
    assert requests["by_status_class"]["4xx"] == 1


def test_upstream_retries_and_give_ups(
        summary: dict[str, Any], scenario: Scenario, raw_lines: list[dict[str, Any]]) -> None:
    upstream = summary["upstream"]
    assert upstream["retries"] == {"503": 4}  # two per resolve: 503, 503, then ok / give up
    assert upstream["retries_total"] == 4
    give_ups = finalize_give_ups(raw_lines, scenario)
    failed = Counter({"status": 1})
    failed.update(line["kind"] for line in give_ups)
    assert upstream["failed"] == dict(failed)
    assert upstream["failed_total"] == 1 + len(give_ups)
    by_name = {"inference.resolve": {"retries": 4, "failed": 1}}
    if give_ups:
        by_name["inference.report"] = {"retries": 0, "failed": 1}
    assert upstream["by_name"] == by_name


def test_finalize_outcomes(summary: dict[str, Any]) -> None:
    finalize = summary["finalize"]
    assert finalize["by_outcome"] == {"timed_out": 1}
    assert finalize["timed_out_stage"] == {"report": 1}
    assert finalize["failed_stage"] == {}
    assert set(finalize["stages"]) == set(STAGES_BEFORE_REPORT)
    assert all(stats["count"] == 1 for stats in finalize["stages"].values())


def test_mutation_failures_and_error_types(
        summary: dict[str, Any], scenario: Scenario, raw_lines: list[dict[str, Any]]) -> None:
    assert summary["mutation_failures"] == {SESSION: 1}
    # error.unhandled: UpstreamError (resolve) and StoreError (the mutation request);
    # session.mutation_failed: the store's own error, sqlite3's IntegrityError.
    errors = Counter({"UpstreamError": 1, "StoreError": 1, "IntegrityError": 1})
    errors.update(line["error_type"] for line in finalize_give_ups(raw_lines, scenario)
                  if line["error_type"])
    assert summary["errors"] == dict(errors)
    assert summary["bulkhead"] == {"rejected": 0}
    failure = next(r for r in raw_lines if r["event"] == "session.mutation_failed")
    assert failure["session_id"] == SESSION
    assert failure["mutation_id"] == POISON_ID
    assert failure["mutation_type"] == "note"
    assert failure["request_id"] == scenario.poison_rid  # reported in its request's context


def test_summary_window_and_time_filter(summary: dict[str, Any], scenario: Scenario) -> None:
    window = summary["window"]
    assert window["first"] is not None and window["last"] is not None
    assert window["first"] <= window["last"]
    future = run_cli("logs", "summarize", "--json", "--since", "2999-01-01T00:00:00Z",
                     str(scenario.log_path))
    assert future.returncode == 0, future.stderr
    doc = json.loads(future.stdout)
    assert doc["lines"]["counted"] == 0
    assert doc["lines"]["filtered_out"] == summary["lines"]["total"]
    recent = run_cli("logs", "summarize", "--json", "--since", "1h", str(scenario.log_path))
    assert json.loads(recent.stdout)["lines"]["by_event"] == summary["lines"]["by_event"]


def test_text_and_html_reports(summary: dict[str, Any], scenario: Scenario, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = run_cli("logs", "summarize", "--html", str(out), str(scenario.log_path))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Upstream retries: 4" in text
    assert "Finalize timeouts by stage: 1" in text
    assert "Mutation failures by session: 1" in text
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and RESOLVE_ROUTE in page


def trace_events(text: str) -> list[tuple[str, str]]:
    """(event, line) of each log line in ``trace`` text output (not its indented blocks)."""
    out = []
    for line in text.splitlines():
        if line.startswith((" ", "--")) or not line.strip():
            continue
        parts = line.split()
        out.append((parts[2], line))
    return out


def test_trace_of_the_failed_resolve(scenario: Scenario) -> None:
    rid = scenario.failed_resolve_rid
    result = run_cli("logs", "trace", "--request-id", rid, str(scenario.log_path))
    assert result.returncode == 0, result.stderr
    events = trace_events(result.stdout)
    assert [e for e, _ in events] == [
        "upstream.retry", "upstream.retry", "upstream.failed", "error.unhandled", "http.request"]
    assert "attempt=1 " in events[0][1] and "attempt=2 " in events[1][1]
    assert "status=503" in events[0][1] and "status=503" in events[1][1]
    assert "kind=status" in events[2][1] and "attempts=3" in events[2][1]
    assert "status=502" in events[4][1]
    assert f"-- request {rid}: 5 lines" in result.stdout

    doc = json.loads(run_cli("logs", "trace", "--json", "--request-id", rid, str(scenario.log_path)).stdout)
    assert doc["request_id"] == rid and doc["error"] is None
    assert [(line["event"], line.get("attempt")) for line in doc["lines"]] == [
        ("upstream.retry", 1), ("upstream.retry", 2), ("upstream.failed", None),
        ("error.unhandled", None), ("http.request", None)]
    assert all(line["request_id"] == rid and line["session_id"] == SESSION for line in doc["lines"])


def test_trace_of_the_poisoned_mutation_and_the_session(scenario: Scenario) -> None:
    doc = json.loads(run_cli("logs", "trace", "--json", "--request-id", scenario.poison_rid,
                             str(scenario.log_path)).stdout)
    assert [line["event"] for line in doc["lines"]] == [
        "session.mutation_failed", "error.unhandled", "http.request"]

    result = run_cli("logs", "trace", "--json", "--session", SESSION, str(scenario.log_path))
    assert result.returncode == 0, result.stderr
    session = json.loads(result.stdout)
    assert scenario.failed_resolve_rid in session["request_ids"]
    assert scenario.finalize_rid in session["request_ids"]
    events = [line["event"] for line in session["lines"]]
    assert events.count("finalize.stage") == len(STAGES_BEFORE_REPORT)
    assert events.index("finalize.timed_out") < events.index("finalize.completed")


def test_trace_of_an_unknown_request_exits_1(scenario: Scenario) -> None:
    result = run_cli("logs", "trace", "--request-id", "no-such-request-id", str(scenario.log_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ malformed input


def _summarize(path: Path, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    result = run_cli("logs", "summarize", *extra, str(path))
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    doc = json.loads(result.stdout) if "--json" in extra else None
    return result.returncode, doc, result.stderr


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_bytes(b"")
    code, doc, _ = _summarize(path, "--json")
    assert code == 0
    assert doc is not None and doc["lines"]["total"] == 0 and doc["requests"]["total"] == 0
    assert doc["window"] == {"first": None, "last": None, "span_s": None}
    code, _, _ = _summarize(path)
    assert code == 0


def test_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.log"
    noise = random.Random(1234).randbytes(64 * 1024).replace(b"\x1f", b"\x00")
    path.write_bytes(noise + b"\n\xff\xfe{\"event\": \x00}\n[1, 2]\n")
    code, doc, _ = _summarize(path, "--json")
    assert code == 0
    assert doc is not None
    assert doc["lines"]["counted"] == 0
    assert doc["lines"]["skipped"]["not_json"] >= 1
    assert doc["lines"]["skipped"]["no_event"] >= 1  # [1, 2]: JSON, not an object
    code, _, _ = _summarize(path)
    assert code == 0


def test_truncated_gzip(tmp_path: Path, scenario: Scenario) -> None:
    whole = gzip.compress(scenario.log_path.read_bytes())
    path = tmp_path / "cut.log.gz"
    path.write_bytes(whole[: len(whole) // 2])
    code, doc, stderr = _summarize(path, "--json")
    assert code == 1
    assert doc is not None and doc["input"]["gzip"] is True
    assert doc["input"]["error"] and "ended early" in doc["input"]["error"]
    assert "ended early" in stderr
    code, _, stderr = _summarize(path)
    assert code == 1 and "ended early" in stderr
    magic_only = tmp_path / "magic.gz"
    magic_only.write_bytes(b"\x1f\x8b")
    code, _, stderr = _summarize(magic_only, "--json")
    assert code == 1 and stderr


def test_missing_file(tmp_path: Path) -> None:
    result = run_cli("logs", "summarize", str(tmp_path / "nope.log"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def _one_pass_and_split(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes]:
    import orjson

    import ballast.logs.parallel as parallel
    from ballast.logs import summarize_file

    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    one = orjson.dumps(summarize_file(str(path), workers=1))
    split = orjson.dumps(summarize_file(str(path), workers=3))
    return one, split


def test_engines_agree_on_the_scenario_log(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    one, split = _one_pass_and_split(scenario.log_path, monkeypatch)
    assert one == split


def test_the_duckdb_engine_agrees_on_the_scenario_log(scenario: Scenario, tmp_path: Path) -> None:
    pytest.importorskip("duckdb", reason="the DuckDB engine needs DuckDB: pip install 'ballast[logs]'")
    import orjson

    from ballast.logs import duck, summarize_file

    # The scenario's log as written, and with a copy of its lines shifted by an hour
    # appended: the engines must agree on the time filter and the series too.
    doubled = tmp_path / "doubled.log"
    shifted = []
    for raw in scenario.log_path.read_bytes().splitlines():
        record = orjson.loads(raw)
        when = datetime.fromisoformat(record["timestamp"]) + timedelta(hours=1)
        record["timestamp"] = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        shifted.append(orjson.dumps(record) + b"\n")
    doubled.write_bytes(scenario.log_path.read_bytes() + b"".join(shifted))
    for path in (scenario.log_path, doubled):
        stream = orjson.dumps(summarize_file(str(path), workers=1, engine="stream"))
        report = duck.summarize_duckdb(str(path))
        assert report is not None, "the DuckDB engine declined Ballast's own log"
        assert orjson.dumps(report) == stream
        assert orjson.dumps(summarize_file(str(path), engine="duckdb")) == stream
        since = datetime.fromisoformat(orjson.loads(stream)["window"]["first"]) + timedelta(seconds=1)
        expected = orjson.dumps(summarize_file(str(path), engine="stream", since=since, interval_s=5))
        assert orjson.dumps(duck.summarize_duckdb(str(path), since=since, interval_s=5)) == expected


def test_the_native_engine_agrees_on_the_scenario_log_and_reads_it_itself(scenario: Scenario) -> None:
    import orjson

    from ballast.logs import groups, native, summarize_file
    from ballast.logs.sketch import _INV_LOG_GAMMA, _MIN_MS

    if not native.available():
        pytest.skip("the native scanner was not built (no C compiler at install)")
    path = str(scenario.log_path)
    stream = orjson.dumps(summarize_file(path, workers=1, engine="stream"))
    for threads in (1, 2):
        report = native.summarize_native(path, threads=threads)
        assert report is not None, "the native engine declined Ballast's own log"
        assert orjson.dumps(report) == stream
    since = datetime.fromisoformat(orjson.loads(stream)["window"]["first"]) + timedelta(seconds=1)
    expected = orjson.dumps(summarize_file(path, engine="stream", since=since, interval_s=5))
    assert orjson.dumps(native.summarize_native(path, since=since, interval_s=5)) == expected
    # A real server's lines are simple, read by the scanner itself, except those with a
    # nested value (server.started's list of plugins) or an escape (error.unhandled's
    # multi-line traceback), handed back to the streaming reader.
    from ballast.logs import _scan

    with open(path, "rb") as fh:
        result = _scan.scan(fh.fileno(), [(0, os.fstat(fh.fileno()).st_size)], 1 << 20, None, None,
                            [groups.json_text(e).encode() for e in groups.RARE],
                            [groups.json_text(e).encode() for e in groups.TIMED],
                            _MIN_MS, _INV_LOG_GAMMA, groups.ZERO_BUCKET)
    assert result is not None
    text = scenario.log_path.read_bytes()
    handed_back = [orjson.loads(text[offset:offset + length])
                   for offset, length in struct.iter_unpack("=qq", result[3])]
    assert result[4] + len(handed_back) == text.count(b"\n") and result[4] > 40
    assert {line["event"] for line in handed_back} <= {"error.unhandled", "server.started"}


def test_engines_agree_on_binary_garbage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "garbage.log"
    noise = random.Random(99).randbytes(256 * 1024).replace(b"\x1f", b"\x00")
    path.write_bytes(noise + b"\n" + (b'{"event": "http.request", "status": 500}\n' * 50) + noise)
    one, split = _one_pass_and_split(path, monkeypatch)
    assert one == split


def test_query_counts_the_scenario_exactly(scenario: Scenario) -> None:
    pytest.importorskip("duckdb", reason="ballast logs query needs DuckDB: pip install 'ballast[logs]'")
    sql = ("SELECT route, method, (status // 100) || 'xx' AS class, count(*) AS n FROM logs "
           "WHERE event = 'http.request' GROUP BY ALL ORDER BY ALL")
    result = run_cli("logs", "query", sql, str(scenario.log_path), "--json")
    assert result.returncode == 0, result.stderr
    got = {(r["route"], r["method"], r["class"]): r["n"] for r in json.loads(result.stdout)}
    assert got == dict(scenario.requests)
