"""The retry plugin against a real fake upstream on loopback.

Every call here goes through the upstream call that the plugin's hook builds from a
real config, over a real socket, to an upstream that fails as scripted. Backoffs are
kept to milliseconds so the suite is fast; the waits that matter (Retry-After, budgets)
are measured at the fake, as the gap between the attempts it received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp_retry.client
import pytest
from fake_upstream import FakeUpstream, Step
from hypothesis import given
from hypothesis import strategies as st
from resilience_support import FakeClock, RecordingExporter
from structlog.testing import capture_logs

from ballast.budget import Deadline, deadline_scope
from ballast.config import Config, PluginSection, load_settings
from ballast.errors import ConfigError, UpstreamError
from ballast.hookspecs import hookimpl
from ballast.plugin_manager import load_plugins
from ballast.plugins import retry
from ballast.plugins.retry import RetryBudget, RetryingCall, Settings, backoff_delay, parse_retry_after
from ballast.plugins.shared_client import Settings as SharedClientSettings
from ballast.plugins.shared_client import SharedClientProvider
from ballast.resilience import UpstreamRefused, UpstreamRegistry
from ballast.telemetry import Telemetry
from ballast.upstream import (
    AttemptWrapperSpec,
    PerCallClientProvider,
    UpstreamRequest,
    UpstreamResponse,
    build_upstream,
    send_attempt,
)

API_KEY = "sk-test-0123456789abcdef"
#: Backoff in milliseconds, without jitter, so waits are short and known.
FAST = {"start_timeout_s": 0.01, "factor": 2.0, "max_timeout_s": 0.05, "jitter": False}

Call = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]


def retry_config(tmp_path: Path, **settings: Any) -> Config:
    """A real config: an empty file plus ``BALLAST__PLUGINS__RETRY__*`` overrides."""
    path = tmp_path / "ballast.toml"
    path.write_text("")
    environ = {f"BALLAST__PLUGINS__RETRY__{k.upper()}": json.dumps(v) for k, v in settings.items()}
    config = load_settings(path, environ=environ)
    config.plugins["retry"] = Settings.model_validate(config.settings.plugins.get("retry", {}))
    return config


@pytest.fixture
def make_call(tmp_path: Path, provider: SharedClientProvider) -> Callable[..., Call]:
    """The plugin's upstream call, built by its hook; keyword arguments are settings."""

    def make(**settings: Any) -> Call:
        config = retry_config(tmp_path, **{**FAST, **settings})
        return retry.RetryingCall(provider, config.plugin("retry"))

    return make


def completion(fake: FakeUpstream, *, timeout_s: float = 5.0) -> UpstreamRequest:
    return UpstreamRequest("POST", fake.base_url + "/chat/completions", name="test.inference",
                           json={"model": "m", "messages": []},
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           attempt_timeout_s=timeout_s)


def gaps(fake: FakeUpstream) -> list[float]:
    """Seconds between consecutive attempts, as the fake received them."""
    times = [r.received_at for r in fake.requests]
    return [b - a for a, b in itertools.pairwise(times)]


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --------------------------------------------------------------------------------------
# what is retried, and what is not
# --------------------------------------------------------------------------------------


async def test_503_503_200_succeeds_on_the_third_attempt(fake: FakeUpstream,
                                                         make_call: Callable[..., Call]) -> None:
    fake.script("503", "503", "ok")
    response = await make_call()(completion(fake))
    assert response.status == 200
    assert response.attempts == 3
    assert fake.attempts == 3
    body = json.loads(response.body)
    assert body["object"] == "chat.completion"


async def test_aiohttp_retry_drives_the_attempts(fake: FakeUpstream, make_call: Callable[..., Call],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry loop is aiohttp-retry's: one of its request contexts per call, the waits
    decided by the plugin's retry options."""
    runs: list[int] = []
    waits: list[tuple[int, float]] = []
    do_request = aiohttp_retry.client._RequestContext._do_request

    async def counted(self: Any) -> Any:
        runs.append(self._retry_options.attempts)
        options = self._retry_options
        decide = options.get_timeout

        def recorded(attempt: int, response: Any = None) -> float:
            wait = decide(attempt, response)
            waits.append((attempt, options.wait))
            return wait

        monkeypatch.setattr(options, "get_timeout", recorded)
        return await do_request(self)

    monkeypatch.setattr(aiohttp_retry.client._RequestContext, "_do_request", counted)
    fake.script("503", "reset", "ok")
    response = await make_call()(completion(fake))
    assert (response.status, response.attempts, fake.attempts) == (200, 3, 3)
    assert runs == [3]
    assert waits == [(1, 0.01), (2, 0.02)]


@pytest.mark.parametrize("code", [429, 502, 503])
async def test_each_retried_status_is_retried(code: int, fake: FakeUpstream,
                                              make_call: Callable[..., Call]) -> None:
    fake.script(Step.status(code), "ok")
    response = await make_call()(completion(fake))
    assert (response.status, response.attempts, fake.attempts) == (200, 2, 2)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 413, 422, 500, 504])
