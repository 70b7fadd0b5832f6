"""Fixtures for the resume tests: both anyio backends, real Redis and PostgreSQL.

The servers are those of ``tests/services.py`` (shared with the store tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.services import (
    POSTGRES_DSN,
    REDIS_URL,
    START_POSTGRES,
    START_REDIS,
    drop_postgres_tables,
    drop_redis_prefix,
    require,
    unique,
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Memory and file tests run on asyncio and on trio (server modules override this)."""
    return str(request.param)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a reachable Redis server (or the test skips/fails, saying how to start it)."""
    return require("Redis", REDIS_URL, 6379, START_REDIS)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of a reachable PostgreSQL server (or the test skips/fails with how to start it)."""
    return require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)


@pytest.fixture
async def redis_stores(redis_url: str) -> AsyncIterator[Callable[[], Any]]:
    """``make()`` gives a new RedisStore (a worker of its own) on one shared key prefix; all
    are closed and the prefix emptied afterwards."""
    from interpreters.stores.redis import RedisStore

    prefix = unique("stroma-review")
    made: list[Any] = []

    def make() -> Any:
        made.append(RedisStore(redis_url, key_prefix=prefix, lease_ms=400))
        return made[-1]

    try:
        yield make
    finally:
        for store in made:
            await store.close()
        await drop_redis_prefix(redis_url, prefix)


@pytest.fixture
async def postgres_stores(postgres_dsn: str) -> AsyncIterator[Callable[[], Any]]:
    """``make()`` gives a new PostgresStore (a worker of its own) on one shared set of
    tables; all are closed and the tables dropped afterwards."""
    from interpreters.stores.postgres import PostgresStore

    prefix = unique("rr")
    made: list[Any] = []

    def make() -> Any:
        made.append(PostgresStore(postgres_dsn, table_prefix=prefix, lease_seconds=0.4))
        return made[-1]

    try:
        yield make
    finally:
        for store in made:
            await store.close()
        if made:
            await drop_postgres_tables(postgres_dsn, made[0].tables)


@pytest.fixture
def file_stores(tmp_path: Any) -> Callable[[], Any]:
    """``make()`` gives a new FileStore (a worker of its own) on one shared folder."""
    from interpreters.stores.file import FileStore

    return lambda: FileStore(tmp_path / "runs")
