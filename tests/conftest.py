"""Fixtures every test folder shares: the fake upstream, a shared client provider, and a
fresh PostgreSQL database when one is configured.

Tests that need PostgreSQL take ``pg_url``. The server is the one named by
``BALLAST_TEST_PG_URL`` (``.ci/run`` sets it when a server answers at 127.0.0.1:5432).
Unset: those tests skip and say why. Set: a server that cannot be reached fails them,
since a silently skipped backend is how a broken one ships.

Every test gets a database of its own, made from ``template0`` and dropped afterwards,
so tests never see each other's rows and a test run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from fake_upstream import FakeUpstream

from ballast.plugins.shared_client import SharedClientProvider

PG_ENV = "BALLAST_TEST_PG_URL"


def _with_database(url: str, database: str) -> str:
    """``url`` pointing at ``database`` instead of the one it names."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.partition("/")[0]
    return f"{scheme}://{authority}/{database}" + (f"?{query}" if query else "")


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The configured server's URL, checked once per run; skip if none is configured."""
    url = os.environ.get(PG_ENV, "")
    if not url:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against "
                    "(.ci/run sets it when one answers at 127.0.0.1:5432)")
    try:
        asyncio.run(_admin(url, "SELECT 1"))
    except Exception as exc:  # a configured server must answer: fail, do not skip
        pytest.fail(f"{PG_ENV} is set but PostgreSQL does not answer there: {type(exc).__name__}: {exc}")
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty database for this test; dropped when the test ends."""
    name = f"ballast_test_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(_admin(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE template0'))
    try:
        yield _with_database(pg_server_url, name)
    finally:
        asyncio.run(_admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """The scripted fake upstream (tests/fake_upstream.py), in this process, on loopback."""
    async with FakeUpstream() as server:
        yield server


@pytest_asyncio.fixture
async def provider() -> AsyncIterator[SharedClientProvider]:
    """The shared outbound client provider, closed after the test."""
    p = SharedClientProvider()
    try:
        yield p
    finally:
        await p.close()