async def test_other_statuses_are_returned_after_one_attempt(code: int, fake: FakeUpstream,
                                                             make_call: Callable[..., Call]) -> None:
    fake.script(Step.status(code), "ok")
    response = await make_call()(completion(fake))
    assert response.status == code
    assert response.attempts == 1
    assert fake.attempts == 1
    assert b"error" in response.body  # the whole body, for the caller to handle


async def test_persistent_503_stops_after_3_attempts(fake: FakeUpstream,
                                                     make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503)
    with pytest.raises(UpstreamError) as caught:
        await make_call()(completion(fake))
    err = caught.value
    assert (err.kind, err.upstream_status, err.attempts) == ("status", 503, 3)
    assert fake.attempts == 3


async def test_attempts_counts_the_first_one(fake: FakeUpstream,
                                             make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503)
    with pytest.raises(UpstreamError) as caught:
        await make_call(attempts=1)(completion(fake))
    assert caught.value.attempts == 1
    assert fake.attempts == 1


async def test_a_reset_connection_is_retried(fake: FakeUpstream,
                                             make_call: Callable[..., Call]) -> None:
    fake.script("reset", "ok")
    response = await make_call()(completion(fake))
    assert (response.status, response.attempts, fake.attempts) == (200, 2, 2)


async def test_a_body_cut_short_is_retried(fake: FakeUpstream,
                                           make_call: Callable[..., Call]) -> None:
    fake.script(Step.truncated(lying_length=True), "ok")
    response = await make_call()(completion(fake))
    assert (response.status, response.attempts, fake.attempts) == (200, 2, 2)
    json.loads(response.body)


async def test_persistent_resets_fail_as_a_connection_error(fake: FakeUpstream,
                                                            make_call: Callable[..., Call]) -> None:
    fake.default = Step.reset()
    with pytest.raises(UpstreamError) as caught:
        await make_call()(completion(fake))
    assert (caught.value.kind, caught.value.upstream_status, caught.value.attempts) == ("connection", None, 3)
    assert fake.attempts == 3


