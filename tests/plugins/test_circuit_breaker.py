"""The circuit breaker: its state machine on a fake clock (no sleeps), then its attempt
wrapper in front of a real fake upstream, then the plugin's hooks and settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstream, Step
from pydantic import ValidationError
from resilience_support import FakeClock, RecordingExporter
from structlog.testing import capture_logs

from ballast.config import load_settings
from ballast.errors import UpstreamError
from ballast.plugin_manager import load_plugins
from ballast.plugins import circuit_breaker
from ballast.plugins.circuit_breaker import BreakerWrapper, CircuitBreaker, Settings, State, is_failure
from ballast.plugins.shared_client import SharedClientProvider
from ballast.resilience import UpstreamRefused, UpstreamRegistry
from ballast.telemetry import Telemetry
from ballast.upstream import UpstreamRequest, UpstreamResponse, send_attempt


def breaker(clock: FakeClock, transitions: list[State] | None = None, **settings: Any) -> CircuitBreaker:
    s = Settings(**{"minimum_calls": 4, "failure_ratio": 0.5, "window_s": 10, "break_s": 5,
                    "max_break_s": 60, **settings})
    return CircuitBreaker("up", s, clock,
                          None if transitions is None else lambda b, st: transitions.append(st))


def attempt(b: CircuitBreaker, *, failed: bool) -> bool:
    """One attempt through the breaker: False if it was refused."""
    permit = b.acquire()
    if permit is None:
        return False
    b.record(permit, failed=failed)
    return True


# --------------------------------------------------------------------------------------
# the state machine
# --------------------------------------------------------------------------------------


def test_closed_until_the_minimum_calls_even_if_all_fail() -> None:
    b = breaker(FakeClock())
    for _ in range(3):
        assert attempt(b, failed=True)
    assert b.state is State.CLOSED
    assert attempt(b, failed=True)  # the 4th: 4 of 4 failed
    assert b.state is State.OPEN


def test_opens_at_the_failure_ratio_not_below() -> None:
    b = breaker(FakeClock(), minimum_calls=10, failure_ratio=0.5)
    for i in range(10):
        attempt(b, failed=i % 2 == 0 and i < 8)  # 4 failures of 10: 40 %
    assert b.state is State.CLOSED and b.counts() == (10, 4)
    attempt(b, failed=True)  # 5 of 11: 45 %
    assert b.state is State.CLOSED
    attempt(b, failed=True)  # 6 of 12: 50 %
    assert b.state is State.OPEN


def test_old_outcomes_leave_the_window() -> None:
    clock = FakeClock()
    b = breaker(clock, minimum_calls=4, window_s=10)
    for _ in range(3):
        attempt(b, failed=True)
    clock.advance(11)  # those three are out of the window now
    assert b.counts() == (0, 0)
    attempt(b, failed=True)
    assert b.state is State.CLOSED


def test_open_refuses_then_turns_half_open_after_the_break() -> None:
    clock = FakeClock()
    seen: list[State] = []
    b = breaker(clock, seen, minimum_calls=1, break_s=5)
    attempt(b, failed=True)
    assert b.state is State.OPEN and b.acquire() is None
    assert b.retry_after_s() == pytest.approx(5)
    clock.advance(3.2)
    assert b.acquire() is None and b.retry_after_s() == pytest.approx(1.8)
    clock.advance(1.8)
    assert b.state is State.HALF_OPEN
    assert seen == [State.OPEN, State.HALF_OPEN]


def test_half_open_lets_one_probe_through_and_closes_on_its_success() -> None:
    clock = FakeClock()
    seen: list[State] = []
    b = breaker(clock, seen, minimum_calls=1, break_s=5)
    attempt(b, failed=True)
    clock.advance(5)
    probe = b.acquire()
    assert probe is not None and probe.probe
    assert b.acquire() is None and b.retry_after_s() == 1.0  # one probe at a time
    b.record(probe, failed=False)
    assert b.state is State.CLOSED and b.counts() == (0, 0)
    assert seen == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_probe_reopens_with_a_doubled_break_up_to_the_cap() -> None:
    clock = FakeClock()
    b = breaker(clock, minimum_calls=1, break_s=5, max_break_s=12)
    attempt(b, failed=True)
    breaks = [b.current_break_s]
    for _ in range(3):
        clock.advance(b.retry_after_s())
        assert b.state is State.HALF_OPEN
        assert attempt(b, failed=True)  # the probe fails
        assert b.state is State.OPEN
        breaks.append(b.current_break_s)
    assert breaks == [5, 10, 12, 12]
    clock.advance(12)
    assert attempt(b, failed=False)
    assert b.state is State.CLOSED
    attempt(b, failed=True)  # opens again after a success: back to the first break
    assert b.current_break_s == 5


def test_several_probes_must_all_succeed() -> None:
    clock = FakeClock()
    b = breaker(clock, minimum_calls=1, half_open_probes=2)
    attempt(b, failed=True)
    clock.advance(5)
    p1, p2 = b.acquire(), b.acquire()
    assert p1 is not None and p2 is not None and b.acquire() is None
    b.record(p1, failed=False)
    assert b.state is State.HALF_OPEN
    b.record(p2, failed=False)
    assert b.state is State.CLOSED


def test_a_released_probe_frees_its_place_and_counts_nothing() -> None:
    clock = FakeClock()
    b = breaker(clock, minimum_calls=1)
    attempt(b, failed=True)
    clock.advance(5)
    probe = b.acquire()
    assert probe is not None
    b.release(probe)
    assert b.state is State.HALF_OPEN
    again = b.acquire()
    assert again is not None and again.probe


def test_outcomes_of_attempts_started_in_an_earlier_state_are_ignored() -> None:
    clock = FakeClock()
    b = breaker(clock, minimum_calls=2)
    slow = b.acquire()  # started while closed
    assert slow is not None
    attempt(b, failed=True)
    attempt(b, failed=True)
    assert b.state is State.OPEN
    clock.advance(5)
    probe = b.acquire()
    assert probe is not None
    b.record(slow, failed=False)  # the old attempt's success does not close the breaker
    assert b.state is State.HALF_OPEN


@pytest.mark.parametrize(("status", "failed"), [(200, False), (400, False), (404, False), (429, True),
                                                (500, True), (502, True), (503, True), (504, True)])
def test_which_statuses_count_as_failures(status: int, failed: bool) -> None:
    assert is_failure(UpstreamResponse(status, {}, b""), None) is failed


@pytest.mark.parametrize(("kind", "failed"), [("timeout", True), ("connection", True),
                                              ("redirect", False), ("too_large", False)])
def test_which_errors_count_as_failures(kind: str, failed: bool) -> None:
    assert is_failure(None, UpstreamError(kind=kind)) is failed


# --------------------------------------------------------------------------------------
# the attempt wrapper, against the fake upstream
# --------------------------------------------------------------------------------------


def request_to(fake: FakeUpstream) -> UpstreamRequest:
    return UpstreamRequest("POST", fake.base_url + "/chat/completions", name="test.inference",
                           json={"model": "m", "messages": []}, upstream="openai", attempt_timeout_s=5)


async def test_an_open_breaker_refuses_before_sending(fake: FakeUpstream,
                                                      provider: SharedClientProvider) -> None:
    clock = FakeClock()
    registry = UpstreamRegistry(clock)
    telemetry = Telemetry()
    exporter = RecordingExporter()
    telemetry.attach(exporter)  # type: ignore[arg-type]
    wrapper = BreakerWrapper(Settings(minimum_calls=2, break_s=3), registry, telemetry)
    guarded = wrapper(send_attempt(provider, telemetry))
    fake.default = Step.status(503)
    with capture_logs() as logs:
        for _ in range(2):
            assert (await guarded(request_to(fake))).status == 503
        with pytest.raises(UpstreamRefused) as caught:
            await guarded(request_to(fake))
    assert fake.attempts == 2
    refused = caught.value
    assert (refused.status, refused.kind, refused.attempts) == (503, "circuit_open", 0)
    assert refused.headers["Retry-After"] == "3"
    assert str(fake.port) not in refused.public_detail + refused.internal
    [opened] = [e for e in logs if e["event"] == "circuit.opened"]
    assert (opened["upstream"], opened["window_attempts"], opened["window_failures"], opened["ratio"]) == \
        ("openai", 2, 2, 1.0)
    assert exporter.gauge("ballast_circuit_state", "openai") == 2
    assert exporter.count("ballast_circuit_transitions_total", "openai", "open") == 1
    assert exporter.count("ballast_upstream_attempts_total", "openai", "status") == 2

    # The break passes, the upstream heals: one probe, then closed.
    clock.advance(3)
    assert exporter.gauge("ballast_circuit_state", "openai") == 1
    fake.default = Step.ok()
    with capture_logs() as logs:
        assert (await guarded(request_to(fake))).status == 200
    assert [e["event"] for e in logs if e["event"].startswith("circuit.")] == ["circuit.closed"]
    assert exporter.gauge("ballast_circuit_state", "openai") == 0
    assert exporter.count("ballast_circuit_transitions_total", "openai", "closed") == 1


async def test_each_upstream_has_its_own_breaker(fake: FakeUpstream, provider: SharedClientProvider) -> None:
    registry = UpstreamRegistry(FakeClock())
    wrapper = BreakerWrapper(Settings(minimum_calls=1), registry, Telemetry())
    guarded = wrapper(send_attempt(provider))
    fake.default = Step.status(503)
    await guarded(request_to(fake))
    with pytest.raises(UpstreamRefused):
        await guarded(request_to(fake))
    other = UpstreamRequest("POST", fake.base_url.replace("127.0.0.1", "localhost") + "/chat/completions",
                            json={}, upstream="openai")
    assert (await guarded(other)).status == 503  # same provider, another host: still closed
    assert len(registry) == 2


# --------------------------------------------------------------------------------------
# hooks and settings
# --------------------------------------------------------------------------------------


def test_hook_ballast_settings_model() -> None:
    assert circuit_breaker.ballast_settings_model() is Settings


def test_defaults_are_the_contract() -> None:
    s = Settings()
    assert (s.enabled, s.failure_ratio, s.minimum_calls, s.window_s, s.break_s, s.max_break_s,
            s.half_open_probes) == (True, 0.5, 10, 30.0, 5.0, 60.0, 1)


def test_a_break_longer_than_its_cap_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_break_s"):
        Settings(break_s=10, max_break_s=5)


def test_hook_ballast_upstream_attempt_wrappers_of_the_breaker(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text("[plugins.circuit_breaker]\nminimum_calls = 3\n")
    config = load_settings(path, environ={"BALLAST__PLUGINS__CIRCUIT_BREAKER__BREAK_S": json.dumps(2)})
    plugins = load_plugins(config)
    registry = UpstreamRegistry()
    groups = plugins.hook.ballast_upstream_attempt_wrappers(config=config, telemetry=Telemetry(),
                                                             upstreams=registry)
    specs = {s.name: s for group in groups for s in group}
    assert specs["circuit_breaker"].order == 100 < specs["retry.cooldown"].order
    wrapper = specs["circuit_breaker"].wrap
    assert isinstance(wrapper, BreakerWrapper)
    assert (wrapper.settings.minimum_calls, wrapper.settings.break_s) == (3, 2.0)
    assert wrapper.upstreams is registry
