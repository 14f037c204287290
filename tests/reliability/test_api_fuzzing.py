"""API fuzzing: schemathesis against the running server's own ``/openapi.json``, plus
property tests of the mutation endpoint and the error sanitizer.

* Every operation in the schema is fuzzed in positive mode (schema-valid input: it must
  be accepted, or refused with a status the schema declares) and negative mode
  (schema-invalid input: it must be rejected with a 4xx). On every response: no 5xx,
  status code, content type, headers and body conform to the schema, every error is a
  problem with the request id, and nothing internal leaks. Path parameters are both
  generated and pinned to real sessions, so the fuzzer gets past "404 no such session".
* Any JSON value POSTed as a mutation batch is either accepted whole (200, every item
  applied once, seqs contiguous) or rejected with a 4xx problem and nothing changed;
  the server's verdict matches the request model's.
* Any exception, with any message, raised below the error sanitizer reaches the client
  as a generic problem: its text and type name never leak.

Example counts: ``EXAMPLES`` per operation, mode and path-parameter source (more with
``BALLAST_HEAVY=1``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from reliability_support import Client, assert_problem, header, leaks, report, scale, utterance
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from support import ServerProcess

from ballast.errors import (
    BallastError,
    BudgetExceeded,
    ClientError,
    Conflict,
    NotFound,
    StoreError,
    UpstreamError,
)
from ballast.plugins.error_sanitizer import sanitizer
from ballast.sessions.models import MutationBatch

pytestmark = pytest.mark.reliability

EXAMPLES = scale(40, 300)
PROPERTY_EXAMPLES = scale(150, 1500)
SANITIZER_EXAMPLES = scale(200, 2000)

#: Every operation the schema must describe (method and path, as schemathesis labels them).
OPERATIONS = [
    "POST /v1/sessions",
    "GET /v1/sessions",
    "GET /v1/sessions/{session_id}",
    "POST /v1/sessions/{session_id}/mutations",
    "GET /v1/sessions/{session_id}/mutations",
    "POST /v1/sessions/{session_id}/resolve",
    "POST /v1/sessions/{session_id}/finalize",
    "GET /v1/sessions/{session_id}/finalize",
    "GET /v1/sessions/{session_id}/report",
    "GET /healthz",
    "GET /readyz",
]

#: The checks run on every response; the last two only in their own mode.
COMMON_CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
                 "response_headers_conformance", "response_schema_conformance"]

FUZZ_COUNTS: dict[str, Counter[int]] = {}


@dataclass
class Api:
    server: ServerProcess
    schema: Any
    client: Client
    pinned: dict[str, str] = field(default_factory=dict)  # operation label -> session id


def _finalized_session(client: Client, sid: str) -> None:
    assert client.call("POST", "/v1/sessions", {
        "session_id": sid, "participants": [{"name": "Alice"}, {"name": "Bob"}]})[0] == 201
    assert client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": [
        utterance(0, 0, "Hello, I'm Alice."), utterance(1, 1, "This is Bob.")]})[0] == 200
    assert client.call("POST", f"/v1/sessions/{sid}/finalize")[0] == 202
    assert client.poll_job(sid)["state"] == "succeeded"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = ServerProcess(tmp_path_factory.mktemp("fuzz"))
    with server:
        client = Client(server.base_url)
        schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
        pinned: dict[str, str] = {}
        for n, label in enumerate(OPERATIONS):
            if "{session_id}" not in label:
                continue
            sid = f"pinned-{n}"
            if label.endswith("/report") or label == "GET /v1/sessions/{session_id}/finalize":
                _finalized_session(client, sid)
            else:
                assert client.call("POST", "/v1/sessions", {
                    "session_id": sid, "participants": [{"name": "Alice"}]})[0] == 201
                assert client.call("POST", f"/v1/sessions/{sid}/mutations", {"mutations": [
                    utterance(0, 0, "Hello, I'm Alice.")]})[0] == 200
            pinned[label] = sid
        yield Api(server, schema, client, pinned)
    unhandled = [ln for ln in server.logs() if ln.get("event") == "error.unhandled"]
    assert not unhandled, f"the server logged unhandled errors: {unhandled[:3]}"
    if FUZZ_COUNTS:
        total = sum(sum(c.values()) for c in FUZZ_COUNTS.values())
        rows = [f"{key:<58} n={sum(c.values()):>4}  " + " ".join(f"{s}:{k}" for s, k in sorted(c.items()))
                for key, c in sorted(FUZZ_COUNTS.items())]
        report(f"schemathesis: {total} generated requests, up to {EXAMPLES} examples per "
               "operation x mode x path source (statuses seen)", rows)


def test_schema_describes_every_operation(api: Api) -> None:
    labels = {result.ok().label for result in api.schema.get_all_operations()}
    assert labels == set(OPERATIONS), "update OPERATIONS (and what the fuzzer pins) to match the API"


def _operation(api: Api, label: str) -> Any:
    for result in api.schema.get_all_operations():
        op = result.ok()
        if op.label == label:
            return op
    raise AssertionError(f"{label} is not in the schema")


def _only_forward_utterances(case: Any) -> None:
    """``end_ms >= start_ms`` is a cross-field rule that JSON Schema cannot state.

    The schema documents it in prose; positive examples are made to follow it, and the
    bad-input sweep checks that breaking it is a 422.
    """
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("mutations"), list):
        return
    for item in body["mutations"]:
        if not isinstance(item, dict) or item.get("type") != "utterance":
            continue
        start, end = item.get("start_ms"), item.get("end_ms")
        if isinstance(start, int | float) and isinstance(end, int | float) and end < start:
            item["start_ms"], item["end_ms"] = end, start


def _own_checks(response: Any) -> list[str]:
    """What every answer must be, beyond the schema: request id, problems, no leaks."""
    out = []
    headers = {name: values[0] for name, values in response.headers.items() if values}  # lowercase keys
    rid = headers.get("x-request-id")
    if not rid:
        out.append("no X-Request-ID header")
    if response.status_code >= 400:
        ctype = headers.get("content-type", "")
        if not ctype.startswith("application/problem+json"):
            out.append(f"{response.status_code} is not a problem: {ctype}")
        else:
            body = response.json()
            if body.get("request_id") != rid or body.get("status") != response.status_code:
                out.append(f"problem body does not match the response: {body}")
    hits = leaks(response.text)
    if hits:
        out.append(f"leaked {hits}")
    return out


def _fuzzer(api: Api, label: str, mode: GenerationMode, source: str, strategy: Any, checks: list[Any],
            counts: Counter[int], failures: list[str]) -> Any:
    """One hypothesis run over ``strategy``: call, validate, count; failures are collected."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        if mode == GenerationMode.POSITIVE:
            _only_forward_utterances(case)
        response = case.call(base_url=api.server.base_url, timeout=30)
        counts[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except BaseExceptionGroup as group:  # schemathesis's FailureGroup
            failures.append(str(group)[:2000])
        except AssertionError as exc:
            failures.append(str(exc)[:2000])
        failures.extend(f"{label} [{source}]: {p}" for p in _own_checks(response))

    return run


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz(api: Api, label: str, mode: GenerationMode) -> None:
    op = _operation(api, label)
    load_all_checks()
    names = COMMON_CHECKS + (["positive_data_acceptance"] if mode == GenerationMode.POSITIVE
                             else ["negative_data_rejection"])
    checks = CHECKS.get_by_names(names)
    sources: list[tuple[str, Any]] = [("generated ids", op.as_strategy(generation_mode=mode))]
    if label in api.pinned:
        sources.append(("pinned id", op.as_strategy(generation_mode=mode,
                                                    path_parameters={"session_id": api.pinned[label]})))
    failures: list[str] = []
    for source, strategy in sources:
        counts: Counter[int] = Counter()
        run = _fuzzer(api, label, mode, source, strategy, checks, counts, failures)
        try:
            run()
        except Unsatisfiable:
            # Nothing to generate (negative mode of an operation without input): the
            # operation takes no input that could be wrong.
            assert mode == GenerationMode.NEGATIVE
        FUZZ_COUNTS[f"{label} {mode.value} [{source}]"] = counts
    assert not failures, f"{len(failures)} failing examples; first ones:\n" + "\n\n".join(failures[:3])


# ------------------------------------------------------------------------------ mutation batches

_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
_IDS = st.sampled_from([f"p{i}" for i in range(30)] + ["bad id", "", "x" * 129, "ok.id:1-2"])
_MS = st.integers(min_value=-5, max_value=3_000) | st.sampled_from(
    [0, 604_800_000, 604_800_001, 1.0, 2.5, "7", True])
_TEXT = st.text(max_size=30) | st.sampled_from(["", "x" * 20_001])


def _with_id(draw_id: Any, body: dict[str, Any]) -> dict[str, Any]:
    return body if draw_id is None else {"id": draw_id, **body}


@st.composite
def _mutation(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["utterance", "note", "participant_joined", "participant_left",
                                 "speaker_renamed", "junk"]))
    mid = draw(st.none() | _IDS)
    if kind == "utterance":
        start = draw(_MS)
        body: dict[str, Any] = {"type": kind, "speaker": draw(st.sampled_from(["spk_0", "spk_1", ""])),
                                "start_ms": start, "end_ms": draw(_MS), "text": draw(_TEXT)}
    elif kind == "note":
        body = {"type": kind, "text": draw(_TEXT)}
    elif kind == "speaker_renamed":
        body = {"type": kind, "speaker": "spk_0", "name": draw(_TEXT)}
    elif kind == "junk":
        return draw(JSON_VALUES)
    else:
        body = {"type": kind, "name": draw(_TEXT)}
    body = _with_id(mid, body)
    corruption = draw(st.sampled_from(["none", "none", "none", "drop", "extra", "retype"]))
    if corruption == "drop" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    elif corruption == "extra":
        body[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    elif corruption == "retype":
        body[draw(st.sampled_from(sorted(body)))] = draw(JSON_VALUES)
    return body


@st.composite
def _valid_mutation(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["utterance", "utterance", "note", "participant_joined",
                                 "participant_left", "speaker_renamed"]))
    name = draw(st.text(min_size=1, max_size=20))
    if kind == "utterance":
        start = draw(st.integers(min_value=0, max_value=100_000))
        body: dict[str, Any] = {"type": kind, "speaker": draw(st.sampled_from(["spk_0", "spk_1"])),
                                "start_ms": start, "end_ms": start + draw(st.integers(0, 5_000)),
                                "text": draw(st.text(max_size=40))}
    elif kind == "note":
        body = {"type": kind, "text": name}
    elif kind == "speaker_renamed":
        body = {"type": kind, "speaker": "spk_0", "name": name}
    else:
        body = {"type": kind, "name": name}
    return _with_id(draw(st.none() | st.sampled_from([f"p{i}" for i in range(30)])), body)


