"""``ballast logs query``: SQL over a log, and every recipe of docs/logging.md run on a scripted log."""

from __future__ import annotations

import csv
import gzip
import io
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import run_logs_cli as run

pytest.importorskip("duckdb", reason="ballast logs query needs DuckDB: pip install 'ballast[logs]'")


ROOT = Path(__file__).resolve().parents[2]


def recipes() -> dict[str, str]:
    """The SQL recipes in docs/logging.md, by the sentence that introduces each."""
    text = (ROOT / "docs" / "logging.md").read_text()
    section = text.split("#### Recipes", 1)[1].split("\n### ", 1)[0]
    found = re.findall(r"^([^\n`]+):\n\n```sql\n(.*?)```", section, re.MULTILINE | re.DOTALL)
    return {title.strip(): sql for title, sql in found}


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")




def query_json(sql: str, path: Path) -> list[dict[str, Any]]:
    code, out, err = run("query", sql, str(path), "--json")
    assert code == 0, err
    rows: list[dict[str, Any]] = orjson.loads(out)
    return rows


class Scenario:
    """A log with known answers to each recipe, timed relative to now."""

    def __init__(self, path: Path) -> None:
        now = datetime.now(UTC)
        self.minute = now.replace(second=0, microsecond=0) - timedelta(minutes=30)
        m0 = self.minute
        lines: list[dict[str, Any]] = []

        def add(event: str, at: datetime, level: str = "info", **fields: Any) -> None:
            lines.append({"timestamp": stamp(at), "level": level, "event": event, **fields})

        recent = now - timedelta(minutes=10)
        for _ in range(3):
            add("error.unhandled", recent, "error", error_type="UpstreamError", status=502)
        add("error.unhandled", recent, "error", error_type="StoreError", status=500)
        for _ in range(2):
            add("session.mutation_failed", recent, "error", session_id="s9", error_type="IntegrityError")
        for _ in range(5):  # two hours ago: not in the last hour
            add("error.unhandled", now - timedelta(hours=2), "error", error_type="OldError")
        add("upstream.retry", recent, "warning", name="inference.resolve", error_type="TimeoutError")
        add("finalize.failed", recent, "error", stage="report", error_type=None)
        for i in range(21):
            add("http.request", recent, route="/a", status=200, duration_ms=float(i))
            add("http.request", recent, route="/b", status=200, duration_ms=float(10 * i))
            add("http.request", recent, route="/c", status=200, duration_ms=5.0)
        add("upstream.retry", m0 + timedelta(seconds=5), "warning", name="inference.resolve", status=503)
        add("upstream.retry", m0 + timedelta(seconds=6), "warning", name="inference.resolve", status=503)
        add(
            "upstream.retry",
            m0 + timedelta(seconds=7),
            "warning",
            name="inference.resolve",
            upstream="openai:api.example",
            status=429,
        )
        add("upstream.retry", m0 + timedelta(seconds=65), "warning", name="inference.report", status=502)
        self.t1, self.t2, self.t3 = (m0 + timedelta(minutes=k) for k in (2, 3, 4))
        add("finalize.completed", self.t1, session_id="s1", state="timed_out")
        add("finalize.completed", self.t2, session_id="s2", state="timed_out")
        add("finalize.completed", self.t3, session_id="s1", state="timed_out")
        add("finalize.completed", self.t3, session_id="s3", state="succeeded")
        raw = [orjson.dumps(x) for x in lines]
        # Lines that are not JSON objects are not rows.
        raw[5:5] = [b'{"event": "http.request", "route": "/a", "duration_ms": ', b"[1, 2]", b""]
        path.write_bytes(b"\n".join(raw) + b"\n")
        self.path = path


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path / "scenario.log")


def test_the_docs_have_the_four_recipes() -> None:
    assert set(recipes()) == {
        "Errors by type in the last hour",
        "Slowest routes",
        "Retries by upstream per minute",
        "Sessions whose finalize timed out",
    }


