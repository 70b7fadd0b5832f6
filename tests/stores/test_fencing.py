"""Fenced leases on RedisStore, SyncRedisStore and PostgresStore, against the real servers.

Every claim of a run gets a fencing token that grows with each claim; while a store object
holds the lease, its writes of the run are checked against the token atomically with the
write, so a worker whose lease expired and was taken over cannot write any more.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores._lease import LeaseLost, new_holder, worker_id
from stroma.errors import RunLocked, StoreError
from tests.services import drop_postgres_tables, drop_redis_prefix, unique

pytestmark = pytest.mark.anyio


class State(BaseModel):
    n: int


LINES = ['{"stroma_log":1}', '{"i":0}']


async def call(result: Any) -> Any:
    """Await an async store's answer; a sync store's is already there."""
    return await result if inspect.isawaitable(result) else result


class Server:
    """Two store objects (two workers) on one namespace, and a look behind their back."""

    def __init__(self, kind: str, a: Any, b: Any, raw_lines: Callable[[str], Awaitable[list[str]]],
                 expire: Callable[[str], Awaitable[None]],
                 lease_exists: Callable[[str], Awaitable[bool]]) -> None:
        self.kind, self.a, self.b = kind, a, b
        self.raw_lines, self.expire, self.lease_exists = raw_lines, expire, lease_exists


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("sync-redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """Each leasing store, as two workers with 30 s leases (no renewal during a test)."""
    kind = str(request.param)
    if kind in ("redis", "sync-redis"):
        import redis.asyncio as aioredis

        from interpreters.stores.redis import RedisStore, SyncRedisStore, _Keys

        url = request.getfixturevalue("redis_url")
        prefix = unique("stroma-fence")
        cls: Any = RedisStore if kind == "redis" else SyncRedisStore
        a, b = cls(url, key_prefix=prefix), cls(url, key_prefix=prefix)
        raw = aioredis.Redis.from_url(url)

        def keys(run: str) -> _Keys:
            return _Keys(prefix.encode(), run.encode())

        async def raw_lines(run: str) -> list[str]:
            return [x.decode() for x in await raw.lrange(keys(run).log, 0, -1)]

        async def expire(run: str) -> None:
            await raw.delete(keys(run).lease)

        async def lease_exists(run: str) -> bool:
            return bool(await raw.exists(keys(run).lease))

        try:
            yield Server(kind, a, b, raw_lines, expire, lease_exists)
        finally:
            for store in (a, b):
                await call(store.close())
            await raw.aclose()
            await drop_redis_prefix(url, prefix)
        return

    import asyncpg

    from interpreters.stores.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres_dsn")
    prefix = unique("fence")
    a, b = PostgresStore(dsn, table_prefix=prefix), PostgresStore(dsn, table_prefix=prefix)
    conn = await asyncpg.connect(dsn)

    async def pg_lines(run: str) -> list[str]:
        rows = await conn.fetch(f"SELECT line FROM {a.log_table} WHERE run_id = $1 ORDER BY seq",
                                run)
        return [r["line"] for r in rows]

    async def pg_expire(run: str) -> None:
        await conn.execute(f"UPDATE {a.leases_table} SET expires_at = now() - interval '1 s' "
                           "WHERE run_id = $1", run)

    async def pg_lease_exists(run: str) -> bool:
        return bool(await conn.fetchval(
            f"SELECT count(*) FROM {a.leases_table} WHERE run_id = $1 AND expires_at > now()",
            run))

    try:
        await a.setup()
        yield Server(kind, a, b, pg_lines, pg_expire, pg_lease_exists)
    finally:
        for store in (a, b):
            await store.close()
        await conn.close()
        await drop_postgres_tables(dsn, a.tables)


async def test_a_stale_holder_cannot_append_save_or_delete(server: Server) -> None:
    """After worker A's lease expired and B claimed the run, each of A's writes is refused
    with LeaseLost naming the run, both holders and the tokens, and B's log and checkpoints
    are exactly what B wrote."""
    a, b = server.a, server.b
    async with a.lease("r", "worker-a"):
        await call(a.append_log("r", LINES[:1]))
        await server.expire("r")  # A stalled past its lease
        async with b.lease("r", "worker-b"):
            await call(b.append_log("r", LINES[1:], ("n", State(n=2))))
            for write in (
                lambda: a.append_log("r", ['{"i":1}'], ("n", State(n=99))),
                lambda: a.append_log("r", ['{"i":1}']),
                lambda: a.save("r", "n", State(n=99)),
                lambda: a.delete("r"),
            ):
                with pytest.raises(LeaseLost) as info:
                    await call(write())
                error = info.value
                assert isinstance(error, RunLocked) and isinstance(error, StoreError)
                assert error.run_id == "r" and error.holder == "worker-b"
                assert error.stale_holder == "worker-a"
                assert error.current_token is not None and error.current_token > error.token
                message = str(error)
                assert "'r'" in message and "'worker-a'" in message and "'worker-b'" in message
                assert "fencing token" in message and "nothing was written" in message
            assert await server.raw_lines("r") == LINES
            assert await call(b.load("r", "n")) == State(n=2)


async def test_fencing_tokens_grow_with_every_claim(server: Server) -> None:
    """Each claim of a run records a larger token than the one before, whoever claims."""
    tokens = []
    for store, holder in [(server.a, "w1"), (server.b, "w2"), (server.a, "w1"), (server.a, "w3")]:
        async with store.lease("r", holder):
            held = store._fences["r"]
            assert held[0] == holder
            tokens.append(held[1])
        assert "r" not in store._fences  # forgotten once the lease is released
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def short_lease(server: Server) -> Any:
    """Another store object like ``server.a`` with a 150 ms lease."""
    a = server.a
    if server.kind == "postgres":
        return type(a)(a.dsn, table_prefix=a.table_prefix, lease_seconds=0.15)
    return type(a)(a.redis_url, key_prefix=a.key_prefix, lease_ms=150)


def break_io(server: Server, monkeypatch: pytest.MonkeyPatch, error: Exception,
             times: int | None = None) -> list[int]:
    """Make ``server.a``'s server calls raise ``error`` (the first ``times`` ones, or all);
    the list returned counts the failures."""
    store, failures = server.a, []
    name = "_conn" if server.kind == "postgres" else "_eval"
    original = getattr(store, name)

    def failing() -> bool:
        if times is None or len(failures) < times:
            failures.append(1)
            return True
        return False

    if server.kind == "sync-redis":
        def sync_io(*args: Any) -> Any:
            if failing():
                raise error
            return original(*args)

        monkeypatch.setattr(store, name, sync_io)
    elif server.kind == "redis":
        async def async_io(*args: Any) -> Any:
            if failing():
                raise error
            return await original(*args)

        monkeypatch.setattr(store, name, async_io)
    else:
        def conn() -> Any:
            if failing():
                raise error
            return original()

        monkeypatch.setattr(store, name, conn)
    return failures


async def test_a_renewed_lease_keeps_its_token_and_its_writes(server: Server) -> None:
    """Renewals extend the lease without a new token, so the holder keeps writing."""
    store = short_lease(server)
    try:
        async with store.lease("r", "worker-a"):
            token = store._fences["r"][1]
            for i in range(4):
                await anyio.sleep(0.1)  # more than the whole lease, renewed meanwhile
                await call(store.append_log("r", [f'{{"i":{i}}}']))
            assert store._fences["r"][1] == token
        assert len(await server.raw_lines("r")) == 4
    finally:
        await call(store.close())


async def test_writes_of_a_run_without_a_lease_here_are_not_fenced(server: Server) -> None:
    """A store object that holds no lease on a run writes it unchecked (the fence guards the
    runs it has leased)."""
    async with server.b.lease("other", "worker-b"):
        await call(server.a.append_log("other", LINES))
        assert await server.raw_lines("other") == LINES


async def test_a_lease_left_by_an_ended_session_of_this_worker_is_taken_over(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When a session's release fails (the server refuses it), its lease stays behind; the
    same worker's next session takes it over at once, while another worker is still locked
    out by it."""
    first = new_holder()
    assert first.startswith(worker_id() + "/") and first != new_holder()
    with caplog.at_level(logging.WARNING, "stroma.stores"):
        async with server.a.lease("r", first):
            break_io(server, monkeypatch, StoreError("the server refused (injected)"))
        monkeypatch.undo()
    assert await server.lease_exists("r"), "the failed release should leave the lease behind"
    assert "could not release" in caplog.text and "takes it over" in caplog.text
    with pytest.raises(RunLocked) as info:  # another worker: still locked out
        async with server.b.lease("r", "host:1:other/x"):
            pass
    assert info.value.holder == first
    second = new_holder()
    async with server.a.lease("r", second):  # this worker: taken over at once
        assert server.a._fences["r"][0] == second
    assert not await server.lease_exists("r")


async def test_two_live_sessions_of_one_run_in_one_process_exclude_each_other(
    server: Server,
) -> None:
    """Two sessions of this worker on the same run: the second gets RunLocked naming the
    first, on the same store object or another one."""
    first = new_holder()
    async with server.a.lease("r", first):
        for store in (server.a, server.b):
            with pytest.raises(RunLocked) as info:
                async with store.lease("r", new_holder()):
                    pass
            assert info.value.holder == first
        with pytest.raises(RunLocked):  # the same holder name, live here
            async with server.b.lease("r", first):
                pass
        assert server.a._fences["r"][0] == first


async def test_a_release_that_fails_once_is_retried(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient failure of the release (a connection reset) is retried, and the run is
    free at once afterwards."""
    async with server.a.lease("r", "worker-a"):
        failures = break_io(server, monkeypatch, ConnectionResetError("reset (injected)"), 1)
    assert failures == [1]
    assert not await server.lease_exists("r")
    async with server.b.lease("r", "worker-b"):
        pass
