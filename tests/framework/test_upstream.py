"""The core of the outbound path: the send (no redirects, capped bodies), the attempt
pipeline's order, and the shared per-upstream registry."""

from __future__ import annotations

import asyncio
import tracemalloc
from typing import Any

import pytest
from fake_upstream import FakeUpstream, Step
from resilience_support import FakeClock, RecordingExporter
from structlog.testing import capture_logs

from ballast.errors import UpstreamError
from ballast.plugins.shared_client import SharedClientProvider
from ballast.resilience import UpstreamRefused, UpstreamRegistry, host_of, republished, retry_after_header
from ballast.telemetry import Telemetry
from ballast.upstream import (
    AttemptError,
    AttemptWrapperSpec,
    Upstream,
    UpstreamCall,
    UpstreamRequest,
    UpstreamResponse,
    compose_attempt,
    send_attempt,
    single_attempt_call,
)

MIB = 1024 * 1024


def request_to(fake: FakeUpstream, **kw: Any) -> UpstreamRequest:
    return UpstreamRequest("POST", fake.base_url + "/chat/completions", name="test.inference",
                           json={"model": "m", "messages": []}, upstream="openai",
                           attempt_timeout_s=10, **kw)


# --------------------------------------------------------------------------------------
# redirects are never followed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_is_an_error_and_is_not_followed(code: int, fake: FakeUpstream,
                                                          provider: SharedClientProvider) -> None:
    async with FakeUpstream() as elsewhere:
        fake.default = Step.redirect(elsewhere.base_url + "/chat/completions", code)
        call = single_attempt_call(send_attempt(provider))
        with capture_logs() as logs, pytest.raises(AttemptError) as caught:
            await call(request_to(fake))
        assert elsewhere.attempts == 0
    err = caught.value
    assert (err.kind, err.upstream_status, err.retryable) == ("redirect", code, False)
    assert str(elsewhere.port) not in err.internal
    [failed] = [e for e in logs if e["event"] == "upstream.failed"]
    assert (failed["kind"], failed["status"], failed["attempts"]) == ("redirect", code, 1)
    assert str(elsewhere.port) not in repr(logs)


async def test_a_redirect_to_the_same_host_is_not_followed_either(fake: FakeUpstream,
                                                                  provider: SharedClientProvider) -> None:
    fake.default = Step.parse("redirect:307")
    with pytest.raises(AttemptError):
        await send_attempt(provider)(request_to(fake))
    assert fake.redirected == 0


# --------------------------------------------------------------------------------------
# response bodies are capped
# --------------------------------------------------------------------------------------


async def test_a_body_within_the_cap_is_read_whole(fake: FakeUpstream,
                                                   provider: SharedClientProvider) -> None:
    fake.default = Step.huge(MIB)
    response = await send_attempt(provider, max_response_bytes=2 * MIB)(request_to(fake))
    assert response.status == 200 and MIB < len(response.body) < 2 * MIB


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
async def test_an_oversized_body_fails_without_being_buffered(declared: bool, fake: FakeUpstream,
                                                              provider: SharedClientProvider) -> None:
    fake.default = Step.huge(200 * MIB, lying_length=declared)
    attempt = send_attempt(provider, max_response_bytes=MIB)
    tracemalloc.start()
    try:
        with pytest.raises(AttemptError) as caught:
            await attempt(request_to(fake))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (caught.value.kind, caught.value.retryable, caught.value.upstream_status) == \
        ("too_large", False, 200)
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB while refusing a 200 MiB body"


async def test_the_request_may_lower_the_cap(fake: FakeUpstream, provider: SharedClientProvider) -> None:
    fake.default = Step.huge(64 * 1024)
    with pytest.raises(AttemptError, match="cap"):
        await send_attempt(provider)(request_to(fake, max_response_bytes=16 * 1024))


async def test_a_huge_error_body_is_not_an_error_of_its_own(fake: FakeUpstream,
                                                            provider: SharedClientProvider) -> None:
    fake.default = Step.status(503, body=b"x" * (8 * MIB), content_type="text/plain")
    response = await send_attempt(provider, max_response_bytes=MIB)(request_to(fake))
    assert response.status == 503 and len(response.body) <= 64 * 1024


# --------------------------------------------------------------------------------------
# the pipeline and its counters
# --------------------------------------------------------------------------------------


def tag(name: str, trace: list[str]) -> Any:
    def wrap(attempt: UpstreamCall) -> UpstreamCall:
        async def traced(request: UpstreamRequest) -> UpstreamResponse:
            trace.append(name)
            return await attempt(request)

        return traced

    return wrap


async def test_attempt_wrappers_run_by_order_lowest_outermost() -> None:
    trace: list[str] = []

    async def send(request: UpstreamRequest) -> UpstreamResponse:
        trace.append("send")
        return UpstreamResponse(200, {}, b"{}")

    specs = [AttemptWrapperSpec("c", 900, tag("c", trace)), AttemptWrapperSpec("a", 100, tag("a", trace)),
             AttemptWrapperSpec("b", 200, tag("b", trace))]
    await compose_attempt(send, specs)(UpstreamRequest("POST", "http://x/"))
    assert trace == ["a", "b", "c", "send"]
    with pytest.raises(ValueError, match="used twice"):
        compose_attempt(send, [*specs, AttemptWrapperSpec("a", 1, tag("a", trace))])


