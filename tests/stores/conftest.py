"""Fixtures for the store tests: real Redis and PostgreSQL servers, unique names, a TCP proxy.

The servers are the ones every development and CI machine runs (Redis at 127.0.0.1:6379,
PostgreSQL at 127.0.0.1:5432, database ``test``, user ``postgres``, trust auth); the
environment variables ``STROMA_TEST_REDIS_URL`` / ``STROMA_TEST_POSTGRES_DSN`` point the tests
elsewhere. An unreachable server skips its tests with a reason saying how to start it, unless
``STROMA_REQUIRE_SERVICES=1`` (set by ``.ci/run``), which fails them instead.

redis.asyncio and asyncpg run on asyncio only, so these tests run on the asyncio backend.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from tests.services import (
    POSTGRES_DSN,
    REDIS_URL,
    START_POSTGRES,
    START_REDIS,
    drop_postgres_tables,
    drop_redis_prefix,
    host_port,
    require,
    unique,
)


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio and asyncpg only run on asyncio."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a reachable Redis server (or the test skips/fails, saying how to start it)."""
    return require("Redis", REDIS_URL, 6379, START_REDIS)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of a reachable PostgreSQL server (or the test skips/fails with how to start it)."""
    return require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """``unique_name(prefix)`` gives a fresh name (test modules cannot import conftest)."""
    return unique


@pytest.fixture
def run_prefix() -> str:
    """A unique prefix for the run ids of one test."""
    return unique("run")


# --------------------------------------------------------------------- store fixtures


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Any]:
    """A RedisStore under a key prefix of its own, emptied and closed afterwards."""
    from interpreters.stores.redis import RedisStore

    prefix = unique("stroma-test")
    store = RedisStore(redis_url, key_prefix=prefix, lease_ms=400)
    try:
        yield store
    finally:
        await store.close()
        await drop_redis_prefix(redis_url, prefix)


@pytest.fixture
async def postgres_store(postgres_dsn: str) -> AsyncIterator[Any]:
    """A PostgresStore with tables of its own, dropped and closed afterwards."""
    from interpreters.stores.postgres import PostgresStore

    store = PostgresStore(postgres_dsn, table_prefix=unique("t"), lease_seconds=0.4)
    try:
        yield store
    finally:
        await store.close()
        await drop_postgres_tables(postgres_dsn, store.tables)


# ------------------------------------------------------------------------ a TCP proxy


class Proxy:
    """A TCP proxy on 127.0.0.1 that drops its first ``drop`` connections, then forwards."""

    def __init__(self, port: int, drop: int) -> None:
        self.port = port
        self.drop = drop
        self.connections = 0

    def url(self, url: str) -> str:
        """``url`` (a redis URL or a postgres DSN) pointed at this proxy."""
        return retarget(url, self.port)


@asynccontextmanager
async def tcp_proxy(target: str, default_port: int, drop: int = 1) -> AsyncIterator[Proxy]:
    """Forward to the server of ``target`` (a URL), closing the first ``drop`` connections."""
    host, port = host_port(target, default_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy = Proxy(listener.extra(SocketAttribute.local_port), drop)

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
        try:
            async for chunk in src:
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            await dst.aclose()

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client:
            proxy.connections += 1
            if proxy.connections <= proxy.drop:
                return  # close at once: the client sees a reset/closed connection
            async with await anyio.connect_tcp(host, port) as upstream:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump, client, upstream)
                    tg.start_soon(pump, upstream, client)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            try:
                yield proxy
            finally:
                tg.cancel_scope.cancel()
    finally:
        await listener.aclose()


def retarget(url: str, port: int) -> str:
    """``url`` with its host:port replaced by 127.0.0.1:``port``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return parts._replace(netloc=f"{userinfo}127.0.0.1:{port}").geturl()


@pytest.fixture
def proxy_factory() -> Callable[..., AbstractAsyncContextManager[Proxy]]:
    """``async with proxy_factory(url, default_port, drop=1) as proxy``: see ``tcp_proxy``."""
    return tcp_proxy


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on (bound then released): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def repo_env() -> Iterator[dict[str, str]]:
    """The environment for a child Python process that imports stroma from this checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    yield env


# ------------------------------------------------------------ a lease-holding process

LEASE_HOLDER_CODE = """
import sys

import anyio


async def main(kind, target, name, run_id, holder):
    if kind == "redis":
        from interpreters.stores.redis import RedisStore

        store = RedisStore(target, key_prefix=name, lease_ms=300)
    else:
        from interpreters.stores.postgres import PostgresStore

        store = PostgresStore(target, table_prefix=name, lease_seconds=0.3)
    async with store.lease(run_id, holder):
        print("LEASED", flush=True)
        await anyio.sleep_forever()


anyio.run(main, *sys.argv[1:6])
"""


@asynccontextmanager
async def _lease_holder(
    env: dict[str, str], kind: str, target: str, name: str, run_id: str, holder: str
) -> AsyncIterator[anyio.abc.Process]:
    command = [sys.executable, "-c", LEASE_HOLDER_CODE, kind, target, name, run_id, holder]
    process = await anyio.open_process(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        seen = b""
        with anyio.fail_after(60):
            while b"LEASED\n" not in seen:
                try:
                    seen += await process.stdout.receive()
                except anyio.EndOfStream:
                    errors = b""
                    async for chunk in process.stderr:
                        errors += chunk
                    pytest.fail(
                        f"the lease-holding child exited before taking the lease:\n"
                        f"{errors.decode(errors='replace')}"
                    )
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
        await process.aclose()


@pytest.fixture
def lease_holder(
    repo_env: dict[str, str],
) -> Callable[..., AbstractAsyncContextManager[anyio.abc.Process]]:
    """``async with lease_holder(kind, target, name, run_id, holder) as process``.

    Starts a real Python process that takes the lease on ``run_id`` as ``holder`` through a
    store of ``kind`` ("redis": target is the URL, name the key prefix; "postgres": the DSN
    and the table prefix) with a 300 ms lease, and sleeps forever; the context is entered
    once the child holds the lease, and the child is killed on exit.
    """

    def start(
        kind: str, target: str, name: str, run_id: str, holder: str
    ) -> AbstractAsyncContextManager[anyio.abc.Process]:
        return _lease_holder(repo_env, kind, target, name, run_id, holder)

    return start
