"""Dropped connections, restarted and paused servers during a run: retried, or a StoreError.

PostgreSQL: the store's own backends are terminated (``pg_terminate_backend``, found by the
store's ``application_name``) at every node, and at random moments from beside the run.
Redis: a redis-server of the test's own is restarted, paused (SIGSTOP) past the socket
timeout, and stopped for good. A run either completes as if nothing happened, or ends with
one StoreError naming the operation and the run (never a raw client error, never an
ExceptionGroup), and resumes once the server is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from stroma.errors import StoreError
from stroma.runner import RunConfig, interpret
from tests.faults.kit import Acc, OwnRedis, pipeline
from tests.services import unique

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


# ------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def killer(postgres_dsn: str) -> AsyncIterator[Any]:
    """A connection of its own that terminates the backends of an application_name."""
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def terminate(killer: Any, app: str) -> int:
    rows = await killer.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        app,
    )
    return len(rows)


@pytest.mark.postgres
async def test_backends_terminated_at_every_node_are_retried(
    postgres_dsn: str, postgres_prefix: str, killer: Any
) -> None:
    """Every node terminates all of the store's connections: each next commit, renewal and
    release runs on a new connection, and the run completes with the right state."""
    from interpreters.stores.postgres import PostgresStore

    app = unique("app")
    killed: list[int] = []

    async def during(i: int) -> None:
        killed.append(await terminate(killer, app))
        # (the run lasts a few lease renewals: a 1 s lease renews every third of a second;
        # a shorter lease could lapse under a loaded machine's reconnects)
        await anyio.sleep(0.05)

    async with PostgresStore(postgres_dsn, table_prefix=postgres_prefix, lease_seconds=1.0,
                             application_name=app, max_attempts=8) as store:
        result = await interpret(pipeline(12, during=during), Acc(value=0), store=store,
                                 config=RunConfig(run_id="terminated"))
        assert str(result.status) == "COMPLETED" and result.final_state == Acc(value=12)
        log = await store.read_log("terminated")
        assert log is not None and log.finish is not None
    assert sum(killed) >= 12  # each node really dropped at least one connection


@pytest.mark.postgres
async def test_backends_terminated_at_random_moments_never_leak_a_client_error(
    postgres_dsn: str, postgres_prefix: str, killer: Any
) -> None:
    """While runs go on, the store's connections are terminated every 50 ms,
    mid-query and mid-transaction: every run completes, and nothing but a StoreError could
    have come out."""
    from interpreters.stores.postgres import PostgresStore

    app = unique("app")

    async def slow(i: int) -> None:
        await anyio.sleep(0.004)

    # (30 attempts and a 5 s lease, connections killed every 50 ms: on a loaded 2-core
    # machine, killed every 30 ms, 10 attempts ran out for a lease claim, and a 1.5 s lease
    # ran out before a renewal got through; the same before and after this change)
    async with PostgresStore(postgres_dsn, table_prefix=postgres_prefix, lease_seconds=5.0,
                             application_name=app, max_attempts=30) as store:
        outcomes: list[Any] = []

        async def run(n: int) -> None:
            try:
                outcomes.append(await interpret(pipeline(20, during=slow), Acc(value=n),
                                                store=store, config=RunConfig(run_id=f"r{n}")))
            except Exception as e:  # classified below
                outcomes.append(e)

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(run, n)

            async def chaos() -> None:
                while len(outcomes) < 4:
                    await terminate(killer, app)
                    await anyio.sleep(0.05)

            tg.start_soon(chaos)
    kinds = {type(o).__name__ for o in outcomes}
    assert kinds <= {"ExecutionResult", "StoreError"}, outcomes
    done = [o for o in outcomes if not isinstance(o, StoreError)]
    assert len(done) == 4, outcomes  # with 30 attempts, every run gets through
    assert sorted(o.final_state.value for o in done) == [20, 21, 22, 23]


# ------------------------------------------------------------------------------ Redis


def redis_store(server: OwnRedis, **kwargs: Any) -> Any:
    from interpreters.stores.redis import RedisStore

    return RedisStore(server.url, key_prefix="fault", **kwargs)


@pytest.mark.redis
async def test_a_redis_server_restarted_mid_run_is_waited_for(own_redis: OwnRedis) -> None:
    """The server is restarted (its data kept) inside node 4: the commits after it are
    retried until it is back, and the run completes with the right state."""
    restarted: list[int] = []

    async def during(i: int) -> None:
        if i == 4:
            await anyio.to_thread.run_sync(own_redis.restart)
            restarted.append(i)

    async with redis_store(own_redis, max_attempts=10, lease_ms=5000) as store:
        result = await interpret(pipeline(8, during=during), Acc(value=0), store=store,
                                 config=RunConfig(run_id="restarted"))
        assert restarted == [4]
        assert str(result.status) == "COMPLETED" and result.final_state == Acc(value=8)
        log = await store.read_log("restarted")
        assert log is not None and str(log.finish.status) == "COMPLETED"  # type: ignore[union-attr]


@pytest.mark.redis
async def test_a_redis_server_paused_past_the_socket_timeout_is_retried(
    own_redis: OwnRedis,
) -> None:
    """The server is paused (SIGSTOP) for 1.2 s, more than the 0.3 s socket timeout, while
    the run commits: the timed-out commands are retried (applied once), and the run
    completes with the right state."""

    def pause_for_a_while() -> None:
        own_redis.pause()
        time.sleep(1.2)
        own_redis.resume()

    threads: list[threading.Thread] = []

    async def during(i: int) -> None:
        if i == 3:
            threads.append(threading.Thread(target=pause_for_a_while))
            threads[0].start()

    async with redis_store(own_redis, max_attempts=10, socket_timeout=0.3,
                           lease_ms=10_000) as store:
        result = await interpret(pipeline(8, during=during), Acc(value=0), store=store,
                                 config=RunConfig(run_id="paused"))
        threads[0].join()
        assert str(result.status) == "COMPLETED" and result.final_state == Acc(value=8)
        log = await store.read_log("paused")
        assert log is not None and len(log.completed_nodes()) == 8


@pytest.mark.redis
async def test_a_redis_server_gone_for_good_is_one_store_error_then_the_run_resumes(
    own_redis: OwnRedis,
) -> None:
    """The server stops inside node 3 and stays down: the run ends with one StoreError
    naming the operation, the run and the server; once the server is back, the run resumes
    (RESUMED, the right state) without running the finished nodes again."""
    calls: list[str] = []

    async def during(i: int) -> None:
        if i == 3 and len(calls) == 4:  # only in the first session
            await anyio.to_thread.run_sync(own_redis.stop)

    store = redis_store(own_redis, max_attempts=3, lease_ms=5000)
    with pytest.raises(StoreError) as info:
        await interpret(pipeline(6, calls, during), Acc(value=0), store=store,
                        config=RunConfig(run_id="gone"))
    assert type(info.value) is StoreError
    message = str(info.value)
    assert "RedisStore." in message and "'gone'" in message and own_redis.url in message
    own_redis.start()
    calls.clear()
    result = await interpret(pipeline(6, calls, during), Acc(value=0), store=store,
                             config=RunConfig(run_id="gone"))
    assert str(result.status) == "RESUMED" and result.final_state == Acc(value=6)
    assert calls == ["n03", "n04", "n05"]
    await store.close()


@pytest.mark.redis
async def test_a_run_cancelled_while_the_redis_server_stalls_returns_promptly(
    own_redis: OwnRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is paused (SIGSTOP) inside a node and the caller cancels the run: the
    caller gets control back once the release's short bound is over (0.1 s here, a second
    by default), not after the 30 s lease time of the default settings; the lease is left
    to expire."""
    from interpreters.stores import _lease

    monkeypatch.setattr(_lease, "RELEASE_WHEN_STOPPED_S", 0.1)

    async def during(i: int) -> None:
        if i == 1:
            own_redis.pause()

    store = redis_store(own_redis)  # default settings: 30 s leases, 10 s socket timeout
    try:
        began = time.perf_counter()
        with anyio.move_on_after(0.2) as scope:
            await interpret(pipeline(3, during=during), Acc(value=0), store=store,
                            config=RunConfig(run_id="stalled"))
        took = time.perf_counter() - began
    finally:
        own_redis.resume()
    assert scope.cancelled_caught
    assert took < 2.0, f"the cancelled run took {took:.1f} s to return"
    await store.close()


