"""The fake upstream must fail exactly as scripted, or every test built on it lies.

Each step kind is checked over a real socket with a plain aiohttp client (or a raw
stream, where the HTTP client would hide what happened), and the separate-process mode
is checked through its admin API.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import (
    INTERNAL_MARKER,
    FakeUpstream,
    FakeUpstreamProcess,
    Step,
    default_responder,
    guess_mapping,
    parse_script,
)

RESOLVE_BODY = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "task: resolve\nReply with JSON."},
        {"role": "user", "content": "Participants:\n- Alice\n- Bob\nTranscript:\n"
                                    "spk_0: hello there\nspk_1: hi, I'm Alice\nspk_0: ok"},
    ],
}
REPORT_BODY = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "task: report\nReply with JSON."},
        {"role": "user", "content": "Transcript:\nAlice: welcome\nBob: I will send the notes"},
    ],
}


async def post(url: str, body: Any = RESOLVE_BODY, *, total_s: float = 5.0,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{url}/chat/completions", json=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=total_s)) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def content_of(body: bytes) -> str:
    content = json.loads(body)["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


# -- step kinds ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_ok_answers_a_chat_completion_from_the_default_responder(fake: FakeUpstream) -> None:
    status, headers, body = await post(fake.base_url, headers={"Authorization": "Bearer k-1"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    payload = json.loads(body)
    assert payload["object"] == "chat.completion"
    assert payload["model"] == "m"
    assert json.loads(content_of(body)) == {"mapping": {"spk_1": "Alice", "spk_0": "Bob"}}
    assert fake.attempts == 1
    [received] = fake.requests
    assert received.headers["authorization"] == "Bearer k-1"
    assert received.json == RESOLVE_BODY
    assert received.path == "/v1/chat/completions"
    assert received.step == Step.ok()
    assert "task: resolve" in received.system_prompt
    assert "spk_0: hello there" in received.user_prompt


@pytest.mark.asyncio
async def test_report_prompts_get_a_report_shaped_reply(fake: FakeUpstream) -> None:
    _, _, body = await post(fake.base_url, REPORT_BODY)
    reply = json.loads(content_of(body))
    assert set(reply) == {"summary", "highlights", "action_items"}
    assert reply["action_items"] == [{"owner": "Bob", "text": "I will send the notes"}]
    assert reply["highlights"] == ["welcome", "I will send the notes"]


@pytest.mark.asyncio
async def test_ok_with_explicit_content_and_custom_responder() -> None:
    async with FakeUpstream(responder=lambda body: {"echo": body["model"]}) as fake:
        fake.script(Step.ok({"mapping": {"a": "b"}}), Step.ok("plain"))
        assert json.loads(content_of((await post(fake.base_url))[2])) == {"mapping": {"a": "b"}}
        assert content_of((await post(fake.base_url))[2]) == "plain"
        assert json.loads(content_of((await post(fake.base_url))[2])) == {"echo": "m"}


@pytest.mark.asyncio
async def test_script_plays_in_order_then_the_default(fake: FakeUpstream) -> None:
    fake.script("503", "503", "ok")
    fake.default = Step.status(500)
    statuses = [(await post(fake.base_url))[0] for _ in range(5)]
    assert statuses == [503, 503, 200, 500, 500]
    assert fake.attempts == 5
    assert [r.attempt for r in fake.requests] == [1, 2, 3, 4, 5]
    assert fake.pending == []


@pytest.mark.asyncio
async def test_status_sends_retry_after_and_a_leaky_body(fake: FakeUpstream) -> None:
    fake.script(Step.status(429, retry_after="1"), Step.status(503))
    status, headers, body = await post(fake.base_url)
    assert status == 429
    assert headers["Retry-After"] == "1"
    text = body.decode()
    assert INTERNAL_MARKER in text
    assert f"127.0.0.1:{fake.port}" in text
    assert INTERNAL_MARKER in headers["X-Internal-Node"]
    status, headers, _ = await post(fake.base_url)
    assert status == 503
    assert "Retry-After" not in headers


@pytest.mark.asyncio
async def test_retry_after_can_be_an_http_date_rendered_when_served(fake: FakeUpstream) -> None:
    fake.script(Step.status(503, retry_after="date+3"), Step.status(503, retry_after=2.5))
    _, headers, _ = await post(fake.base_url)
    when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
    assert 1 <= when - time.time() <= 4
    _, headers, _ = await post(fake.base_url)
    assert headers["Retry-After"] == "2.5"


@pytest.mark.asyncio
async def test_status_with_own_body(fake: FakeUpstream) -> None:
    fake.script(Step.status(400, body="nope"), Step.status(500, body=b'{"e": 1}'))
    status, headers, body = await post(fake.base_url)
    assert (status, body) == (400, b"nope")
    assert headers["Content-Type"].startswith("text/plain")
    status, headers, body = await post(fake.base_url)
    assert (status, body) == (500, b'{"e": 1}')
    assert headers["Content-Type"].startswith("application/json")


@pytest.mark.asyncio
async def test_hang_hangs_past_a_client_timeout(fake: FakeUpstream) -> None:
    fake.script(Step.hang(30))
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await post(fake.base_url, total_s=0.3)
    assert 0.25 <= time.monotonic() - started < 2
    assert fake.attempts == 1


@pytest.mark.asyncio
async def test_short_hang_then_answers(fake: FakeUpstream) -> None:
    fake.script(Step.hang(0.3))
    started = time.monotonic()
    status, _, body = await post(fake.base_url)
    assert time.monotonic() - started >= 0.25
    assert status == 200
    assert "mapping" in json.loads(content_of(body))


@pytest.mark.asyncio
async def test_stop_does_not_wait_for_a_hung_request() -> None:
    fake = FakeUpstream(default=Step.hang())
    await fake.start()
    request = asyncio.create_task(post(fake.base_url, total_s=30))
    await fake.wait_for_attempts(1)
    started = time.monotonic()
    await fake.stop()
    assert time.monotonic() - started < 1.5
    with pytest.raises(aiohttp.ClientError):
        await request


@pytest.mark.asyncio
async def test_reset_resets_the_connection(fake: FakeUpstream) -> None:
    fake.script("reset", "reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(fake.base_url)
    # Below the HTTP client: a TCP reset, not a clean close, and not one byte of response.
    reader, writer = await asyncio.open_connection(fake.host, fake.port)
    payload = json.dumps(RESOLVE_BODY).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert fake.attempts == 2


@pytest.mark.asyncio
async def test_truncated_body_is_cut_json_with_honest_framing(fake: FakeUpstream) -> None:
    fake.script("truncated")
    status, headers, body = await post(fake.base_url)
    assert status == 200
    assert int(headers["Content-Length"]) == len(body)
    assert body.startswith(b'{"id": "chatcmpl-fake-1"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


@pytest.mark.asyncio
async def test_truncated_with_lying_length_breaks_the_read(fake: FakeUpstream) -> None:
    fake.script(Step.truncated(lying_length=True))
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(fake.base_url)


@pytest.mark.asyncio
async def test_malformed_is_not_json(fake: FakeUpstream) -> None:
    fake.script("malformed")
    status, headers, body = await post(fake.base_url)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


@pytest.mark.asyncio
async def test_wrong_shape_is_a_valid_completion_with_unexpected_json(fake: FakeUpstream) -> None:
    fake.script("wrong_shape", Step.wrong_shape("just a string"))
    assert json.loads(content_of((await post(fake.base_url))[2])) == {"foo": 1}
    assert json.loads(content_of((await post(fake.base_url))[2])) == "just a string"


@pytest.mark.asyncio
async def test_not_json_content_is_prose(fake: FakeUpstream) -> None:
    fake.script("not_json_content")
    content = content_of((await post(fake.base_url))[2])
    assert content.startswith("Sure!")
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)


@pytest.mark.asyncio
async def test_slow_body_sends_headers_at_once_and_dribbles_the_body(fake: FakeUpstream) -> None:
    fake.script(Step.slow_body(1.0))
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(f"{fake.base_url}/chat/completions", json=RESOLVE_BODY) as resp:
            headers_after = time.monotonic() - started
            body = await resp.read()
        body_after = time.monotonic() - started
    assert resp.status == 200
    assert headers_after < 0.5
    assert body_after >= 0.9
    assert "mapping" in json.loads(content_of(body))


@pytest.mark.asyncio
async def test_slow_body_trips_a_total_timeout(fake: FakeUpstream) -> None:
    fake.script(Step.slow_body(3))
    with pytest.raises(asyncio.TimeoutError):
        await post(fake.base_url, total_s=0.3)


@pytest.mark.asyncio
async def test_raw_sends_exactly_the_body(fake: FakeUpstream) -> None:
    fake.script(Step.raw('{"choices": []}'))
    assert (await post(fake.base_url))[2] == b'{"choices": []}'


@pytest.mark.asyncio
async def test_unversioned_path_and_reset(fake: FakeUpstream) -> None:
    fake.script("503", "503")
    assert (await post(fake.origin))[0] == 503
    assert fake.requests[0].path == "/chat/completions"
    fake.default = Step.status(500)
    fake.reset()
    assert (fake.attempts, fake.requests, fake.pending) == (0, [], [])
    assert (await post(fake.base_url))[0] == 200


# -- step forms ---------------------------------------------------------------------------


def test_step_text_forms() -> None:
    assert parse_script("503, 429:2 ,ok") == [Step.status(503), Step.status(429, "2"), Step.ok()]
    assert Step.parse("status:503:date+1") == Step.status(503, retry_after="date+1")
    assert Step.parse("hang:1.5") == Step.hang(1.5)
    assert Step.parse("hang") == Step.hang()
    assert Step.parse("slow_body:2") == Step.slow_body(2)
    assert Step.parse("truncated:length") == Step.truncated(lying_length=True)
    for name in ("reset", "malformed", "wrong_shape", "not_json_content", "truncated"):
        assert Step.parse(name).kind == name


def test_step_object_forms_round_trip() -> None:
    steps = [Step.status(503, retry_after="1", body="x"), Step.hang(2), Step.ok({"a": 1}),
             Step.truncated(lying_length=True), Step.raw("{}", code=201)]
    assert parse_script(json.dumps([s.to_json() for s in steps])) == steps


@pytest.mark.parametrize("spec", ["nope", "hang:x", "status", "99", "ok:1", "truncated:x"])
def test_bad_step_forms_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="step"):
        Step.parse(spec)


def test_bad_step_objects_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown step fields"):
        Step.parse({"kind": "ok", "colour": 1})
    with pytest.raises(ValueError, match="kind"):
        Step.parse({"code": 503})


def test_default_responder_prefers_self_introductions() -> None:
    transcript = [("spk_0", "good morning"), ("spk_1", "this is Bob speaking"), ("spk_2", "hm")]
    assert guess_mapping(["Alice", "Bob"], transcript) == {"spk_1": "Bob", "spk_0": "Alice"}
    assert default_responder({"messages": []}) == {"reply": "ok"}


# -- the separate process -----------------------------------------------------------------


def http(method: str, url: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_process_mode_plays_the_cli_script_and_serves_the_admin_api() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fake_upstream.py")),
         "--port", "0", "--script", "503:1,503,ok"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 10)[0], "the fake did not start"
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "fake_upstream.ready"
        url = ready["base_url"]
        assert url == f"http://127.0.0.1:{ready['port']}/v1"
        completions = f"{url}/chat/completions"
        first = http("POST", completions, RESOLVE_BODY)
        assert (first[0], first[1]["Retry-After"]) == (503, "1")
        assert [http("POST", completions, RESOLVE_BODY)[0] for _ in range(3)] == [503, 200, 200]
        origin = url.removesuffix("/v1")
        assert json.loads(http("GET", f"{origin}/_admin/stats")[2])["attempts"] == 4
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_process_helper_scripts_counts_records_and_resets() -> None:
    with FakeUpstreamProcess(script=["500"]) as fake:
        completions = f"{fake.base_url}/chat/completions"
        assert http("POST", completions, RESOLVE_BODY)[0] == 500
        fake.script(Step.status(429, retry_after="2"), "ok")
        status, headers, _ = http("POST", completions, RESOLVE_BODY,
                                  headers={"Authorization": "Bearer secret-1"})
        assert (status, headers["Retry-After"]) == (429, "2")
        assert http("POST", completions, REPORT_BODY)[0] == 200
        assert fake.attempts == 3
        assert fake.stats()["pending"] == 0
        recorded = fake.requests()
        assert recorded[1]["headers"]["Authorization"] == "Bearer secret-1"
        assert recorded[2]["json"] == REPORT_BODY
        assert recorded[1]["step"] == {"kind": "status", "code": 429, "retry_after": "2"}
        fake.set_default("503")
        assert http("POST", completions, RESOLVE_BODY)[0] == 503
        fake.reset()
        assert fake.stats() == {"attempts": 0, "redirected": 0, "pending": 0, "default": {"kind": "ok"}}
        assert http("POST", completions, RESOLVE_BODY)[0] == 200


def test_admin_api_rejects_bad_scripts() -> None:
    with FakeUpstreamProcess() as fake:
        status, _, body = http("POST", f"{fake.origin}/_admin/script", ["bogus"])
        assert status == 400
        assert "bogus" in json.loads(body)["error"]
        status, _, _ = http("POST", f"{fake.origin}/_admin/script",
                            {"steps": ["hang:0.1"], "default": "reset"})
        assert status == 200
        assert fake.stats()["default"] == {"kind": "reset"}


def test_huge_and_redirect_steps_parse() -> None:
    assert Step.parse("huge:1000") == Step.huge(1000)
    assert Step.parse("huge:1000:length") == Step.huge(1000, lying_length=True)
    assert Step.parse("redirect:308") == Step.redirect("/redirected", 308)
    assert Step.parse("redirect") == Step.redirect("/redirected", 307)
    assert Step.parse(Step.huge(5).to_json()) == Step.huge(5)
    with pytest.raises(ValueError):
        Step.redirect("/x", 200)
    with pytest.raises(ValueError):
        Step.parse("huge")


@pytest.mark.parametrize("declared", [False, True])
async def test_a_huge_body_is_whitespace_then_a_valid_completion(declared: bool) -> None:
    async with FakeUpstream() as fake, aiohttp.ClientSession() as http:
        fake.script(Step.huge(300_000, lying_length=declared))
        async with http.post(fake.base_url + "/chat/completions", json={}) as resp:
            assert (resp.content_length is not None) is declared
            raw = await resp.read()
    assert len(raw) > 300_000 and raw[:300_000].strip() == b""
    assert json.loads(raw)["choices"][0]["message"]["content"]


async def test_a_redirect_names_its_location_and_the_fake_counts_followers() -> None:
    async with FakeUpstream() as fake, aiohttp.ClientSession() as http:
        fake.script("redirect:307")
        async with http.post(fake.base_url + "/chat/completions", json={}, allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (307, "/redirected")
        fake.script("redirect:307")
        async with http.post(fake.base_url + "/chat/completions", json={}) as resp:
            assert resp.status == 200  # aiohttp follows by default: the fake sees it
        assert (fake.attempts, fake.redirected) == (2, 1)
