"""The session API as its clients use it: people not labels, listing, waiting on finalize.

Black-box against real ``ballast serve`` processes on loopback with real SQLite files;
the openai provider talks to the fake upstream, whose scripted hangs make a finalize job
last as long as a test needs. Timing assertions are loose on purpose: they check which
state comes back and in what order, not how fast.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstreamProcess, Step
from support import ServerProcess, request

# The conversation: Alice's microphone drops and she comes back as spk_2.
# Alice talks 4,000 + 2,900 = 6,900 ms of 9,000 ms (77 %), Bob 2,100 ms.
CONVERSATION = [
    {"type": "utterance", "speaker": "spk_0", "start_ms": 0, "end_ms": 4000,
     "text": "Hi everyone, I'm Alice. Let's go through the launch budget today."},
    {"type": "utterance", "speaker": "spk_1", "start_ms": 4000, "end_ms": 6100,
     "text": "Bob here. The budget looks fine to me."},
    {"type": "utterance", "speaker": "spk_2", "start_ms": 6100, "end_ms": 9000,
     "text": "Alice again here, my microphone dropped. I will send the launch budget."},
]
PEOPLE = [{"name": "Alice"}, {"name": "Bob"}]


def _session(base: str, sid: str, *extra: dict[str, Any]) -> None:
    status, _, body = request("POST", f"{base}/v1/sessions", {"session_id": sid, "participants": PEOPLE})
    assert status == 201, body
    status, _, body = request("POST", f"{base}/v1/sessions/{sid}/mutations",
                              {"mutations": [*CONVERSATION, *extra]})
    assert status == 200, body


def _finalize_and_wait(base: str, sid: str) -> dict[str, Any]:
    status, _, body = request("POST", f"{base}/v1/sessions/{sid}/finalize")
    assert status == 202, body
    status, _, body = request("GET", f"{base}/v1/sessions/{sid}/finalize?wait=30", timeout=40)
    assert status == 200, body
    job: dict[str, Any] = body["job"]
    assert job["state"] == "succeeded", job
    status, _, report = request("GET", f"{base}/v1/sessions/{sid}/report")
    assert status == 200, report
    return dict(report)


def _rename(base: str, sid: str, label: str, name: str) -> None:
    status, _, body = request("POST", f"{base}/v1/sessions/{sid}/mutations", {"mutations": [
        {"type": "speaker_renamed", "speaker": label, "name": name}]})
    assert status == 200, body


def _named_turns(report: dict[str, Any]) -> list[str | None]:
    return [e["name"] for e in report["timeline"] if e["kind"] == "turn"]


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with ServerProcess(tmp_path_factory.mktemp("builtin")) as server:
        yield server


# --------------------------------------------------------------------------- people


def test_a_person_under_two_labels_is_counted_once(builtin_server: ServerProcess) -> None:
    base = builtin_server.base_url
    _session(base, "alice-twice")
    status, _, body = request("POST", f"{base}/v1/sessions/alice-twice/resolve")
    assert status == 200, body
    # Resolve names spk_0 and spk_1; "Alice again here" cannot take a name already guessed.
    assert body["speakers"] == {"spk_0": "Alice", "spk_1": "Bob"}
    _rename(base, "alice-twice", "spk_2", "Alice")

    report = _finalize_and_wait(base, "alice-twice")
    alice, bob = report["speakers"]
    assert (alice["name"], alice["labels"], alice["talk_time_ms"]) == ("Alice", ["spk_0", "spk_2"], 6900)
    assert round(alice["talk_share"] * 100) == 77
    assert (bob["name"], bob["labels"], bob["talk_time_ms"]) == ("Bob", ["spk_1"], 2100)
    assert report["stats"]["speaker_count"] == 2
    summary = report["summary"]
    assert "2 speakers" in summary and "Alice and Bob" in summary
    assert "Alice spoke the most (6 s, 77% of talk time)" in summary
    assert "spk_" not in summary
    # Bob's turn splits Alice's two; each of her turns is hers whatever the label.
    assert _named_turns(report) == ["Alice", "Bob", "Alice"]
    assert all(not h.startswith("spk_") for h in report["highlights"])
    assert {item["owner"] for item in report["action_items"]} <= {"Alice", "Bob", None}
    assert report["speaker_naming"] == {"state": "complete", "inferred": {}}


def test_finalize_names_speakers_without_a_resolve(builtin_server: ServerProcess) -> None:
    base = builtin_server.base_url
    _session(base, "no-resolve")
    _rename(base, "no-resolve", "spk_2", "Alice")  # the client knows only the new label
    report = _finalize_and_wait(base, "no-resolve")
    assert [(s["name"], s["labels"], s["talk_time_ms"]) for s in report["speakers"]] == [
        ("Alice", ["spk_0", "spk_2"], 6900), ("Bob", ["spk_1"], 2100)]
    assert report["speaker_naming"] == {"state": "complete",
                                        "inferred": {"spk_0": "Alice", "spk_1": "Bob"}}
    assert "Alice and Bob" in report["summary"] and "spk_" not in report["summary"]
    # Inferred names are the report's: the session's own speakers stay what the client set.
    status, _, session = request("GET", f"{base}/v1/sessions/no-resolve")
    assert status == 200 and session["speakers"] == {"spk_2": "Alice"}


def test_finalize_never_overrides_a_name_the_client_set(builtin_server: ServerProcess) -> None:
    base = builtin_server.base_url
    _session(base, "robert")
    _rename(base, "robert", "spk_1", "Robert")  # although he says "Bob here"
    report = _finalize_and_wait(base, "robert")
    names = {s["name"]: s["labels"] for s in report["speakers"]}
    assert names["Robert"] == ["spk_1"]
    assert "Bob" not in names
    # spk_0 is Alice by her introduction; spk_2's "Alice again" cannot take a guessed name.
    assert names["Alice"] == ["spk_0"]
    assert report["speaker_naming"]["state"] == "partial"
    assert report["speaker_naming"]["inferred"] == {"spk_0": "Alice"}


def test_openai_reports_people_and_says_when_naming_failed(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake:
        config = (f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\n'
                  'model = "m"\n[plugins.retry]\nattempts = 1\n')
        with ServerProcess(tmp_path, config) as server:
            base = server.base_url
            _session(base, "o1")
            _rename(base, "o1", "spk_2", "Alice")
            fake.script("503")  # reconcile's naming call fails; the report call succeeds
            report = _finalize_and_wait(base, "o1")
            assert report["speaker_naming"] == {"state": "unavailable", "inferred": {}}
            assert [(s["speaker"], s["name"], s["labels"]) for s in report["speakers"]] == [
                ("spk_0", None, ["spk_0"]), ("spk_2", "Alice", ["spk_2"]), ("spk_1", None, ["spk_1"])]
            warned = [line for line in server.logs() if line["event"] == "finalize.naming_unavailable"]
            assert [(w["session_id"], w["unnamed"]) for w in warned] == [("o1", 2)]

            # With the model answering, its names merge with the client's into people.
            _session(base, "o2")
            _rename(base, "o2", "spk_2", "Alice")
            report = _finalize_and_wait(base, "o2")
            assert [(s["name"], s["labels"], s["talk_time_ms"]) for s in report["speakers"]] == [
                ("Alice", ["spk_0", "spk_2"], 6900), ("Bob", ["spk_1"], 2100)]
            prompts = [r["json"]["messages"][1]["content"] for r in fake.requests()
                       if "task: report" in r["json"]["messages"][0]["content"]]
            transcript = prompts[-1].split("Transcript:\n", 1)[1]
            assert "spk_" not in transcript and transcript.startswith("Alice: ")


# --------------------------------------------------------------------------- listing


def test_listing_pages_through_every_session_once_in_creation_order(tmp_path: Path) -> None:
    with ServerProcess(tmp_path) as server:
        base = server.base_url
        created = [f"s{(i * 37) % 120:03d}" for i in range(120)]  # not alphabetical
        for sid in created:
            assert request("POST", f"{base}/v1/sessions", {"session_id": sid})[0] == 201
        status, _, first = request("GET", f"{base}/v1/sessions")
        assert status == 200 and len(first["sessions"]) == 50  # the default limit

        seen: list[str] = []
        pages: list[int] = []
        after: str | None = None
        while True:
            query = "limit=50" + (f"&after={after}" if after else "")
            status, _, page = request("GET", f"{base}/v1/sessions?{query}")
            assert status == 200, page
            pages.append(len(page["sessions"]))
            seen.extend(s["session_id"] for s in page["sessions"])
            assert all(s["state"] == "open" and s["finalize"] is None for s in page["sessions"])
            after = page["next_after"]
            if after is None:
                break
        assert pages == [50, 50, 20]
        assert seen == created
        # Past the last session: an empty page ends it.
        status, _, page = request("GET", f"{base}/v1/sessions?after={created[-1]}")
        assert (status, page) == (200, {"sessions": [], "next_after": None})

        for bad, expected in (("limit=0", 400), ("limit=201", 400), ("limit=x", 400),
                              ("after=no%20such", 400), ("after=never-created", 404)):
            status, headers, problem = request("GET", f"{base}/v1/sessions?{bad}")
            assert status == expected, (bad, problem)
            assert headers["Content-Type"].startswith("application/problem+json")
            assert problem["detail"]


def test_listing_shows_each_sessions_job(builtin_server: ServerProcess) -> None:
    base = builtin_server.base_url
    _session(base, "listed-done")
    _finalize_and_wait(base, "listed-done")
    _session(base, "listed-open")
    status, _, page = request("GET", f"{base}/v1/sessions?limit=200")
    assert status == 200
    by_id = {s["session_id"]: s for s in page["sessions"]}
    assert list(by_id).index("listed-done") < list(by_id).index("listed-open")
    assert (by_id["listed-done"]["state"], by_id["listed-done"]["finalize"]["state"]) == (
        "finalized", "succeeded")
    assert (by_id["listed-open"]["state"], by_id["listed-open"]["finalize"]) == ("open", None)


# --------------------------------------------------------------------------- waiting


def test_wait_answers_when_the_job_ends_or_when_the_wait_is_over(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake:
        config = (f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\nmodel = "m"\n'
                  "timeout_ms = 60000\n")
        with ServerProcess(tmp_path, config) as server:
            base = server.base_url
            # Every label named: the job's only upstream call is the report's.
            _session(base, "w1", *[{"type": "speaker_renamed", "speaker": f"spk_{i}", "name": n}
                                   for i, n in enumerate(["Alice", "Bob", "Alice"])])
            fake.set_default("hang:1")
            started = time.monotonic()
            status, _, body = request("POST", f"{base}/v1/sessions/w1/finalize")
            assert status == 202
            assert body["job"]["state"] == "running"
            assert body["job"]["budget_ms"] == 120_000  # known from the first answer
            status, _, body = request("GET", f"{base}/v1/sessions/w1/finalize?wait=10", timeout=20)
            answered = time.monotonic() - started
            assert status == 200 and body["job"]["state"] == "succeeded", body
            # Answered at the job's end (~1 s in), well before the 10 s were up.
            assert 0.9 <= answered < 6, answered
            assert answered - body["job"]["elapsed_ms"] / 1000 < 3

            # wait=1 on a job that runs for 5 s: answered after the second, still running.
            _session(base, "w2", *[{"type": "speaker_renamed", "speaker": f"spk_{i}", "name": n}
                                   for i, n in enumerate(["Alice", "Bob", "Alice"])])
            fake.set_default("hang:5")
            assert request("POST", f"{base}/v1/sessions/w2/finalize")[0] == 202
            t0 = time.monotonic()
            status, _, body = request("GET", f"{base}/v1/sessions/w2/finalize?wait=1", timeout=20)
            waited = time.monotonic() - t0
            assert status == 200 and body["job"]["state"] == "running", body
            assert 0.9 <= waited < 4.5, waited
            # wait=0 answers at once; then a long wait sees the end.
            status, _, body = request("GET", f"{base}/v1/sessions/w2/finalize?wait=0")
            assert status == 200 and body["job"]["state"] == "running"
            status, _, body = request("GET", f"{base}/v1/sessions/w2/finalize?wait=30", timeout=40)
            assert status == 200 and body["job"]["state"] == "succeeded"
            # A finished job is answered at once, whatever the wait.
            t0 = time.monotonic()
            status, _, body = request("GET", f"{base}/v1/sessions/w2/finalize?wait=30")
            assert status == 200 and body["job"]["state"] == "succeeded"
            assert time.monotonic() - t0 < 5

            for bad in ("-1", "31", "nan", "inf", "soon", ""):
                status, headers, problem = request("GET", f"{base}/v1/sessions/w2/finalize?wait={bad}")
                assert status == 400, (bad, problem)
                assert headers["Content-Type"].startswith("application/problem+json")
            status, _, _ = request("GET", f"{base}/v1/sessions/nobody/finalize?wait=5")
            assert status == 404


def test_many_waiters_all_see_the_end(tmp_path: Path) -> None:
    with FakeUpstreamProcess() as fake:
        config = (f'[inference]\nprovider = "openai"\nbase_url = "{fake.base_url}"\nmodel = "m"\n'
                  "timeout_ms = 60000\n")
        with ServerProcess(tmp_path, config) as server:
            base = server.base_url
            _session(base, "many", *[{"type": "speaker_renamed", "speaker": f"spk_{i}", "name": n}
                                     for i, n in enumerate(["Alice", "Bob", "Alice"])])
            fake.set_default("hang:2")
            assert request("POST", f"{base}/v1/sessions/many/finalize")[0] == 202
            results: list[str] = []

            def wait() -> None:
                status, _, body = request("GET", f"{base}/v1/sessions/many/finalize?wait=20", timeout=30)
                results.append(body["job"]["state"] if status == 200 else str(status))

            threads = [threading.Thread(target=wait) for _ in range(40)]
            for t in threads:
                t.start()
            # Meanwhile the server answers other requests at once.
            status, _, health = request("GET", f"{base}/healthz", timeout=5)
            assert status == 200 and health == {"status": "ok"}
            for t in threads:
                t.join(30)
            assert results == ["succeeded"] * 40


# --------------------------------------------------------------------------- tenants


async def test_listing_and_waiting_act_for_the_callers_tenant(tmp_path: Path, aiohttp_client: Any) -> None:
    from test_service_tenants import HeaderTenant

    from ballast.app import build_app
    from ballast.config import load_settings
    from ballast.plugin_manager import load_plugins

    config = load_settings(environ={"BALLAST__STORAGE__PATH": str(tmp_path / "t.db")})
    client = await aiohttp_client(build_app(config, load_plugins(config, eps=[],
                                                                 extra=[("tenant", HeaderTenant())])))
    a, b = {"X-Test-Tenant": "a"}, {"X-Test-Tenant": "b"}
    for sid, who in (("a1", a), ("shared", a), ("b1", b), ("shared", b), ("a2", a)):
        assert (await client.post("/v1/sessions", json={"session_id": sid}, headers=who)).status == 201
    page = await (await client.get("/v1/sessions", headers=a)).json()
    assert [s["session_id"] for s in page["sessions"]] == ["a1", "shared", "a2"]
    page = await (await client.get("/v1/sessions?after=shared", headers=b)).json()
    assert page == {"sessions": [], "next_after": None}
    # Another tenant's session is no cursor: the same 404 as one that never existed.
    assert (await client.get("/v1/sessions?after=a1", headers=b)).status == 404
    # Waiting on another tenant's job is waiting on nothing: 404 at once.
    assert (await client.post("/v1/sessions/a1/finalize", headers=a)).status == 202
    assert (await client.get("/v1/sessions/a1/finalize?wait=5", headers=b)).status == 404
    resp = await client.get("/v1/sessions/a1/finalize?wait=10", headers=a)
    assert (await resp.json())["job"]["state"] == "succeeded"


async def test_a_client_that_leaves_a_wait_costs_no_work(tmp_path: Path) -> None:
    """As under ``ballast serve``, whose runner does not cancel a handler whose client
    left: the departed client's request stays parked, then answers without a read."""
    import asyncio

    import aiohttp
    from aiohttp import web
    from fake_upstream import FakeUpstream
    from support import free_port

    from ballast.app import build_app
    from ballast.config import load_settings
    from ballast.sessions.routes import SERVICE

    async with FakeUpstream(default=Step.hang(1.5)) as fake:
        config = load_settings(environ={
            "BALLAST__STORAGE__PATH": str(tmp_path / "w.db"), "BALLAST__INFERENCE__PROVIDER": "openai",
            "BALLAST__INFERENCE__BASE_URL": fake.base_url, "BALLAST__INFERENCE__MODEL": "m"})
        app = build_app(config)
        runner = web.AppRunner(app, handler_cancellation=False)  # what `ballast serve` runs
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                service = app[SERVICE]
                named = [*CONVERSATION, *[{"type": "speaker_renamed", "speaker": f"spk_{i}", "name": n}
                                          for i, n in enumerate(["Alice", "Bob", "Alice"])]]
                assert (await http.post(f"{base}/v1/sessions", json={"session_id": "w"})).status == 201
                resp = await http.post(f"{base}/v1/sessions/w/mutations", json={"mutations": named})
                assert resp.status == 200
                assert (await http.post(f"{base}/v1/sessions/w/finalize")).status == 202

                url = f"{base}/v1/sessions/w/finalize?wait=20"
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as leaving:
                    with pytest.raises(TimeoutError):
                        await leaving.get(url)  # the client gives up and closes its connection
                staying = asyncio.ensure_future(http.get(url))
                key = ("default", "w")
                for _ in range(100):
                    if service.waiters.waiting(key) == 2:
                        break
                    await asyncio.sleep(0.02)
                assert service.waiters.waiting(key) == 2  # both parked: nothing runs for them

                reads: list[str] = []
                get_job = service.store.get_job

                async def counted(tenant: str, session_id: str) -> Any:
                    reads.append(session_id)
                    return await get_job(tenant, session_id)

                service.store.get_job = counted  # type: ignore[method-assign]
                resp = await staying
                assert (await resp.json())["job"]["state"] == "succeeded"
                await asyncio.sleep(0.2)  # the departed client's request has answered by now
                assert len(service.waiters) == 0
                assert reads == ["w"]  # only the client still there had the job read for it
        finally:
            await runner.cleanup()
