"""Bad input sweep: every kind of wrong request is a 4xx problem and changes nothing.

One server, one session ("victim") with a known log. Each case sends one bad request
(malformed JSON, wrong content types, bodies over ``server.max_body_bytes``, deeply
nested JSON, invalid UTF-8, path traversal and overlong ids, wrong types, negative and
reversed times, empty and 501-item batches, bad query parameters, bodies on action
endpoints, wrong methods) and checks that the answer is a 4xx
``application/problem+json`` with the request id, never a 5xx, and that the victim's
state (mutation_count, last_seq, state, speakers, finalize job) is exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from reliability_support import Client, assert_problem, leak_scan, report, utterance
from support import ServerProcess

pytestmark = pytest.mark.reliability

MAX_BODY = 262_144
VICTIM = "victim"
M = f"/v1/sessions/{VICTIM}/mutations"


def _note(i: int) -> dict[str, Any]:
    return {"type": "note", "text": f"note {i}"}


def _utt(**overrides: Any) -> bytes:
    body = {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 10, "text": "x"}
    body.update(overrides)
    return json.dumps({"mutations": [body]}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    raw: bytes | None = None
    content_type: str | None = "application/json"
    statuses: tuple[int, ...] = (400, 404, 405, 413, 415, 422)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


CASES = [
    # malformed JSON
    Case("truncated JSON", "POST", M, b'{"mutations": [{"type": "note", "text": "a"}'),
    Case("single quotes", "POST", M, b"{'mutations': []}"),
    Case("trailing garbage", "POST", M, b'{"mutations": [{"type": "note", "text": "a"}]} xyz'),
    Case("bare word", "POST", M, b"nul"),
    Case("NaN literal", "POST", M, b'{"mutations": [{"type": "utterance", "speaker": "a", '
                                   b'"start_ms": NaN, "end_ms": 1, "text": ""}]}'),
    Case("number overflowing a double", "POST", M,
         _utt(start_ms=0).replace(b'"start_ms": 0', b'"start_ms": 1e400')),
    Case("empty body", "POST", M, b""),
    Case("whitespace body", "POST", M, b"   \n\t "),
    Case("lone surrogate escape", "POST", M, b'{"mutations": [{"type": "note", "text": "\\ud800"}]}'),
    # content types
    Case("text/plain", "POST", M, _json({"mutations": [_note(1)]}), "text/plain"),
    Case("form encoded", "POST", M, b"mutations=1", "application/x-www-form-urlencoded"),
    Case("multipart", "POST", M, b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    Case("xml", "POST", M, b"<mutations/>", "application/xml"),
    Case("octet-stream", "POST", M, _json({"mutations": [_note(1)]}), "application/octet-stream"),
    Case("json with bad charset bytes", "POST", M, b'{"mutations": [{"type": "note", "text": "\xff\xfe"}]}'),
    # invalid UTF-8
    Case("invalid UTF-8 byte", "POST", M, b'{"mutations": [{"type": "note", "text": "caf\xe9"}]}'),
    Case("overlong UTF-8 slash", "POST", M, b'{"mutations": [{"type": "note", "text": "\xc0\xaf"}]}'),
    Case("UTF-8 encoded surrogate", "POST", M, b'{"mutations": [{"type": "note", "text": "\xed\xa0\x80"}]}'),
    Case("UTF-16 body", "POST", M, json.dumps({"mutations": [_note(1)]}).encode("utf-16")),
    # huge and deep
    Case("body just over max_body_bytes", "POST", M,
         _json({"mutations": [{"type": "note", "text": "x" * 19_000}] * 14})),
    Case("5 MB body", "POST", M, b'{"mutations": [' + b'{"type": "note", "text": "a"},' * 180_000 + b"]}"),
    Case("100k nested arrays", "POST", M, b"[" * 100_000 + b"]" * 100_000),
    Case("100k nested objects", "POST", M, b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    Case("deep nesting inside a batch", "POST", M,
         b'{"mutations": [{"type": "note", "text": ' + b"[" * 5_000 + b"]" * 5_000 + b"}]}"),
    # wrong shapes and types
    Case("top-level array", "POST", M, _json([_note(1)])),
    Case("top-level null", "POST", M, b"null"),
    Case("top-level string", "POST", M, b'"mutations"'),
    Case("mutations is an object", "POST", M, _json({"mutations": {"0": _note(1)}})),
    Case("mutations is null", "POST", M, _json({"mutations": None})),
    Case("item is a string", "POST", M, _json({"mutations": ["note"]})),
    Case("unknown type", "POST", M, _json({"mutations": [{"type": "delete_everything"}]})),
    Case("missing type", "POST", M, _json({"mutations": [{"text": "x"}]})),
    Case("unknown field", "POST", M, _json({"mutations": [{**_note(1), "admin": True}]})),
    Case("unknown top-level field", "POST", M, _json({"mutations": [_note(1)], "force": True})),
    Case("start_ms as string", "POST", M, _utt(start_ms="0")),
    Case("start_ms fractional", "POST", M, _utt(start_ms=1.5)),
    Case("start_ms boolean", "POST", M, _utt(start_ms=True)),
    Case("text as number", "POST", M, _utt(text=123)),
    Case("speaker null", "POST", M, _utt(speaker=None)),
    Case("empty speaker", "POST", M, _utt(speaker="")),
    Case("text over 20000 chars", "POST", M, _utt(text="x" * 20_001)),
    Case("id as number", "POST", M, _json({"mutations": [{**_note(1), "id": 7}]})),
    Case("id with a space", "POST", M, _json({"mutations": [{**_note(1), "id": "a b"}]})),
    Case("id with traversal", "POST", M, _json({"mutations": [{**_note(1), "id": "../../etc/passwd"}]})),
    Case("id over 128 chars", "POST", M, _json({"mutations": [{**_note(1), "id": "i" * 129}]})),
    Case("empty note", "POST", M, _json({"mutations": [{"type": "note", "text": ""}]})),
    Case("empty participant name", "POST", M,
         _json({"mutations": [{"type": "participant_joined", "name": ""}]})),
    # times
    Case("negative start", "POST", M, _utt(start_ms=-1)),
    Case("negative end", "POST", M, _utt(start_ms=0, end_ms=-5)),
    Case("reversed times", "POST", M, _utt(start_ms=5_000, end_ms=4_999)),
    Case("start past a week", "POST", M, _utt(start_ms=604_800_001, end_ms=604_800_002)),
    Case("64-bit overflow", "POST", M, _utt(start_ms=2**64, end_ms=2**64)),
    # batch sizes, and all-or-nothing
    Case("empty batch", "POST", M, _json({"mutations": []})),
    Case("501 items", "POST", M, _json({"mutations": [_note(i) for i in range(501)]})),
    Case("499 good + 1 bad", "POST", M,
         _json({"mutations": [_note(i) for i in range(499)] + [{"type": "note", "text": ""}]})),
    Case("1 bad + 499 good", "POST", M,
         _json({"mutations": [{"type": "utterance", "speaker": "s", "start_ms": 9, "end_ms": 1, "text": ""}]
                + [_note(i) for i in range(499)]})),
    # paths and ids
    Case("encoded traversal in session id", "POST", "/v1/sessions/..%2F..%2Fetc%2Fpasswd/mutations",
         _json({"mutations": [_note(1)]})),
    Case("encoded traversal, GET", "GET", "/v1/sessions/..%2F..%2Fetc%2Fpasswd", None, None),
    Case("dot-dot segments", "GET", "/v1/sessions/../../etc/passwd", None, None),
    Case("double-encoded traversal", "GET", "/v1/sessions/%252e%252e%252fetc", None, None),
    Case("victim then traversal", "POST", f"/v1/sessions/{VICTIM}%2F..%2F..%2Fother/mutations",
         _json({"mutations": [_note(1)]})),
    Case("NUL in id", "GET", "/v1/sessions/vic%00tim", None, None),
    Case("65-char id", "POST", "/v1/sessions/" + "a" * 65 + "/mutations", _json({"mutations": [_note(1)]})),
    Case("5000-char id", "GET", "/v1/sessions/" + "a" * 5_000, None, None),
    Case("unicode id", "GET", "/v1/sessions/%E2%80%AEvictim", None, None),
    Case("unknown session", "POST", "/v1/sessions/nobody-here/mutations", _json({"mutations": [_note(1)]})),
    # creating sessions
    Case("create: traversal id", "POST", "/v1/sessions", _json({"session_id": "../victim"})),
    Case("create: 65-char id", "POST", "/v1/sessions", _json({"session_id": "s" * 65})),
    Case("create: id as number", "POST", "/v1/sessions", _json({"session_id": 42})),
    Case("create: participants not a list", "POST", "/v1/sessions", _json({"participants": "Alice"})),
    Case("create: participant without name", "POST", "/v1/sessions", _json({"participants": [{}]})),
    Case("create: 101 participants", "POST", "/v1/sessions",
         _json({"participants": [{"name": f"p{i}"} for i in range(101)]})),
    Case("create: title too long", "POST", "/v1/sessions", _json({"title": "t" * 201})),
    Case("create: unknown field", "POST", "/v1/sessions", _json({"session_id": "ok-id", "owner": "root"})),
    Case("create: existing id", "POST", "/v1/sessions", _json({"session_id": VICTIM}), statuses=(409,)),
    # query parameters
    Case("after negative", "GET", M + "?after=-1", None, None),
    Case("after not a number", "GET", M + "?after=abc", None, None),
    Case("after fractional", "GET", M + "?after=1.5", None, None),
    Case("after huge", "GET", M + "?after=" + "9" * 40, None, None),
    Case("limit zero", "GET", M + "?limit=0", None, None),
    Case("limit over 1000", "GET", M + "?limit=1001", None, None),
    # action endpoints take no body
    Case("finalize with a string body", "POST", f"/v1/sessions/{VICTIM}/finalize", b"now please"),
    Case("finalize with an array", "POST", f"/v1/sessions/{VICTIM}/finalize", b"[]"),
    Case("finalize with a field", "POST", f"/v1/sessions/{VICTIM}/finalize", _json({"force": True})),
    Case("finalize with text/plain", "POST", f"/v1/sessions/{VICTIM}/finalize", b"{}", "text/plain"),
    Case("resolve with a field", "POST", f"/v1/sessions/{VICTIM}/resolve",
         _json({"speakers": {"spk_0": "Eve"}})),
    Case("resolve with malformed JSON", "POST", f"/v1/sessions/{VICTIM}/resolve", b"{"),
    # methods and routes
    Case("DELETE a session", "DELETE", f"/v1/sessions/{VICTIM}", None, None),
    Case("PUT mutations", "PUT", M, _json({"mutations": [_note(1)]})),
    Case("PATCH a session", "PATCH", f"/v1/sessions/{VICTIM}", _json({"state": "open"})),
    Case("unknown route", "GET", "/v1/admin", None, None),
]


@dataclass
class Rig:
    server: ServerProcess
    client: Client


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    server = ServerProcess(tmp_path_factory.mktemp("bad-input"),
                           env={"BALLAST__SERVER__MAX_BODY_BYTES": str(MAX_BODY)})
    with server:
        client = Client(server.base_url)
        assert client.call("POST", "/v1/sessions", {
            "session_id": VICTIM, "participants": [{"name": "Alice"}, {"name": "Bob"}]})[0] == 201
        assert client.call("POST", M, {"mutations": [
            utterance(0, 0, "Hi, I am Alice.", "u0"), utterance(1, 1, "This is Bob.", "u1"),
            {"id": "n0", "type": "note", "text": "kick-off"}]})[0] == 200
        yield Rig(server, client)
    unexpected = [ln for ln in server.logs() if ln.get("event") == "error.unhandled"]
    assert not unexpected, unexpected[:3]


def _state(client: Client) -> tuple[Any, ...]:
    view = client.session(VICTIM)
    rows = client.all_mutations(VICTIM)
    return (view["mutation_count"], view["last_seq"], view["state"], view["speakers"], view["finalize"],
            [(r["seq"], r["id"]) for r in rows])


SEEN: dict[int, int] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request_is_a_problem_and_changes_nothing(rig: Rig, case: Case) -> None:
    client = rig.client
    before = _state(client)
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    status, hdrs, body = client.call(case.method, case.path, raw=case.raw, headers=headers)
    SEEN[status] = SEEN.get(status, 0) + 1
    assert_problem(status, hdrs, body, statuses=case.statuses)
    assert _state(client) == before
    if case.name.startswith("create:"):
        sid = json.loads(case.raw or b"{}").get("session_id") if case.raw else None
        if isinstance(sid, str) and sid != VICTIM:
            assert client.call("GET", f"/v1/sessions/{sid}")[0] in (404,)
    assert not leak_scan(client.seen[-1:]), leak_scan(client.seen[-1:])


async def _chunks(total: int) -> AsyncIterator[bytes]:
    yield b'{"mutations": ['
    sent = 0
    piece = b'{"type": "note", "text": "' + b"c" * 1000 + b'"},'
    while sent < total:
        yield piece
        sent += len(piece)
    yield b'{"type": "note", "text": "end"}]}'


async def _post_chunked(url: str) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, \
            http.post(url, data=_chunks(2 * MAX_BODY), headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def test_chunked_body_over_the_limit(rig: Rig) -> None:
    """No Content-Length to refuse up front: the limit holds while the body streams in."""
    before = _state(rig.client)
    status, headers, body = asyncio.run(_post_chunked(rig.client.base_url + M))
    assert_problem(status, headers, body, statuses={413})
    assert _state(rig.client) == before


def test_a_lying_content_length_is_refused(rig: Rig) -> None:
    """A Content-Length over the limit is refused before the body is read."""
    before = _state(rig.client)
    status, headers, body = _raw_http(
        rig.server.port, b"POST " + M.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(MAX_BODY * 100).encode()
        + b"\r\n\r\n{}")
    assert_problem(status, headers, body, statuses={413})
    assert _state(rig.client) == before


def _posts_to_victim(rig: Rig) -> list[dict[str, Any]]:
    return [ln for ln in rig.server.logs()
            if ln.get("event") == "http.request" and ln.get("path") == M and ln.get("method") == "POST"]


def test_a_body_cut_short_is_not_a_server_error(rig: Rig) -> None:
    """A client that disconnects mid-body is logged as a 4xx, not as an unhandled 500."""
    before = _state(rig.client)
    seen = len(_posts_to_victim(rig))
    probes = [
        b"Content-Length: 100\r\n\r\n" + b'{"mutations": [',
        b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + b'{"mut' + b"\r\n",
    ]
    for probe in probes:
        with socket.create_connection(("127.0.0.1", rig.server.port), timeout=5) as sock:
            sock.sendall(b"POST " + M.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n" + probe)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(4096)  # the server closes: nobody is left to answer
    deadline = time.monotonic() + 5
    cut = _posts_to_victim(rig)[seen:]
    while time.monotonic() < deadline and len(cut) < len(probes):
        time.sleep(0.05)
        cut = _posts_to_victim(rig)[seen:]
    assert [ln["status"] for ln in cut] == [400] * len(probes), cut
    assert not [ln for ln in rig.server.logs() if ln.get("event") == "error.unhandled"]
    assert _state(rig.client) == before


def _raw_http(port: int, data: bytes) -> tuple[int, dict[str, str], Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(rest) >= length:
                    break
    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    try:
        parsed: Any = json.loads(rest)
    except ValueError:
        parsed = rest.decode("latin-1")
    return status, headers, parsed


def test_parser_level_rejections_are_client_errors_without_internals(rig: Rig) -> None:
    """Requests that aiohttp's HTTP parser refuses never reach the app, but stay 4xx.

    A request line over 8190 bytes, a header block too large, or something that is not
    HTTP at all is answered by the connection layer (``ballast.http_server``) before any
    middleware runs: a 4xx problem that echoes nothing, and the connection is closed.
    """
    before = _state(rig.client)
    probes = [
        b"GET /v1/sessions/" + b"a" * 9_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 9_000 + b"\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
    ]
    statuses = []
    for probe in probes:
        status, _, body = _raw_http(rig.server.port, probe)
        statuses.append(status)
        assert 400 <= status < 500, (probe[:40], status, body)
        assert isinstance(body, dict) and body["status"] == status, (probe[:40], body)
        assert b"a" * 100 not in json.dumps(body).encode() and "GARBAGE" not in json.dumps(body)
        text = body if isinstance(body, str) else json.dumps(body)
        for marker in ("Traceback", "/work/", "/home/", "site-packages", ".py"):
            assert marker not in text, (probe[:40], text)
    assert _state(rig.client) == before
    report("bad input: parser-level probes (answered by the connection layer, not the app)",
           [f"statuses={statuses} (problem+json with a request id, nothing echoed)"])


def test_parser_level_rejections_are_problems(rig: Rig) -> None:
    status, headers, body = _raw_http(rig.server.port, b"GARBAGE\r\n\r\n")
    assert_problem(status, headers, body)


def test_the_sweep_figures(rig: Rig) -> None:
    """After the sweep: the victim still works, and the figures are reported."""
    client = rig.client
    before = client.session(VICTIM)
    status, _, body = client.call("POST", M, {"mutations": [{"id": "after", "type": "note", "text": "ok"}]})
    assert status == 200 and body["accepted"][0]["seq"] == before["last_seq"] + 1, body
    report("bad input sweep", [f"{len(CASES)} cases; statuses seen={dict(sorted(SEEN.items()))}; "
                               "victim unchanged after each, and still writable after all"])

