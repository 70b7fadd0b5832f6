"""Fixtures for the fault tests: the shared servers, and Redis servers of the tests' own.

Faults that need a server to stop, restart or pause use a ``redis-server`` this fixture
starts on a free port in a temporary folder (append-only file, fsync always, so a restart
keeps the data); the shared servers at 6379 and 5432 are never stopped or reconfigured
(PostgreSQL faults terminate only the backends of the test's own store, found by its
``application_name``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.faults.kit import OwnRedis
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

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio and asyncpg only run on asyncio (FileStore tests override this)."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the shared Redis server (or the test skips/fails, saying how to start it)."""
    return require("Redis", REDIS_URL, 6379, START_REDIS)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of the shared PostgreSQL server (or the test skips/fails with how to start it)."""
    return require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)


@pytest.fixture
def repo_env() -> dict[str, str]:
    """The environment for a child Python process that imports stroma from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str, str]]:
    """``(kind, target, name)`` for each shared server: ``("redis", url, key prefix)`` and
    ``("postgres", dsn, table prefix)``, the prefix fresh and emptied/dropped afterwards."""
    kind = str(request.param)
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = unique("stroma-fault")
        try:
            yield kind, url, prefix
        finally:
            await drop_redis_prefix(url, prefix)
        return
    from interpreters.stores.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres_dsn")
    prefix = unique("f")
    try:
        yield kind, dsn, prefix
    finally:
        await drop_postgres_tables(dsn, PostgresStore(dsn, table_prefix=prefix).tables)


@pytest.fixture
async def postgres_prefix(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh table prefix on the shared PostgreSQL server; its tables dropped afterwards."""
    from interpreters.stores.postgres import PostgresStore

    prefix = unique("f")
    try:
        yield prefix
    finally:
        await drop_postgres_tables(postgres_dsn, PostgresStore(postgres_dsn,
                                                               table_prefix=prefix).tables)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A running redis-server of this test's own (skips if redis-server is not installed)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
