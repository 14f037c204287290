"""The log event catalogue (docs/logging.md) against the code and against a running server.

* Statically: every event the source of ``framework/`` and ``plugins/`` can emit (a
  logger call whose first argument is a string literal, and the canonical request line)
  is catalogued, at the level the code uses, with every field the code passes; and the
  catalogue lists nothing the code never emits.
* Dynamically: a real ``ballast serve`` process, driven through successes and the
  common failures, writes only catalogued events, each line with the common fields.
* Secrets: with the openai provider and an API key in the environment, the key and
  ``Authorization`` values never reach the log, whatever fails.
"""

from __future__ import annotations

import ast
import re
import secrets
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstreamProcess
from support import ServerProcess, request

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "logging.md"
SOURCE_DIRS = (ROOT / "framework", ROOT / "plugins")

#: Logger methods and the level each writes at.
LEVEL_OF = {"debug": "debug", "info": "info", "msg": "info", "warning": "warning", "warn": "warning",
            "error": "error", "exception": "error", "critical": "critical", "fatal": "critical"}
LOGGER_FACTORIES = {"get_logger", "getLogger"}
EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
COMMON_FIELDS = {"timestamp", "level", "event", "request_id", "session_id", "trace_id", "span_id"}
CONTEXT_FIELDS = {"request_id", "session_id", "trace_id", "span_id"}
REQUEST_LINE = "request_line"
REQUEST_EVENT = "http.request"


# ------------------------------------------------------------------ the code's events


@dataclass
class Emitted:
    """Everything the code says about one event, over all its call sites."""

    levels: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    sites: list[str] = field(default_factory=list)


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _logger_names(tree: ast.Module) -> set[str]:
    """Names (and attribute names) bound to ``get_logger(...)`` anywhere in a module."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
            if _call_name(node.value.func) not in LOGGER_FACTORIES:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                elif isinstance(target, ast.Attribute):
                    names.add(target.attr)
    return names


def _is_logger(expr: ast.expr, names: set[str]) -> bool:
    if isinstance(expr, ast.Name):
        return expr.id in names
    if isinstance(expr, ast.Attribute):
        return expr.attr in names
    if isinstance(expr, ast.Call):
        name = _call_name(expr.func)
        if name in LOGGER_FACTORIES:
            return True
        # log.bind(...).info(...), log.new(...).info(...)
        return (name in ("bind", "new") and isinstance(expr.func, ast.Attribute)
                and _is_logger(expr.func.value, names))
    return False


def _keywords(call: ast.Call) -> set[str]:
    """Keyword names of a call, including the keys of literal dicts passed as ``**``."""
    out: set[str] = set()
    for kw in call.keywords:
        if kw.arg is not None:
            out.add(kw.arg)
            continue
        for node in ast.walk(kw.value):
            if isinstance(node, ast.Dict):
                out.update(k.value for k in node.keys
                           if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return out


def _request_line_params() -> set[str]:
    tree = ast.parse((ROOT / "framework" / "logging.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == REQUEST_LINE:
            args = node.args
            return {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    raise AssertionError("framework/logging.py defines no request_line()")


def scan_source() -> dict[str, Emitted]:
    files = sorted(p for d in SOURCE_DIRS for p in d.rglob("*.py"))
    assert files, "no source files found"
    return scan_files(files)


def scan_files(files: list[Path]) -> dict[str, Emitted]:
    """Every event the given modules can emit, with its levels and fields."""
    events: dict[str, Emitted] = {}
    params = _request_line_params()
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        names = _logger_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            where = f"{shown}:{node.lineno}"
            func = node.func
            if _call_name(func) == REQUEST_LINE and not (isinstance(func, ast.Attribute)
                                                         and _is_logger(func.value, names)):
                entry = events.setdefault(REQUEST_EVENT, Emitted())
                entry.levels.add("info")
                entry.fields |= params | _keywords(node)
                entry.sites.append(where)
                continue
            if not (isinstance(func, ast.Attribute) and func.attr in LEVEL_OF and node.args):
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            # A logger's call, or anything that looks like one (an event name as the
            # first argument), so that a logger this scan cannot recognise is not missed.
            if not (_is_logger(func.value, names) or EVENT_NAME.match(first.value)):
                continue
            entry = events.setdefault(first.value, Emitted())
            entry.levels.add(LEVEL_OF[func.attr])
            entry.fields |= _keywords(node)
            entry.sites.append(where)
    return events


# ------------------------------------------------------------------ the catalogue


@dataclass
class Documented:
    level: str | None
    fields: set[str]
    text: str


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"docs/logging.md has no '## {title}' section"
    return match.group(1)


def _table_names(text: str) -> list[str]:
    """The first cells of a Markdown table's rows, when they are a `code` name."""
    return re.findall(r"^\|\s*`([^`]+)`\s*\|", text, re.MULTILINE)


