"""Fixtures for the resume review tests: both anyio backends, real Redis and PostgreSQL.

The server fixtures follow ``tests/stores/conftest.py`` (copied, not imported): Redis at
127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (database ``test``, user ``postgres``),
overridable with ``STROMA_TEST_REDIS_URL`` / ``STROMA_TEST_POSTGRES_DSN``. An unreachable
server skips its tests with a reason saying how to start it, unless
``STROMA_REQUIRE_SERVICES=1``, which fails them instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("STROMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get(
    "STROMA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Memory and file tests run on asyncio and on trio (server modules override this)."""
    return str(request.param)


def unique(prefix: str = "t") -> str:
    """A fresh name for keys, tables and run ids, so tests never see each other's data."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _require(name: str, url: str, default_port: int, how: str) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    if _reachable(host, port):
        return url
    reason = f"{name} is not reachable at {host}:{port}; start it with: {how}"
    if os.environ.get("STROMA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (STROMA_REQUIRE_SERVICES=1, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a reachable Redis server (or the test skips/fails, saying how to start it)."""
    return _require("Redis", REDIS_URL, 6379, START_REDIS)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of a reachable PostgreSQL server (or the test skips/fails with how to start it)."""
    return _require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)


async def _drop_redis_prefix(url: str, key_prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=key_prefix.encode() + b":*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


async def _drop_postgres_tables(dsn: str, tables: tuple[str, ...]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(tables)}")
    finally:
        await conn.close()


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
        await _drop_redis_prefix(redis_url, prefix)


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
            await _drop_postgres_tables(postgres_dsn, made[0].tables)