def test_recipe_errors_by_type_in_the_last_hour(scenario: Scenario) -> None:
    rows = query_json(recipes()["Errors by type in the last hour"], scenario.path)
    assert rows == [
        {"error_type": "UpstreamError", "errors": 3},
        {"error_type": "IntegrityError", "errors": 2},
        {"error_type": "StoreError", "errors": 1},
    ]


def test_recipe_slowest_routes(scenario: Scenario) -> None:
    rows = query_json(recipes()["Slowest routes"], scenario.path)
    assert rows == [
        {"route": "/b", "requests": 21, "p95_ms": 190.0, "max_ms": 200.0},
        {"route": "/a", "requests": 21, "p95_ms": 19.0, "max_ms": 20.0},
        {"route": "/c", "requests": 21, "p95_ms": 5.0, "max_ms": 5.0},
    ]


def test_recipe_retries_by_upstream_per_minute(scenario: Scenario) -> None:
    rows = query_json(recipes()["Retries by upstream per minute"], scenario.path)
    m0 = scenario.minute
    minute = stamp(m0)
    later = stamp(m0 + timedelta(minutes=1))
    retried_recently = [r for r in rows if r["minute"] not in (minute, later)]
    assert [r for r in rows if r not in retried_recently] == [
        {"minute": minute, "upstream": "inference.resolve", "retries": 2},
        {"minute": minute, "upstream": "openai:api.example", "retries": 1},
        {"minute": later, "upstream": "inference.report", "retries": 1},
    ]
    # The one other retry (the TimeoutError ten minutes ago) is in its own minute.
    assert [(r["upstream"], r["retries"]) for r in retried_recently] == [("inference.resolve", 1)]


def test_recipe_sessions_whose_finalize_timed_out(scenario: Scenario) -> None:
    rows = query_json(recipes()["Sessions whose finalize timed out"], scenario.path)
    assert rows == [
        {"session_id": "s1", "timed_out_jobs": 2, "last_timeout": stamp(scenario.t3)},
        {"session_id": "s2", "timed_out_jobs": 1, "last_timeout": stamp(scenario.t2)},
    ]


def test_table_csv_and_the_whole_line(scenario: Scenario) -> None:
    sql = "SELECT event, count(*) AS n FROM logs GROUP BY event ORDER BY n DESC, event LIMIT 2"
    code, out, _ = run("query", sql, str(scenario.path))
    assert code == 0
    assert out.splitlines()[0].split() == ["event", "n"]
    assert out.splitlines()[2].split() == ["http.request", "63"]
    assert out.rstrip().endswith("(2 rows)")
    code, out, _ = run("query", sql, str(scenario.path), "--csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["event", "n"],
        ["http.request", "63"],
        ["error.unhandled", "9"],
    ]
    rows = query_json(
        "SELECT line, line->>'status' AS raw_status FROM logs WHERE upstream IS NOT NULL", scenario.path
    )
    assert len(rows) == 1
    assert rows[0]["line"]["upstream"] == "openai:api.example" and rows[0]["raw_status"] == "429"
    assert query_json("SELECT count(*) AS rows FROM logs", scenario.path) == [{"rows": 84}]


def test_stdin_gzip_and_errors(scenario: Scenario, tmp_path: Path) -> None:
    sql = "SELECT count(*) AS n FROM logs WHERE event = 'http.request'"
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.logs", "query", sql, "-", "--json"],
        input=gzip.compress(scenario.path.read_bytes()),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout) == [{"n": 63}]
    code, out, err = run("query", "SELECT nope FROM logs", str(scenario.path))
    assert code == 2 and out == "" and "nope" in err
    code, _, err = run("query", sql, str(tmp_path / "missing.log"))
    assert code == 1 and "cannot read" in err


def test_without_duckdb_the_command_says_how_to_install_it(scenario: Scenario) -> None:
    script = (
        "import sys; sys.modules['duckdb'] = None\n"
        "from ballast.logs.cli import main\n"
        f"sys.exit(main(['query', 'SELECT 1', {str(scenario.path)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    assert "pip install 'ballast[logs]'" in proc.stderr and "Traceback" not in proc.stderr