def parse_catalogue() -> dict[str, Documented]:
    text = CATALOGUE.read_text()
    reference = _section(text, "Event reference")
    parts = re.split(r"^### `([^`]+)`\s*$", reference, flags=re.MULTILINE)
    events: dict[str, Documented] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        assert name not in events, f"{name} is catalogued twice"
        level = re.search(r"\*\*Level:\*\*\s*`(\w+)`", body)
        events[name] = Documented(level.group(1) if level else None, set(_table_names(body)), body)
    return events


def glance_table() -> dict[str, str]:
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|\s*(\w+)\s*\|", _section(CATALOGUE.read_text(),
                                                                      "Events at a glance"), re.MULTILINE)
    return dict(rows)


@pytest.fixture(scope="module")
def emitted() -> dict[str, Emitted]:
    return scan_source()


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Documented]:
    return parse_catalogue()


# ------------------------------------------------------------------ (a) static


def test_the_scan_finds_the_known_events(emitted: dict[str, Emitted]) -> None:
    # Guards the scan itself: these are emitted in ways it must understand (a module
    # logger, a function-local logger, structlog's own get_logger, the request line).
    for name in ("http.request", "server.started", "store.failure_hook_failed", "upstream.retry",
                 "session.mutation_failed"):
        assert name in emitted, name
    assert {"method", "route", "path", "status", "duration_ms", "request_id", "session_id"} <= \
        emitted["http.request"].fields


def test_the_scan_understands_the_ways_to_log(tmp_path: Path) -> None:
    module = tmp_path / "sample.py"
    module.write_text(
        "import structlog\n"
        "from framework import logging as blog\n"
        "from ballast.logging import get_logger, request_line\n"
        "log = get_logger('x')\n"
        "slog = structlog.get_logger(__name__)\n"
        "class C:\n"
        "    def __init__(self) -> None:\n"
        "        self._log = get_logger()\n"
        "    def go(self) -> None:\n"
        "        self._log.warning('c.warned', a=1)\n"
        "def f(parser, other) -> None:\n"
        "    local = blog.get_logger('y')\n"
        "    local.info('local.event', b=2, **{'c': 3})\n"
        "    log.bind(d=4).error('bound.event', e=5)\n"
        "    slog.debug('plain', f=6)\n"
        "    get_logger().critical('direct.event')\n"
        "    other.info('odd.receiver', g=7)\n"
        "    parser.error('usage: not an event')\n"
        "    request_line('GET', '/', '/', 200, 1.0, 'rid', session_id='s')\n")
    found = scan_files([module])
    assert {name: info.levels for name, info in found.items()} == {
        "c.warned": {"warning"}, "local.event": {"info"}, "bound.event": {"error"},
        "plain": {"debug"}, "direct.event": {"critical"}, "odd.receiver": {"info"},
        "http.request": {"info"}}
    assert found["local.event"].fields == {"b", "c"}
    assert found["bound.event"].fields == {"e"}
    assert {"method", "route", "status", "session_id"} <= found["http.request"].fields


def test_every_emitted_event_is_catalogued(emitted: dict[str, Emitted],
                                           catalogue: dict[str, Documented]) -> None:
    missing = {name: info.sites for name, info in emitted.items() if name not in catalogue}
    assert not missing, f"emitted but not in docs/logging.md: {missing}"


def test_the_catalogue_lists_only_emitted_events(emitted: dict[str, Emitted],
                                                 catalogue: dict[str, Documented]) -> None:
    assert sorted(set(catalogue) - set(emitted)) == []


def test_the_overview_table_matches(emitted: dict[str, Emitted],
                                    catalogue: dict[str, Documented]) -> None:
    glance = glance_table()
    assert set(glance) == set(emitted)
    for name, level in glance.items():
        documented = catalogue.get(name)
        assert documented is not None and level == documented.level, name


def test_levels_match_the_code(emitted: dict[str, Emitted], catalogue: dict[str, Documented]) -> None:
    for name, info in emitted.items():
        if name in catalogue:  # missing ones fail test_every_emitted_event_is_catalogued
            assert info.levels == {catalogue[name].level}, f"{name}: code logs at {info.levels}"


def test_every_field_is_documented(emitted: dict[str, Emitted], catalogue: dict[str, Documented]) -> None:
    for name, info in emitted.items():
        if name not in catalogue:  # fails test_every_emitted_event_is_catalogued
            continue
        documented = catalogue[name].fields
        assert info.fields <= documented, f"{name}: undocumented fields {info.fields - documented}"
        invented = documented - info.fields - CONTEXT_FIELDS
        assert not invented, f"{name}: documented fields the code never passes: {invented}"


