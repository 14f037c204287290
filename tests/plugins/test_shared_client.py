"""The shared client: exactly one session per app, recreated when closed, never leaked.

A leaked ``ClientSession`` shows up only as a ResourceWarning from its finalizer and an
"Unclosed client session" line from the event loop; both are errors in this module.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from fake_upstream import FakeUpstream
from pydantic import ValidationError

from ballast.config import PluginSection, load_settings
from ballast.plugins import shared_client
from ballast.plugins.shared_client import Settings, SharedClientProvider
from ballast.upstream import UpstreamRequest, single_attempt_call

pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture
def sessions_made(monkeypatch: pytest.MonkeyPatch) -> list[aiohttp.ClientSession]:
    """Every ``ClientSession`` created during the test, whoever created it."""
    made: list[aiohttp.ClientSession] = []
    original = aiohttp.ClientSession.__init__

    def init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(aiohttp.ClientSession, "__init__", init)
    return made


@pytest.fixture(autouse=True)
def no_unclosed_session_reports(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The event loop reports a session or connector dropped unclosed; none may be."""
    yield
    gc.collect()
    assert "Unclosed client session" not in caplog.text
    assert "Unclosed connector" not in caplog.text


@pytest_asyncio.fixture
async def provider() -> AsyncIterator[SharedClientProvider]:
    p = SharedClientProvider(Settings())
    try:
        yield p
    finally:
        await p.close()


class SlowOpenProvider(SharedClientProvider):
    """Creation takes a while, so concurrent first callers really do overlap in it."""

    async def _open(self) -> aiohttp.ClientSession:
        await asyncio.sleep(0.02)
        return await super()._open()


async def test_100_concurrent_first_uses_create_exactly_one_session(
        provider: SharedClientProvider, sessions_made: list[aiohttp.ClientSession]) -> None:
    sessions = await asyncio.gather(*(provider.session() for _ in range(100)))
    assert provider.created == 1
    assert len(sessions_made) == 1
    assert all(s is sessions_made[0] for s in sessions)
    assert not sessions_made[0].closed


async def test_concurrent_first_uses_wait_for_a_slow_creation_instead_of_racing(
        sessions_made: list[aiohttp.ClientSession]) -> None:
    provider = SlowOpenProvider()
    try:
        sessions = await asyncio.gather(*(provider.session() for _ in range(100)))
        assert provider.created == 1
        assert len(sessions_made) == 1
        assert all(s is sessions_made[0] for s in sessions)
    finally:
        await provider.close()
    assert sessions_made[0].closed


async def test_later_uses_get_the_same_session(provider: SharedClientProvider) -> None:
    first = await provider.session()
    for _ in range(5):
        assert await provider.session() is first
    assert provider.created == 1


async def test_a_closed_session_is_recreated_on_next_use(
        provider: SharedClientProvider, sessions_made: list[aiohttp.ClientSession]) -> None:
    first = await provider.session()
    await first.close()
    second = await provider.session()
    assert second is not first
    assert not second.closed
    assert provider.created == 2
    assert provider.current is second
    await provider.close()
    assert sessions_made == [first, second]
    assert all(s.closed for s in sessions_made)


async def test_close_closes_the_session_and_forgets_it(
        provider: SharedClientProvider, sessions_made: list[aiohttp.ClientSession]) -> None:
    session = await provider.session()
    await provider.close()
    assert session.closed
    assert provider.current is None
    await provider.close()  # twice is harmless
    # Still usable afterwards: a new session, closed by the next close().
    again = await provider.session()
    assert again is not session and not again.closed
    assert provider.created == 2
    await provider.close()
    assert again.closed
    assert sessions_made == [session, again]


async def test_close_before_any_use_creates_nothing() -> None:
    provider = SharedClientProvider()
    await provider.close()
    assert provider.created == 0
    assert provider.current is None


def test_the_provider_is_built_outside_a_loop_and_its_session_inside_one() -> None:
    provider = SharedClientProvider()  # at app build: no running loop, nothing created
    assert provider.created == 0

    async def use() -> bool:
        session = await provider.session()
        try:
            return session.connector is not None and not session.closed
        finally:
            await provider.close()

    assert asyncio.run(use()) is True
    assert provider.created == 1


async def test_the_connector_follows_the_settings() -> None:
    provider = SharedClientProvider(Settings(limit=7, limit_per_host=3, keepalive_timeout_s=5,
                                             dns_cache_ttl_s=0))
    try:
        session = await provider.session()
        connector = session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit == 7
        assert connector.limit_per_host == 3
        assert connector.use_dns_cache is False
    finally:
        await provider.close()


async def test_upstream_calls_share_one_session_and_shutdown_leaks_nothing(
        sessions_made: list[aiohttp.ClientSession]) -> None:
    provider = SharedClientProvider()
    call = single_attempt_call(provider)
    async with FakeUpstream() as fake:
        request = UpstreamRequest("POST", fake.base_url + "/chat/completions", json={},
                                  attempt_timeout_s=5)
        responses = await asyncio.gather(*(call(request) for _ in range(20)))
        assert [r.status for r in responses] == [200] * 20
        assert fake.attempts == 20
        assert provider.created == 1
        await provider.close()
    assert provider.current is None
    assert len(sessions_made) == 1 and sessions_made[0].closed


def test_defaults() -> None:
    s = Settings()
    assert (s.limit, s.limit_per_host, s.keepalive_timeout_s, s.dns_cache_ttl_s) == (100, 20, 30.0, 10)
    assert s.enabled is True
    for name, field in Settings.model_fields.items():
        if name != "enabled":
            assert field.description, f"{name} has no description"


@pytest.mark.parametrize("bad", [{"limit": 0}, {"limit_per_host": -1}, {"keepalive_timeout_s": 0},
                                 {"dns_cache_ttl_s": -5}, {"pool": 3}])
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate(bad)


def test_hook_ballast_settings_model() -> None:
    model = shared_client.ballast_settings_model()
    assert model is Settings
    assert issubclass(model, PluginSection)


async def test_hook_ballast_client_provider(tmp_path: Path) -> None:
    path = tmp_path / "ballast.toml"
    path.write_text("[plugins.shared_client]\nlimit = 11\n")
    config = load_settings(path, environ={"BALLAST__PLUGINS__SHARED_CLIENT__LIMIT_PER_HOST": "4"})
    config.plugins["shared_client"] = Settings.model_validate(config.settings.plugins["shared_client"])

    provider = shared_client.ballast_client_provider(config=config)
    assert isinstance(provider, SharedClientProvider)
    assert provider.owns_sessions is False
    assert (provider.settings.limit, provider.settings.limit_per_host) == (11, 4)
    try:
        session = await provider.session()
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert session.connector.limit == 11
    finally:
        await provider.close()
