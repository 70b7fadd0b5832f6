"""The real servers the store tests talk to, shared by every conftest that needs them.

Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (database ``test``, user
``postgres``, trust auth), overridable with ``STROMA_TEST_REDIS_URL`` /
``STROMA_TEST_POSTGRES_DSN``. An unreachable server skips its tests with a reason saying
how to start it, unless ``STROMA_REQUIRE_SERVICES=1`` (set by ``.ci/run``), which fails them.
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("STROMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get(
    "STROMA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require(name: str, url: str, default_port: int, how: str) -> str:
    """``url`` if its server answers; else skip (or fail under STROMA_REQUIRE_SERVICES=1)."""
    host, port = host_port(url, default_port)
    if reachable(host, port):
        return url
    reason = f"{name} is not reachable at {host}:{port}; start it with: {how}"
    if os.environ.get("STROMA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (STROMA_REQUIRE_SERVICES=1, so this is a failure, not a skip)")
    pytest.skip(reason)


def unique(prefix: str = "t") -> str:
    """A fresh name for keys, tables and run ids, so tests never see each other's data."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def drop_redis_prefix(url: str, key_prefix: str) -> None:
    """Delete every key under ``key_prefix``."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=key_prefix.encode() + b":*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


async def drop_postgres_tables(dsn: str, tables: tuple[str, ...]) -> None:
    """Drop the given (already quoted) tables."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(tables)}")
    finally:
        await conn.close()
