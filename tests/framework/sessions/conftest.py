"""The store-port fixture: every test that takes ``stores`` runs once per adapter.

``stores`` is a factory of opened stores on ONE database for the test (a SQLite file in
the test's directory, or a fresh PostgreSQL database from ``pg_url``). Calling it
twice gives two independent stores on the same database, as two server processes
would have. The PostgreSQL case skips with a reason when no server is configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ballast.sessions.store import Store

BACKENDS = ("sqlite", "postgres")

StoreFactory = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def stores(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """``async with stores(**kw) as store``: an opened store of the backend under test."""
    if backend == "postgres":
        url: str = request.getfixturevalue("pg_url")

        @asynccontextmanager
        async def open_pg(**kw: Any) -> AsyncIterator[Store]:
            from ballast.sessions.postgres_store import PostgresStore

            kw.pop("durability", None)
            store = PostgresStore(url, pool_size=kw.pop("pool_size", 4), **kw)
            await store.open()
            try:
                yield store
            finally:
                await store.close()

        return open_pg

    @asynccontextmanager
    async def open_sqlite(**kw: Any) -> AsyncIterator[Store]:
        from ballast.sessions.sqlite_store import SQLiteStore

        kw.pop("pool_size", None)
        store = SQLiteStore(tmp_path / "store.db", **kw)
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    return open_sqlite