async def test_calls_and_attempts_are_counted_with_their_outcome(fake: FakeUpstream,
                                                                 provider: SharedClientProvider) -> None:
    telemetry = Telemetry()
    exporter = RecordingExporter()
    telemetry.attach(exporter)  # type: ignore[arg-type]
    upstream = Upstream(single_attempt_call(send_attempt(provider, telemetry)), provider,
                        telemetry=telemetry)
    fake.script("ok", "503", "reset")
    assert (await upstream.request(request_to(fake))).status == 200
    assert (await upstream.request(request_to(fake))).status == 503
    with pytest.raises(UpstreamError):
        await upstream.request(request_to(fake))
    assert exporter.count("ballast_upstream_attempts_total", "openai", "ok") == 1
    assert exporter.count("ballast_upstream_attempts_total", "openai", "status") == 1
    assert exporter.count("ballast_upstream_attempts_total", "openai", "connection") == 1
    assert exporter.count("ballast_upstream_calls_total", "openai", "ok") == 1
    assert exporter.count("ballast_upstream_calls_total", "openai", "connection") == 1


async def test_an_attempt_refused_before_sending_is_not_counted_as_sent(
        fake: FakeUpstream, provider: SharedClientProvider) -> None:
    telemetry = Telemetry()
    exporter = RecordingExporter()
    telemetry.attach(exporter)  # type: ignore[arg-type]

    def refuse(attempt: UpstreamCall) -> UpstreamCall:
        async def refused(request: UpstreamRequest) -> UpstreamResponse:
            raise UpstreamRefused(kind="circuit_open", retry_after_s=0.2)

        return refused

    attempt = compose_attempt(send_attempt(provider, telemetry), [AttemptWrapperSpec("no", 1, refuse)])
    upstream = Upstream(single_attempt_call(attempt), provider, telemetry=telemetry)
    with pytest.raises(UpstreamRefused):
        await upstream.request(request_to(fake))
    assert fake.attempts == 0
    assert not any(name == "ballast_upstream_attempts_total" for name, _ in exporter.counts)
    assert exporter.count("ballast_upstream_calls_total", "openai", "circuit_open") == 1


# --------------------------------------------------------------------------------------
# the registry and refusals
# --------------------------------------------------------------------------------------


def test_one_state_per_provider_and_host() -> None:
    registry = UpstreamRegistry(FakeClock())
    a = registry.for_url("openai", "http://api.example:8000/v1/chat/completions")
    assert registry.for_url("openai", "http://api.example:8000/other") is a
    assert registry.for_url("openai", "http://other.example:8000/v1") is not a
    assert registry.for_url("vllm", "http://api.example:8000/v1") is not a
    assert a.label == "openai" and len(registry) == 3
    assert host_of("https://h.example/v1") == "h.example:443"


def test_slots_are_made_once_per_upstream() -> None:
    registry = UpstreamRegistry(FakeClock())
    state = registry.get("openai", "h:1")
    made: list[int] = []
    first = state.slot("mine", lambda st: made.append(1) or object())
    assert state.slot("mine", lambda st: object()) is first and made == [1]
    assert state.peek("mine") is first and state.peek("other") is None


def test_the_cooldown_keeps_the_longest_pause() -> None:
    clock = FakeClock()
    state = UpstreamRegistry(clock).get("openai", "h:1")
    assert state.cooldown_left() == 0
    state.cool_down(2)
    state.cool_down(1)
    assert state.cooldown_left() == 2
    clock.advance(1.5)
    assert state.cooldown_left() == pytest.approx(0.5)
    clock.advance(1)
    assert state.cooldown_left() == 0


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"),
                                                 (4.5, "5"), (60, "60")])
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


def test_a_refusal_is_a_503_problem_with_its_kind() -> None:
    refused = UpstreamRefused(kind="cooldown", retry_after_s=2.5, internal="upstream openai cooling down")
    assert (refused.status, refused.headers["Retry-After"], refused.attempts) == (503, "3", 0)
    assert refused.problem()["kind"] == "cooldown"
    again = republished(refused, "Speaker resolution temporarily unavailable")
    assert isinstance(again, UpstreamRefused) and again.status == 503
    assert again.headers == {"Retry-After": "3"} and again.public_detail.startswith("Speaker")
    assert refused.public_detail != again.public_detail  # the original is untouched


def test_an_upstream_failure_stays_502_when_republished() -> None:
    failed = UpstreamError(kind="status", upstream_status=503, attempts=3, internal="x")
    again = republished(failed, "Speaker resolution temporarily unavailable")
    assert (again.status, again.kind, again.attempts, again.upstream_status) == (502, "status", 3, 503)
    assert again.problem()["kind"] == "status" and "Retry-After" not in again.headers


async def test_a_cancelled_call_is_still_counted(fake: FakeUpstream, provider: SharedClientProvider) -> None:
    """A finalize budget cancels a hung attempt: the call and the attempt count, as ``budget``."""
    telemetry = Telemetry()
    exporter = RecordingExporter()
    telemetry.attach(exporter)  # type: ignore[arg-type]
    upstream = Upstream(single_attempt_call(send_attempt(provider, telemetry)), provider,
                        telemetry=telemetry)
    fake.default = Step.hang(30)
    task = asyncio.create_task(upstream.request(request_to(fake)))
    await fake.wait_for_attempts(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert exporter.count("ballast_upstream_attempts_total", "openai", "budget") == 1
    assert exporter.count("ballast_upstream_calls_total", "openai", "budget") == 1