async def test_a_refused_connection_is_retried_then_fails(make_call: Callable[..., Call]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the call: nothing listens there
    request = UpstreamRequest("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={})
    with capture_logs() as logs, pytest.raises(UpstreamError) as caught:
        await make_call()(request)
    assert (caught.value.kind, caught.value.attempts) == ("connection", 3)
    assert len(events(logs, "upstream.retry")) == 2


# --------------------------------------------------------------------------------------
# per-attempt timeouts
# --------------------------------------------------------------------------------------


async def test_a_hang_is_cut_by_the_attempt_timeout_and_retried(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.script(Step.hang(30), "ok")
    start = time.monotonic()
    response = await make_call()(completion(fake, timeout_s=0.3))
    elapsed = time.monotonic() - start
    assert (response.status, response.attempts, fake.attempts) == (200, 2, 2)
    assert 0.3 <= elapsed < 2.0
    assert gaps(fake)[0] >= 0.29


async def test_a_slow_body_is_a_timeout_of_its_attempt_and_retried(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.script(Step.slow_body(5), "ok")
    start = time.monotonic()
    response = await make_call()(completion(fake, timeout_s=0.3))
    assert (response.status, response.attempts, fake.attempts) == (200, 2, 2)
    assert time.monotonic() - start < 2.0


async def test_a_slow_body_on_the_last_attempt_fails_as_a_timeout(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.script(Step.slow_body(5))
    start = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await make_call(attempts=1)(completion(fake, timeout_s=0.3))
    assert (caught.value.kind, caught.value.attempts) == ("timeout", 1)
    assert time.monotonic() - start < 2.0


async def test_a_tls_failure_is_not_retried(fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    request = UpstreamRequest("POST", f"https://127.0.0.1:{fake.port}/v1/chat/completions", json={})
    with capture_logs() as logs, pytest.raises(UpstreamError) as caught:
        await make_call()(request)  # TLS to a plain-HTTP server: the handshake fails
    assert (caught.value.kind, caught.value.attempts) == ("connection", 1)
    assert events(logs, "upstream.retry") == []
    [failed] = events(logs, "upstream.failed")
    assert failed["error_type"] == "ClientConnectorSSLError"


async def test_persistent_hangs_fail_as_a_timeout(fake: FakeUpstream,
                                                  make_call: Callable[..., Call]) -> None:
    fake.default = Step.hang(30)
    with capture_logs() as logs, pytest.raises(UpstreamError) as caught:
        await make_call(attempts=2)(completion(fake, timeout_s=0.2))
    assert (caught.value.kind, caught.value.attempts) == ("timeout", 2)
    [failed] = events(logs, "upstream.failed")
    assert failed["error_type"] in {"TimeoutError", "ServerTimeoutError", "SocketTimeoutError"}


async def test_the_attempt_timeout_setting_overrides_the_request_s(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.script(Step.hang(30), "ok")
    start = time.monotonic()
    response = await make_call(attempt_timeout_s=0.2)(completion(fake, timeout_s=30))
    assert response.attempts == 2
    assert time.monotonic() - start < 1.5


# --------------------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------------------


async def test_retry_after_seconds_is_waited_out(fake: FakeUpstream,
                                                 make_call: Callable[..., Call]) -> None:
    fake.script(Step.status(503, retry_after="1"), "ok")
    response = await make_call()(completion(fake))
    assert (response.status, response.attempts) == (200, 2)
    assert gaps(fake)[0] >= 0.9


async def test_retry_after_as_an_http_date_is_waited_out(fake: FakeUpstream,
                                                         make_call: Callable[..., Call]) -> None:
    # Rendered when served, at whole-second resolution: between 1 and 2 s away.
    fake.script(Step.status(429, retry_after="date+2"), "ok")
    response = await make_call()(completion(fake))
    assert (response.status, response.attempts) == (200, 2)
    assert 0.9 <= gaps(fake)[0] < 3.0


async def test_retry_after_3600_under_a_budget_fails_at_once(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503, retry_after="3600")
    start = time.monotonic()
    with deadline_scope(Deadline.after(10.0)), pytest.raises(UpstreamError) as caught:
        await make_call()(completion(fake))
    assert time.monotonic() - start < 0.5
    assert (caught.value.kind, caught.value.upstream_status, caught.value.attempts) == ("budget", 503, 1)
    assert fake.attempts == 1


async def test_a_long_retry_after_is_cut_to_max_retry_after(fake: FakeUpstream,
                                                            make_call: Callable[..., Call]) -> None:
    fake.script(Step.status(503, retry_after="3600"), "ok")
    start = time.monotonic()
    response = await make_call(max_retry_after_s=0.3)(completion(fake))
    assert (response.status, response.attempts) == (200, 2)
    assert 0.28 <= gaps(fake)[0] < 1.0
    assert time.monotonic() - start < 1.5


async def test_an_unreadable_retry_after_falls_back_to_the_backoff(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.script(Step.status(503, retry_after="soon, promise"), Step.status(503, retry_after="-5"), "ok")
    with capture_logs() as logs:
        response = await make_call()(completion(fake))
    assert response.attempts == 3
    assert [e["delay_ms"] for e in events(logs, "upstream.retry")] == [10.0, 20.0]


# --------------------------------------------------------------------------------------
# the time budget
# --------------------------------------------------------------------------------------


async def test_no_sleep_past_the_budget(fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503)
    call = make_call(attempts=5, start_timeout_s=0.4, factor=2.0, max_timeout_s=5.0)
    start = time.monotonic()
    with capture_logs() as logs, deadline_scope(Deadline.after(1.0)), \
            pytest.raises(UpstreamError) as caught:
        await call(completion(fake))
    elapsed = time.monotonic() - start
    # Attempt 1, a 0.4 s wait, attempt 2; the next wait (0.8 s) outlasts the ~0.6 s left,
    # so the call ends well before the budget does, instead of at ~1.2 s.
    assert elapsed < 1.0
    assert (caught.value.kind, caught.value.upstream_status, caught.value.attempts) == ("budget", 503, 2)
    assert fake.attempts == 2
    [retried] = events(logs, "upstream.retry")
    assert 0 < retried["remaining_ms"] <= 1000
    [failed] = events(logs, "upstream.failed")
    assert (failed["kind"], failed["attempts"], failed["status"]) == ("budget", 2, 503)


async def test_a_first_backoff_longer_than_the_budget_fails_at_once(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503)
    start = time.monotonic()
    with deadline_scope(Deadline.after(1.0)), pytest.raises(UpstreamError) as caught:
        await make_call(start_timeout_s=5.0, max_timeout_s=10.0)(completion(fake))
    assert time.monotonic() - start < 0.5
    assert (caught.value.kind, caught.value.attempts) == ("budget", 1)
    assert fake.attempts == 1


async def test_a_hang_is_cut_at_the_end_of_the_budget(fake: FakeUpstream,
                                                      make_call: Callable[..., Call]) -> None:
    fake.default = Step.hang(30)
    start = time.monotonic()
    with deadline_scope(Deadline.after(0.5)), pytest.raises(UpstreamError) as caught:
        await make_call()(completion(fake, timeout_s=30))
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 1.0
    assert (caught.value.kind, caught.value.attempts) == ("budget", 1)
    assert fake.attempts == 1


async def test_no_attempt_starts_once_the_budget_is_spent(fake: FakeUpstream,
                                                         make_call: Callable[..., Call]) -> None:
    with deadline_scope(Deadline.after(0.0)), pytest.raises(UpstreamError) as caught:
        await make_call()(completion(fake))
    assert (caught.value.kind, caught.value.attempts) == ("budget", 0)
    assert fake.attempts == 0


async def test_no_attempt_starts_after_a_wait_that_overran_the_budget(
        fake: FakeUpstream, make_call: Callable[..., Call], monkeypatch: pytest.MonkeyPatch) -> None:
    # A busy loop wakes a sleeper late; the attempt after that wait must not start.
    async def late_sleep(delay: float) -> None:
        await asyncio.sleep(delay + 0.3)

    monkeypatch.setattr(retry, "sleep", late_sleep)
    fake.default = Step.status(503)
    with deadline_scope(Deadline.after(0.4)), pytest.raises(UpstreamError) as caught:
        await make_call(start_timeout_s=0.2, max_timeout_s=1.0)(completion(fake))
    assert (caught.value.kind, caught.value.upstream_status, caught.value.attempts) == ("budget", 503, 1)
    assert fake.attempts == 1


async def test_retries_within_the_budget_go_ahead(fake: FakeUpstream,
                                                  make_call: Callable[..., Call]) -> None:
    fake.script("503", "503", "ok")
    with deadline_scope(Deadline.after(5.0)):
        response = await make_call()(completion(fake))
    assert response.attempts == 3


# --------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------


async def test_retries_and_the_final_failure_are_logged(fake: FakeUpstream,
                                                        make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503)
    with capture_logs() as logs, pytest.raises(UpstreamError):
        await make_call()(completion(fake))
    retries = events(logs, "upstream.retry")
    assert [(e["attempt"], e["status"], e["error_type"]) for e in retries] == [(1, 503, None), (2, 503, None)]
    for e in retries:
        assert e["log_level"] == "warning"
        assert e["name"] == "test.inference"
        assert e["remaining_ms"] is None  # no budget in force
    assert [e["delay_ms"] for e in retries] == [10.0, 20.0]
    [failed] = events(logs, "upstream.failed")
    assert failed == {"event": "upstream.failed", "log_level": "error", "name": "test.inference",
                      "upstream": "upstream",
                      "attempts": 3, "kind": "status", "status": 503, "error_type": None}


async def test_a_retried_exception_is_logged_by_type(fake: FakeUpstream,
                                                     make_call: Callable[..., Call]) -> None:
    fake.script("reset", "ok")
    with capture_logs() as logs:
        await make_call()(completion(fake))
    [retried] = events(logs, "upstream.retry")
    assert retried["status"] is None
    assert retried["error_type"] in {"ServerDisconnectedError", "ClientOSError",
                                     "ClientConnectionResetError"}
    assert events(logs, "upstream.failed") == []


async def test_no_secret_or_url_reaches_logs_or_the_public_error(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.default = Step.status(503)
    with capture_logs() as logs, pytest.raises(UpstreamError) as caught:
        await make_call()(completion(fake))
    text = repr(logs)
    assert API_KEY not in text and "Authorization" not in text
    assert str(fake.port) not in text
    err = caught.value
    assert API_KEY not in err.internal and API_KEY not in err.public_detail
    assert "/v1/chat/completions" in err.internal  # the path, for the server log
    assert "503" not in err.public_detail and "/v1" not in err.public_detail
    assert fake.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"  # it was sent


# --------------------------------------------------------------------------------------
# sessions: the shared one is never closed; a per-call one always is
# --------------------------------------------------------------------------------------


async def test_the_shared_session_survives_calls(fake: FakeUpstream, provider: SharedClientProvider,
                                                 make_call: Callable[..., Call]) -> None:
    call = make_call()
    fake.script("503", "ok", "400", "reset", "ok")
    await call(completion(fake))
    await call(completion(fake))
    await call(completion(fake))
    fake.default = Step.status(503)
    with pytest.raises(UpstreamError):
        await call(completion(fake))
    session = provider.current
    assert session is not None and not session.closed
    assert provider.created == 1


async def test_retried_responses_are_released_before_the_wait(
        tmp_path: Path, fake: FakeUpstream) -> None:
    # One connection in the pool and a 503 too big to arrive by itself: unless the
    # retried response is released, the next attempt never gets a connection.
    provider = SharedClientProvider(SharedClientSettings(limit=1, limit_per_host=1))
    big = b"x" * (8 * 1024 * 1024)
    fake.script(Step.status(503, body=big, content_type="text/plain"), "ok")
    call = retry.RetryingCall(provider, retry_config(tmp_path, **FAST).plugin("retry"))
    try:
        response = await call(completion(fake, timeout_s=2.0))
    finally:
        await provider.close()
    assert (response.status, response.attempts) == (200, 2)


class RecordingPerCallProvider(PerCallClientProvider):
    """The core's session-per-call provider, remembering what it handed out."""

    def __init__(self) -> None:
        self.handed_out: list[aiohttp.ClientSession] = []

    async def session(self) -> aiohttp.ClientSession:
        session = await super().session()
        self.handed_out.append(session)
        return session


async def test_a_per_call_session_is_closed_after_the_call(tmp_path: Path, fake: FakeUpstream) -> None:
    provider = RecordingPerCallProvider()
    call = retry.RetryingCall(provider, retry_config(tmp_path, **FAST).plugin("retry"))
    fake.script("503", "ok")
    assert (await call(completion(fake))).attempts == 2
    fake.default = Step.status(503)
    with pytest.raises(UpstreamError):
        await call(completion(fake))
    # One short-lived session per attempt (2 + 3), each closed right after it.
    assert len(provider.handed_out) == 5
    assert all(s.closed for s in provider.handed_out)


# --------------------------------------------------------------------------------------
# hooks and settings
# --------------------------------------------------------------------------------------


def test_hook_ballast_settings_model() -> None:
    model = retry.ballast_settings_model()
    assert model is Settings and issubclass(model, PluginSection)


async def test_hook_ballast_upstream_call_through_the_plugin_manager(
        tmp_path: Path, fake: FakeUpstream, provider: SharedClientProvider) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.retry]\nattempts = 2\nstart_timeout_s = 0.01\njitter = false\n")
    config = load_settings(path, environ={"BALLAST__PLUGINS__RETRY__STATUSES": "[500]"})
    plugins = load_plugins(config)
    registry = UpstreamRegistry()
    call = plugins.hook.ballast_upstream_call(config=config, provider=provider, telemetry=Telemetry(),
                                              attempt=send_attempt(provider), upstreams=registry)
    assert isinstance(call, RetryingCall)
    assert call.upstreams is registry
    assert (call.settings.attempts, call.settings.statuses) == (2, [500])
    fake.default = Step.status(500)
    with pytest.raises(UpstreamError) as caught:
        await call(completion(fake))
    assert caught.value.attempts == 2
    fake.reset()
    fake.script("503")
    assert (await call(completion(fake))).status == 503  # no longer a retried status


def test_defaults() -> None:
    s = Settings()
    assert s.attempts == 3
    assert (s.start_timeout_s, s.factor, s.max_timeout_s, s.jitter) == (0.5, 2.0, 5.0, True)
    assert s.statuses == [429, 502, 503]
    assert s.max_retry_after_s == 30.0
    assert s.attempt_timeout_s is None
    assert (s.budget, s.budget_ratio, s.budget_window_s, s.budget_min_retries_per_s, s.shared_cooldown) == \
        (True, 0.2, 10.0, 1.0, True)
    for name, field in Settings.model_fields.items():
        if name != "enabled":
            assert field.description, f"{name} has no description"


@pytest.mark.parametrize(("key", "value"), [
    ("attempts", 0), ("start_timeout_s", -1), ("factor", 0.5), ("max_timeout_s", -0.1),
    ("statuses", [200]), ("statuses", [700]), ("max_retry_after_s", -1), ("attempt_timeout_s", 0),
    ("retries", 3),
])
def test_bad_settings_name_the_key(tmp_path: Path, key: str, value: Any) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("")
    config = load_settings(path, environ={f"BALLAST__PLUGINS__RETRY__{key.upper()}": json.dumps(value)})
    with pytest.raises(ConfigError, match=rf"plugins\.retry\.{key}"):
        load_plugins(config)


# --------------------------------------------------------------------------------------
# the backoff and Retry-After computations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("failed_attempt", "expected"), [
    (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (6, 5.0), (100, 5.0), (10_000, 5.0),
])
def test_backoff_without_jitter_is_exponential_and_capped(failed_attempt: int, expected: float) -> None:
    assert backoff_delay(failed_attempt, start_s=0.5, factor=2.0, cap_s=5.0, jitter=False) == expected


@pytest.mark.parametrize(("start", "factor", "failed_attempt", "expected"), [
    (0.0, 10.0, 10_000, 0.0),  # no backoff stays no backoff, however far
    (0.5, 1.0, 50, 0.5),  # factor 1: a constant backoff
    (0.5, 10.0, 10_000, 5.0),
])
def test_backoff_edges(start: float, factor: float, failed_attempt: int, expected: float) -> None:
    assert backoff_delay(failed_attempt, start_s=start, factor=factor, cap_s=5.0, jitter=False) == expected


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.5), (0.5, 0.75), (0.999999, 1.0)])
def test_equal_jitter_spans_the_upper_half(draw: float, expected: float) -> None:
    got = backoff_delay(2, start_s=0.5, factor=2.0, cap_s=5.0, jitter=True, rng=lambda: draw)
    assert got == pytest.approx(expected, abs=1e-5)


@given(failed_attempt=st.integers(min_value=1, max_value=10_000),
       start=st.floats(min_value=0, max_value=60), factor=st.floats(min_value=1, max_value=10),
       cap=st.floats(min_value=0, max_value=300), draw=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_backoff_stays_within_zero_and_the_computed_delay(failed_attempt: int, start: float,
                                                         factor: float, cap: float, draw: float) -> None:
    exact = backoff_delay(failed_attempt, start_s=start, factor=factor, cap_s=cap, jitter=False)
    jittered = backoff_delay(failed_attempt, start_s=start, factor=factor, cap_s=cap, jitter=True,
                             rng=lambda: draw)
    assert 0 <= exact <= cap
    assert exact / 2 <= jittered <= exact
    if failed_attempt > 1:
        previous = backoff_delay(failed_attempt - 1, start_s=start, factor=factor, cap_s=cap, jitter=False)
        assert previous <= exact


NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "expected"), [
    ("1", 1.0), ("0", 0.0), (" 120 ", 120.0), ("3600", 3600.0), ("1.5", 1.5),
    ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past: no wait
    ("Wed, 21 Oct 2015 07:28:30 -0000", 30.0),
    (None, None), ("", None), ("-1", None), ("-0.5", None), ("soon", None), ("1e3", None),
    ("inf", None), ("nan", None), ("Wed, 99 Foo 2015 07:28:00 GMT", None), ("1, 2", None),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_an_http_date_from_now() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    got = parse_retry_after(later)
    assert got is not None and 88 <= got <= 90


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises_and_never_goes_negative(value: str) -> None:
    got = parse_retry_after(value, now=NOW)
    assert got is None or got >= 0


@given(st.integers(min_value=0, max_value=10**9))
def test_parse_retry_after_reads_any_delta_seconds(seconds: int) -> None:
    assert parse_retry_after(str(seconds)) == float(seconds)


async def test_the_wait_is_really_slept(fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    fake.script("503", "ok")
    await make_call(start_timeout_s=0.3, max_timeout_s=1.0, jitter=False)(completion(fake))
    assert gaps(fake)[0] >= 0.28


async def test_calls_run_concurrently_with_their_own_attempt_counts(
        fake: FakeUpstream, make_call: Callable[..., Call]) -> None:
    call = make_call()
    fake.script(*(["503"] * 10))
    responses = await asyncio.gather(*(call(completion(fake)) for _ in range(20)))
    assert all(r.status == 200 for r in responses)
    assert sum(r.attempts for r in responses) == fake.attempts == 30


# --------------------------------------------------------------------------------------
# the retry budget: arithmetic on a fake clock
# --------------------------------------------------------------------------------------


def budget_of(clock: FakeClock, **kw: float) -> RetryBudget:
    return RetryBudget(**{"ratio": 0.2, "window_s": 10.0, "min_retries_per_s": 1.0, **kw}, clock=clock)


def take(b: RetryBudget, n: int) -> int:
    """Withdraw up to ``n`` retries; how many were allowed."""
    return sum(b.try_withdraw() for _ in range(n))


def test_the_reserve_alone_allows_min_retries_per_s_times_the_window() -> None:
    b = budget_of(FakeClock())
    assert b.balance() == 10
    assert take(b, 50) == 10
    assert b.balance() < 1 and not b.try_withdraw()


def test_each_call_adds_the_ratio() -> None:
    b = budget_of(FakeClock())
    for _ in range(100):
        b.deposit()
    assert b.balance() == pytest.approx(30)  # 0.2 x 100 + 10
    assert take(b, 100) == 30
    assert b.counts() == (100, 30)


def test_a_denied_retry_takes_nothing() -> None:
    b = budget_of(FakeClock(), min_retries_per_s=0.0)
    for _ in range(4):
        b.deposit()
    assert not b.try_withdraw()  # 0.8 < 1
    b.deposit()
    assert b.try_withdraw() and b.counts() == (5, 1)


def test_the_budget_refills_as_the_window_slides() -> None:
    clock = FakeClock()
    b = budget_of(clock)
    assert take(b, 20) == 10
    clock.advance(5)
    assert take(b, 20) == 0  # the spent retries are still in the window
    clock.advance(5.01)
    assert take(b, 20) == 10  # they left it
    assert b.counts() == (0, 10)


def test_a_hard_down_upstream_gets_about_the_ratio_in_extra_attempts() -> None:
    """Calls that each want 2 retries: once the reserve is spent, 1 retry per 5 calls."""
    b = budget_of(FakeClock(), min_retries_per_s=0.0)
    attempts = 0
    for _ in range(1000):
        b.deposit()
        attempts += 1 + take(b, 2)
    assert attempts / 1000 == pytest.approx(1.2, abs=0.01)


# --------------------------------------------------------------------------------------
# the retry budget and the cooldown in calls
# --------------------------------------------------------------------------------------


@pytest.fixture
def make_shared_call(tmp_path: Path, provider: SharedClientProvider) -> Callable[..., RetryingCall]:
    """A retrying call over the attempt pipeline with the cooldown, sharing one registry."""
    registry = UpstreamRegistry()

    def make(**settings: Any) -> RetryingCall:
        config = retry_config(tmp_path, **{**FAST, **settings})
        s = config.plugin("retry")
        attempt = retry.cooldown_wrapper(registry)(send_attempt(provider))
        return RetryingCall(attempt, s, upstreams=registry)

    return make


async def test_a_spent_budget_ends_the_call_without_a_retry(
        fake: FakeUpstream, make_shared_call: Callable[..., RetryingCall]) -> None:
    call = make_shared_call(budget_min_retries_per_s=0.2, budget_window_s=10.0, budget_ratio=0.0)
    fake.default = Step.status(503)
    with capture_logs() as logs:
        with pytest.raises(UpstreamError) as first:
            await call(completion(fake))  # the reserve of 2 retries is spent here
        with pytest.raises(UpstreamError) as second:
            await call(completion(fake))
    assert (first.value.kind, first.value.attempts) == ("status", 3)
    assert (second.value.kind, second.value.attempts, second.value.upstream_status) == \
        ("budget_exhausted", 1, 503)
    assert second.value.status == 502  # it received the upstream's failure itself
    assert fake.attempts == 4
    [denied] = events(logs, "upstream.retry_denied")
    assert (denied["kind"], denied["attempt"], denied["status"], denied["window_calls"],
            denied["window_retries"]) == ("budget_exhausted", 1, 503, 2, 2)


async def test_the_budget_can_be_switched_off(fake: FakeUpstream,
                                              make_shared_call: Callable[..., RetryingCall]) -> None:
    call = make_shared_call(budget=False, budget_min_retries_per_s=0.0, budget_ratio=0.0)
    fake.default = Step.status(503)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await call(completion(fake))
    assert fake.attempts == 9


async def test_a_retry_after_pauses_the_next_caller_too(
        fake: FakeUpstream, make_shared_call: Callable[..., RetryingCall]) -> None:
    call = make_shared_call(max_retry_after_s=5.0)
    fake.script(Step.status(429, retry_after="0.4"))
    first = asyncio.create_task(call(completion(fake)))
    await fake.wait_for_attempts(1)
    second = await call(completion(fake))  # held until the pause ends, then sent once
    assert second.status == 200 and second.attempts == 1
    assert (await first).attempts == 2
    t429 = fake.requests[0].received_at
    assert all(r.received_at - t429 >= 0.39 for r in fake.requests[1:])


async def test_a_caller_that_cannot_wait_is_refused_with_503(
        fake: FakeUpstream, make_shared_call: Callable[..., RetryingCall]) -> None:
    call = make_shared_call(max_retry_after_s=5.0)
    fake.script(Step.status(503, retry_after="3"))
    with deadline_scope(Deadline.after(1.0)), pytest.raises(UpstreamError) as own:
        await call(completion(fake))
    assert (own.value.kind, own.value.status) == ("budget", 502)
    with deadline_scope(Deadline.after(1.0)), capture_logs() as logs, \
            pytest.raises(UpstreamRefused) as caught:
        await call(completion(fake))
    refused = caught.value
    assert (refused.kind, refused.status, refused.attempts) == ("cooldown", 503, 0)
    assert refused.headers["Retry-After"] == "3"
    assert fake.attempts == 1
    [line] = events(logs, "upstream.refused")
    assert (line["kind"], line["retry_after_s"], line["log_level"]) == ("cooldown", pytest.approx(3, abs=0.1),
                                                                         "warning")
    assert events(logs, "upstream.failed") == []


async def test_a_cooldown_is_not_set_without_the_setting(
        fake: FakeUpstream, make_shared_call: Callable[..., RetryingCall]) -> None:
    call = make_shared_call(max_retry_after_s=5.0, shared_cooldown=False)
    fake.script(Step.status(503, retry_after="3"))
    with deadline_scope(Deadline.after(1.0)), pytest.raises(UpstreamError):
        await call(completion(fake))
    assert (await call(completion(fake))).status == 200
    assert fake.attempts == 2


async def test_a_refused_retry_ends_the_call_as_an_upstream_failure(
        fake: FakeUpstream, provider: SharedClientProvider, tmp_path: Path) -> None:
    """The breaker opens between attempts: the retry is refused, never sent; 502, not 503."""
    from ballast.plugins.circuit_breaker import BreakerWrapper
    from ballast.plugins.circuit_breaker import Settings as BreakerSettings

    registry = UpstreamRegistry()
    breaker = BreakerWrapper(BreakerSettings(minimum_calls=1), registry, Telemetry())
    call = RetryingCall(breaker(send_attempt(provider)), retry_config(tmp_path, **FAST).plugin("retry"),
                        upstreams=registry)
    fake.default = Step.status(503)
    with pytest.raises(UpstreamError) as caught:
        await call(completion(fake))
    assert (caught.value.kind, caught.value.attempts, caught.value.status) == ("circuit_open", 1, 502)
    assert fake.attempts == 1
    with pytest.raises(UpstreamRefused) as refused:
        await call(completion(fake))
    assert (refused.value.status, refused.value.attempts) == (503, 0)
    assert fake.attempts == 1


# --------------------------------------------------------------------------------------
# metrics agree exactly with what happened
# --------------------------------------------------------------------------------------


async def test_503_503_200_records_three_attempts_two_retries_one_call(
        tmp_path: Path, fake: FakeUpstream) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.retry]\nstart_timeout_s = 0.01\njitter = false\n")
    config = load_settings(path, environ={})
    plugins = load_plugins(config)
    telemetry = Telemetry()
    exporter = RecordingExporter()
    telemetry.attach(exporter)  # type: ignore[arg-type]
    upstream = build_upstream(plugins.hook, config, telemetry)
    request = dataclasses.replace(completion(fake), upstream="openai")
    fake.script("503", "503", "ok")
    try:
        assert (await upstream.request(request)).attempts == 3
    finally:
        await upstream.close()
    assert exporter.count("ballast_upstream_attempts_total", "openai", "status") == 2
    assert exporter.count("ballast_upstream_attempts_total", "openai", "ok") == 1
    assert exporter.count("ballast_upstream_retries_total", "openai", "status") == 2
    assert exporter.count("ballast_upstream_calls_total", "openai", "ok") == 1
    assert sum(v for (name, _), v in exporter.counts.items()
               if name == "ballast_upstream_attempts_total") == fake.attempts == 3


def test_hook_ballast_upstream_attempt_wrappers(tmp_path: Path) -> None:
    registry = UpstreamRegistry()
    on = retry.ballast_upstream_attempt_wrappers(config=retry_config(tmp_path), upstreams=registry)
    assert [(s.name, s.order) for s in on] == [("retry.cooldown", retry.COOLDOWN_ORDER)]
    off = retry.ballast_upstream_attempt_wrappers(config=retry_config(tmp_path, shared_cooldown=False),
                                                  upstreams=registry)
    assert off == []


async def test_attempt_wrappers_see_every_attempt_in_order(tmp_path: Path, fake: FakeUpstream) -> None:
    """A third-party attempt wrapper (a tracer, say) at order 900 sees each sent attempt."""
    seen: list[tuple[str, int, int | None]] = []

    class Tracer:
        @hookimpl
        def ballast_upstream_attempt_wrappers(self) -> list[AttemptWrapperSpec]:
            def wrap(attempt: Call) -> Call:
                async def traced(request: UpstreamRequest) -> UpstreamResponse:
                    response = await attempt(request)
                    seen.append((request.upstream, request.attempt, response.status))
                    return response

                return traced

            return [AttemptWrapperSpec("tracer", 900, wrap)]

    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.retry]\nstart_timeout_s = 0.01\njitter = false\n")
    config = load_settings(path, environ={})
    plugins = load_plugins(config, eps=[], extra=[("tracer", Tracer())])
    upstream = build_upstream(plugins.hook, config, Telemetry())
    fake.script("503", "ok")
    try:
        await upstream.request(dataclasses.replace(completion(fake), upstream="openai"))
    finally:
        await upstream.close()
    assert seen == [("openai", 1, 503), ("openai", 2, 200)]