BATCHES = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"mutations": JSON_VALUES}),
    st.fixed_dictionaries({"mutations": st.lists(_valid_mutation(), min_size=1, max_size=8)}),
    st.fixed_dictionaries({"mutations": st.lists(_valid_mutation() | _mutation(), max_size=8)}),
    st.fixed_dictionaries({"mutations": st.lists(_valid_mutation(), max_size=8)},
                          optional={"extra": JSON_VALUES}),
)


@dataclass
class BatchStats:
    accepted: int = 0
    rejected: Counter[int] = field(default_factory=Counter)
    applied: int = 0
    duplicates: int = 0


BATCH_STATS = BatchStats()


def _model_accepts(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    try:
        MutationBatch.model_validate(value)
    except ValidationError:
        return False
    return True


def test_any_json_batch_is_all_or_nothing(api: Api) -> None:
    client = api.client
    sid = "prop-batches"
    assert client.call("POST", "/v1/sessions", {"session_id": sid})[0] == 201
    known: dict[str, int] = {}  # mutation id -> seq, as acknowledged

    @settings(max_examples=PROPERTY_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(value=BATCHES)
    def prop(value: Any) -> None:
        before = client.session(sid)
        raw = json.dumps(value).encode()
        status, headers, body = client.call("POST", f"/v1/sessions/{sid}/mutations", raw=raw)
        after = client.session(sid)
        assert status < 500, body
        if status != 200:
            BATCH_STATS.rejected[status] += 1
            assert_problem(status, headers, body, statuses={400, 413, 415, 422})
            assert after["mutation_count"] == before["mutation_count"]
            assert after["last_seq"] == before["last_seq"]
            assert not _model_accepts(json.loads(raw)), f"a valid batch was refused: {body}"
            return
        BATCH_STATS.accepted += 1
        assert _model_accepts(json.loads(raw)), f"an invalid batch was accepted: {value!r}"
        sent = value["mutations"]
        accepted = body["accepted"]
        assert [a["id"] for a in accepted] == [m.get("id") for m in sent]
        new = [a for a in accepted if not a["duplicate"]]
        first = before["last_seq"] + 1
        assert [a["seq"] for a in new] == list(range(first, first + len(new)))
        assert body["last_seq"] == after["last_seq"] == before["last_seq"] + len(new)
        assert after["mutation_count"] == before["mutation_count"] + len(new)
        for a in accepted:
            if a["duplicate"]:
                assert a["id"] is not None and known.get(a["id"]) == a["seq"], (a, known.get(a["id"]))
            elif a["id"] is not None:
                known[a["id"]] = a["seq"]
        BATCH_STATS.applied += len(new)
        BATCH_STATS.duplicates += len(accepted) - len(new)
        rows = client.all_mutations(sid)[before["last_seq"]:]
        assert [r["seq"] for r in rows] == [a["seq"] for a in new]

    prop()
    total = BATCH_STATS.accepted + sum(BATCH_STATS.rejected.values())
    report("property: any JSON value as a mutation batch", [
        f"examples={total} accepted={BATCH_STATS.accepted} "
        f"rejected={dict(sorted(BATCH_STATS.rejected.items()))}",
        f"mutations applied={BATCH_STATS.applied} answered as duplicates={BATCH_STATS.duplicates}",
    ])
    assert BATCH_STATS.accepted > 0 and BATCH_STATS.rejected, "the strategy no longer reaches both outcomes"


# ------------------------------------------------------------------------------ the sanitizer

SECRET = "s3cr3t-internal-detail"


def _leaky_exception(name: str, message: str, kind: str) -> BaseException:
    text = f"{SECRET} {message} at /srv/app/internal.py line 42"
    if kind == "custom":
        cls: type[Exception] = type(f"Leaky{name}Error", (Exception,), {})
        return cls(text)
    if kind == "typed5xx":
        return UpstreamError(kind="status", internal=text)
    if kind == "typed4xx":
        return NotFound(internal=text)
    if kind == "store":
        return StoreError(internal=text)
    if kind == "budget":
        return BudgetExceeded(internal=text)
    if kind == "conflict":
        return Conflict(internal=text)
    if kind == "client":
        return ClientError(internal=text)
    if kind == "http":
        return web.HTTPBadGateway(text=text)
    builtin: dict[str, type[Exception]] = {"value": ValueError, "key": KeyError, "os": OSError,
                                           "runtime": RuntimeError, "type": TypeError,
                                           "timeout": TimeoutError, "zero": ZeroDivisionError}
    return builtin[kind](text)


KINDS = ["custom", "typed5xx", "typed4xx", "store", "budget", "conflict", "client", "http",
         "value", "key", "os", "runtime", "type", "timeout", "zero", "plain_response"]
SANITIZER_COUNTS: Counter[int] = Counter()


def test_sanitizer_never_leaks_exception_text() -> None:
    middleware = sanitizer()

    async def through(exc: BaseException | None, message: str) -> web.StreamResponse:
        async def handler(request: web.Request) -> web.StreamResponse:
            if exc is None:  # a handler that returns its own error page
                return web.Response(status=500, text=f"{SECRET} {message}")
            raise exc

        return await middleware(make_mocked_request("POST", "/v1/sessions/x/mutations"), handler)

    @settings(max_examples=SANITIZER_EXAMPLES, deadline=None, database=None)
    @given(name=st.from_regex(r"[A-Z][a-z]{2,10}", fullmatch=True), message=st.text(max_size=200),
           kind=st.sampled_from(KINDS))
    def prop(name: str, message: str, kind: str) -> None:
        exc = None if kind == "plain_response" else _leaky_exception(name, message, kind)
        other = None if exc is None else _leaky_exception("Other", "something else", kind)
        with structlog.testing.capture_logs() as logged:
            response = asyncio.run(through(exc, message))
            baseline = asyncio.run(through(other, "something else"))
        assert isinstance(response, web.Response) and response.body is not None
        text = bytes(response.body).decode()  # type: ignore[arg-type]
        SANITIZER_COUNTS[response.status] += 1
        assert response.status >= 400
        assert response.content_type == "application/problem+json"
        problem = json.loads(text)
        assert problem["status"] == response.status
        assert SECRET not in text and "internal.py" not in text and "/srv/" not in text
        # The strongest form: the body does not depend on the error's text or type name
        # at all; the same kind of error with other words gives the very same body.
        assert isinstance(baseline, web.Response) and baseline.body is not None
        assert bytes(baseline.body) == bytes(response.body), (text, baseline.body)  # type: ignore[arg-type]
        if exc is not None:
            if not isinstance(exc, BallastError):  # a typed error's title is public by design
                assert type(exc).__name__ not in text
            if response.status >= 500 and not isinstance(exc, web.HTTPException):
                # Server-side, the whole story is logged (an HTTPException a handler
                # raises on purpose is an answer, not an unhandled error).
                entry = next(e for e in logged if e["event"] == "error.unhandled")
                assert SECRET in str(entry["error"]) and "Traceback" in entry["traceback"]

    prop()
    report("property: exceptions through the error sanitizer", [
        f"examples={sum(SANITIZER_COUNTS.values())} statuses={dict(sorted(SANITIZER_COUNTS.items()))}; "
        "no message, secret, path or exception type reached a client"])


def test_the_server_is_healthy_after_the_fuzzing(api: Api) -> None:
    started = time.monotonic()
    status, headers, _ = api.client.call("GET", "/healthz")
    assert status == 200 and header(headers, "X-Request-ID")
    assert time.monotonic() - started < 1.0
    for sid in api.pinned.values():
        view = api.client.session(sid)
        rows = api.client.all_mutations(sid)
        assert (view["mutation_count"], view["last_seq"]) == (len(rows), len(rows))