def test_the_common_fields_are_documented() -> None:
    common = set(_table_names(_section(CATALOGUE.read_text(), "Common fields")))
    assert common == COMMON_FIELDS


# ------------------------------------------------------------------ (b) + (c) a real server


API_KEY_ENV = "BALLAST_CATALOGUE_API_KEY"
POISON_ID = "poison-1"
LEASE_S = 1
SERVER_EVENTS = {"server.ready", "server.started", "server.stopping", "server.stopped",
                 "finalize.recovered"}


@dataclass
class Run:
    server: ServerProcess
    api_key: str

    def lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = self.server.logs()
        return lines


def utterances(n: int) -> list[dict[str, Any]]:
    texts = ["Hi, I'm Alice.", "Bob here, I will send the notes."]
    return [{"id": f"u{i}", "type": "utterance", "speaker": f"spk_{i % 2}", "start_ms": i * 1000,
             "end_ms": i * 1000 + 800, "text": texts[i % 2] if i < 2 else f"item {i}"}
            for i in range(n)]


def wait_job(base: str, sid: str, within: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, _, body = request("GET", f"{base}/v1/sessions/{sid}/finalize")
        assert status == 200, body
        if body["job"]["state"] != "running":
            job: dict[str, Any] = body["job"]
            return job
        time.sleep(0.05)
    raise AssertionError(f"the finalize job of {sid} did not end")


def drive_first_run(base: str, fake: FakeUpstreamProcess, api_key: str) -> None:
    s = f"{base}/v1/sessions"
    assert request("POST", s, {"session_id": "cat", "participants": [{"name": "Alice"}]})[0] == 201
    assert request("POST", f"{s}/cat/mutations", {"mutations": utterances(4)})[0] == 200
    # Client errors, logged because log_client_errors is on; one carries the key in a header.
    assert request("GET", f"{s}/nobody", headers={"Authorization": f"Bearer {api_key}"})[0] == 404
    assert request("POST", f"{s}/cat/mutations", {"mutations": [{"type": "bogus"}]})[0] == 422
    assert request("GET", f"{base}/no/such/path")[0] == 404
    # Upstream: retried then fine; retried then given up; refused; connections reset.
    fake.script("503", "503", "ok")
    assert request("POST", f"{s}/cat/resolve")[0] == 200
    fake.script("503", "503", "503")
    assert request("POST", f"{s}/cat/resolve")[0] == 502
    fake.script("401")
    assert request("POST", f"{s}/cat/resolve")[0] == 502
    fake.script("reset", "reset", "reset")
    assert request("POST", f"{s}/cat/resolve")[0] == 502
    # Finalize: spk_1 has no name, so reconcile asks the model first; a malformed reply
    # there leaves the label (naming unavailable), one in the report stage fails the job.
    # The next attempt succeeds.
    fake.script("malformed", "malformed")
    assert request("POST", f"{s}/cat/finalize")[0] == 202
    assert wait_job(base, "cat")["state"] == "failed"
    assert request("POST", f"{s}/cat/finalize")[0] == 202
    assert wait_job(base, "cat")["state"] == "succeeded"
    assert request("GET", f"{s}/cat/report")[0] == 200
    # A job left running when the server dies: recovered at the next start.
    assert request("POST", s, {"session_id": "killed"})[0] == 201
    assert request("POST", f"{s}/killed/mutations", {"mutations": utterances(2)})[0] == 200
    fake.set_default("hang:30")
    assert request("POST", f"{s}/killed/finalize")[0] == 202


def drive_second_run(base: str) -> None:
    s = f"{base}/v1/sessions"
    assert request("POST", s, {"session_id": "after"})[0] == 201
    poison = {"id": POISON_ID, "type": "note", "text": "rejected by the trigger"}
    assert request("POST", f"{s}/after/mutations", {"mutations": [poison]})[0] == 500
    # The job the killed process ran was claimed at start-up and carried to an end.
    for _ in range(300):
        status, _, body = request("GET", f"{s}/killed/finalize")
        if status == 200 and body["job"]["state"] != "running":
            break
        time.sleep(0.05)
    assert status == 200 and body["job"]["state"] == "succeeded"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    api_key = f"sk-catalogue-{secrets.token_hex(16)}"
    with FakeUpstreamProcess(default="ok") as fake:
        config = f"""
[logging]
level = "debug"
[inference]
provider = "openai"
base_url = "{fake.base_url}"
model = "fake-model"
api_key_env = "{API_KEY_ENV}"
timeout_ms = 5000
[plugins.retry]
start_timeout_s = 0.05
max_timeout_s = 0.1
jitter = false
[plugins.error_sanitizer]
log_client_errors = true
[plugins.timeout_budget]
finalize_ms = 10000
[plugins.circuit_breaker]
minimum_calls = 100    # the scenario's failures must not open it (tests/reliability/test_outage.py does)
"""
        server = ServerProcess(tmp_path_factory.mktemp("catalogue"), config,
                               env={API_KEY_ENV: api_key, "BALLAST__STORAGE__JOB_LEASE_S": str(LEASE_S)})
        try:
            server.start()
            drive_first_run(server.base_url, fake, api_key)
            server.stop(signal.SIGKILL)
            with sqlite3.connect(server.db) as conn:
                conn.execute("CREATE TRIGGER reject_poison BEFORE INSERT ON mutations "
                             f"WHEN NEW.mutation_id = '{POISON_ID}' "
                             "BEGIN SELECT RAISE(ABORT, 'rejected'); END")
            conn.close()
            fake.set_default("ok")
            time.sleep(LEASE_S + 0.2)  # the killed job's lease has expired: claimed at start
            server.start()
            drive_second_run(server.base_url)
            server.stop()
        finally:
            server.kill()
        yield Run(server, api_key)


def test_a_running_server_logs_only_catalogued_events(run: Run, catalogue: dict[str, Documented]) -> None:
    lines = run.lines()
    seen = {line.get("event") for line in lines}
    assert seen - set(catalogue) == set()
    # The scenario did reach the events it was built to provoke.
    assert {"http.request", "upstream.retry", "upstream.failed", "error.unhandled", "error.client",
            "finalize.stage", "finalize.failed", "finalize.completed", "finalize.recovered",
            "finalize.taken_over",
            "session.mutation_failed", "shared_client.created", *SERVER_EVENTS} <= seen


def test_every_line_has_the_common_fields(run: Run, catalogue: dict[str, Documented]) -> None:
    raw = run.server.log_path.read_bytes().splitlines()
    lines = run.lines()
    assert len(lines) == len(raw), "every stdout line is a JSON object"
    # A job claimed from a stopped process runs outside any request (and may be what
    # first creates the shared client).
    claimed = {line["session_id"] for line in lines if line["event"] == "finalize.taken_over"}
    outside = {"shared_client.created"} if claimed else set()
    for line in lines:
        assert isinstance(line.get("timestamp"), str) and line["timestamp"].endswith("Z"), line
        assert line.get("level") == catalogue[line["event"]].level, line
        if (line["event"] not in SERVER_EVENTS | outside
                and line.get("session_id") not in claimed):
            # Request handling and the finalize jobs started by a request.
            assert isinstance(line.get("request_id"), str), line
        if line["event"].startswith(("finalize.", "session.")) and line["event"] != "finalize.recovered":
            assert line.get("session_id"), line


def test_every_line_has_only_catalogued_fields(run: Run, catalogue: dict[str, Documented]) -> None:
    for line in run.lines():
        documented = catalogue[line["event"]].fields | COMMON_FIELDS
        assert set(line) <= documented, (line["event"], set(line) - documented)


def test_the_mutation_failure_carries_its_request_id(run: Run) -> None:
    lines = run.lines()
    failure = next(x for x in lines if x["event"] == "session.mutation_failed")
    assert failure["mutation_id"] == POISON_ID and failure["session_id"] == "after"
    request_line = next(x for x in lines if x["event"] == "http.request"
                        and x.get("request_id") == failure["request_id"])
    assert request_line["status"] == 500 and request_line["session_id"] == "after"


def _values_of(obj: Any, key_pattern: re.Pattern[str]) -> Iterator[Any]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key_pattern.search(str(key)):
                yield value
            yield from _values_of(value, key_pattern)
    elif isinstance(obj, list):
        for value in obj:
            yield from _values_of(value, key_pattern)


def test_no_secret_reaches_the_log(run: Run) -> None:
    text = run.server.raw_logs()  # stdout and stderr, both runs
    assert run.api_key not in text
    assert run.api_key[len("sk-catalogue-"):] not in text
    # An Authorization value would read "Bearer <key>"; "Bearer {" is only ever the source
    # line that builds the header, should a traceback quote it.
    assert re.search(r"Bearer (?!\{)", text) is None
    lines = run.lines()
    # The calls that carried the key did fail and were logged.
    assert any(x["event"] == "upstream.failed" and x["kind"] == "connection" for x in lines)
    assert any(x["event"] == "error.unhandled" and x["error_type"] == "UpstreamError" for x in lines)
    authorization = re.compile("authorization", re.IGNORECASE)
    for line in lines:
        for value in _values_of(line, authorization):
            assert value in ("***", None), line