@pytest.mark.postgres
async def test_a_run_cancelled_while_its_postgres_tables_are_locked_returns_promptly(
    postgres_dsn: str, postgres_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection locks the store's tables inside a node (the server does not
    answer the run's commit nor its release) and the caller cancels the run: it gets control
    back once the release's short bound is over (0.1 s here), not after the 30 s lease."""
    import asyncpg

    from interpreters.stores import _lease
    from interpreters.stores.postgres import PostgresStore

    monkeypatch.setattr(_lease, "RELEASE_WHEN_STOPPED_S", 0.1)
    locker = await asyncpg.connect(postgres_dsn)
    locked = locker.transaction()

    async def during(i: int) -> None:
        if i == 1:
            await locked.start()
            for table in store.tables:
                await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    store = PostgresStore(postgres_dsn, table_prefix=postgres_prefix)  # 30 s leases
    try:
        began = time.perf_counter()
        with anyio.move_on_after(0.3) as scope:
            await interpret(pipeline(3, during=during), Acc(value=0), store=store,
                            config=RunConfig(run_id="locked"))
        took = time.perf_counter() - began
    finally:
        await locked.rollback()
        await locker.close()
        await store.close()
    assert scope.cancelled_caught
    assert took < 2.0, f"the cancelled run took {took:.1f} s to return"
