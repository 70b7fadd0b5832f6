"""The durable stores look alike: one RunInfo shape from every list_runs, ``async with``,
closing, no ResourceWarning for a store nobody closed, a run through a flaky network."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import interpreters.stores.file as file_module
import interpreters.stores.redis as redis_module
from interpreters.stores._common import RunInfo
from stroma import NodeContract, stroma_node
from stroma.failures import FailureClass, FailurePolicy
from stroma.runner import RunConfig, interpret
from tests.services import drop_postgres_tables, drop_redis_prefix, unique

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


async def call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def plan(fail_at: int | None = None) -> list[Any]:
    """Three nodes using 10 tokens of gpt-4o each; node ``fail_at`` raises ValueError."""
    from pydantic import BaseModel

    class S(BaseModel):
        v: int

    def make(i: int) -> Any:
        async def step(s: S) -> tuple[dict[str, int], int, str]:
            if i == fail_at:
                raise ValueError("no")
            return {"v": s.v + 1}, 10, "gpt-4o"

        contract = NodeContract(node_id=f"s{i}", input_schema=S, output_schema=S)
        return stroma_node(f"s{i}", contract)(step)

    return [make(i) for i in range(3)], S  # type: ignore[return-value]


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("sync-redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Each durable store, fresh."""
    kind = request.param
    if kind == "file":
        yield file_module.FileStore(tmp_path / "store")
        return
    if kind in ("redis", "sync-redis"):
        url = request.getfixturevalue("redis_url")
        prefix = unique("stroma-alike")
        cls = redis_module.RedisStore if kind == "redis" else redis_module.SyncRedisStore
        store = cls(url, key_prefix=prefix)
        try:
            yield store
        finally:
            await call(store.close())
            await drop_redis_prefix(url, prefix)
        return
    from interpreters.stores.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres_dsn")
    pg = PostgresStore(dsn, table_prefix=unique("alike"))
    try:
        yield pg
    finally:
        await pg.close()
        await drop_postgres_tables(dsn, pg.tables)


async def test_every_store_sums_up_its_runs_in_the_same_run_info(any_store: Any) -> None:
    """A finished run, a failed one, a crashed one, one with checkpoints only and a damaged
    one come back from list_runs as the same RunInfo values whatever the store."""
    nodes, S = plan()  # type: ignore[misc]
    done = await interpret(nodes, S(v=0), store=any_store, config=RunConfig(run_id="done"))
    failing, _ = plan(fail_at=1)  # type: ignore[misc]
    no_retry = {FailureClass.AMBIGUOUS: FailurePolicy(max_retries=0, backoff_seconds=0)}
    await interpret(failing, S(v=0), store=any_store,
                    config=RunConfig(run_id="failed", policy_map=no_retry))
    lines = done.log.lines()
    await call(any_store.append_log("crashed", [lines[0].replace('"done"', '"crashed"'),
                                                *lines[1:4]]))
    await call(any_store.save("ckpt-only", "a", S(v=1)))
    await call(any_store.append_log("damaged", [lines[0].replace('"done"', '"damaged"'),
                                                lines[2]]))
    infos = await call(any_store.list_runs())
    assert all(type(i) is RunInfo for i in infos)
    by_id = {i.run_id: i for i in infos}
    assert sorted(by_id) == await call(any_store.run_ids())
    started = done.log.header.started_at
    finished = by_id["done"]
    assert finished == RunInfo("done", "COMPLETED", 3, started, finished.duration_ms)
    assert finished.total_tokens == 30 and finished.total_cost_usd == done.total_cost_usd > 0
    assert by_id["failed"].status == "PARTIAL" and by_id["failed"].nodes_done == 1
    assert by_id["crashed"].status == "running/crashed" and by_id["crashed"].nodes_done == 1
    assert by_id["crashed"].total_tokens is None
    assert by_id["ckpt-only"] == RunInfo("ckpt-only", "no log", 1, None, None)
    damaged = by_id["damaged"]
    assert damaged.status == "damaged" and "out of sequence" in (damaged.problem or "")


def test_run_info_is_one_class_wherever_it_is_imported() -> None:
    """FileStore's RunInfo and the Redis stores' are the one RunInfo of the stores."""
    assert file_module.RunInfo is RunInfo is redis_module.RunInfo


@pytest.mark.redis
@pytest.mark.postgres
async def test_server_stores_close_themselves_as_async_context_managers(
    redis_url: str, postgres_dsn: str
) -> None:
    """``async with`` gives the store and closes its pool on the way out; a later call opens
    a new one."""
    from interpreters.stores.postgres import PostgresStore

    stores = [redis_module.RedisStore(redis_url, key_prefix=unique("stroma-cm")),
              PostgresStore(postgres_dsn, table_prefix=unique("cm"))]
    try:
        for made in stores:
            async with made as store:
                assert store is made
                assert await store.read_log("nothing") is None
                assert (store._client if hasattr(store, "_client") else store._pool) is not None
            assert (made._client if hasattr(made, "_client") else made._pool) is None
            assert await made.read_log("nothing") is None  # reopens
            assert "close()" in (type(made).close.__doc__ or "") or type(made).close.__doc__
    finally:
        for made in stores:
            await made.close()
        await drop_postgres_tables(postgres_dsn, stores[1].tables)


@pytest.mark.redis
def test_the_sync_store_is_a_context_manager(redis_url: str) -> None:
    """``with SyncRedisStore(...)`` closes its pool on the way out."""
    with redis_module.SyncRedisStore(redis_url, key_prefix=unique("stroma-cm")) as store:
        assert store.read_log("nothing") is None
        assert store._client is not None
    assert store._client is None


FORGOTTEN = """
import asyncio, gc, sys, warnings
warnings.simplefilter("error")
from pydantic import BaseModel
from interpreters.stores.redis import RedisStore, SyncRedisStore
from interpreters.stores.postgres import PostgresStore

class S(BaseModel):
    v: int

async def main():
    keep = [RedisStore(sys.argv[1], key_prefix=sys.argv[3]),
            PostgresStore(sys.argv[2], table_prefix=sys.argv[4])]
    for store in keep:
        await store.save("r", "n", S(v=1))
        assert await store.load("r", "n") == S(v=1)
        await store.delete("r")
    dropped = RedisStore(sys.argv[1], key_prefix=sys.argv[3])  # dropped while the loop runs
    await dropped.save("r", "n", S(v=1))
    await dropped.delete("r")
    del dropped
    gc.collect()
    await asyncio.sleep(0.2)
    return keep

stores = asyncio.run(main())   # never closed
sync = SyncRedisStore(sys.argv[1], key_prefix=sys.argv[3])
sync.save("r", "n", S(v=1))
sync.delete("r")
del sync, stores
gc.collect()
print("OK")
"""


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_store_nobody_closed_leaves_no_resource_warning(
    redis_url: str, postgres_dsn: str
) -> None:
    """Stores used and never closed (kept past the loop, or dropped while it runs) close
    their connections themselves: the process prints no ResourceWarning or 'Unclosed'."""
    prefix, tables = unique("stroma-forgot"), unique("forgot")
    try:
        out = subprocess.run(
            [sys.executable, "-X", "dev", "-W", "error", "-c", textwrap.dedent(FORGOTTEN),
             redis_url, postgres_dsn, prefix, tables],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
    finally:
        from interpreters.stores.postgres import PostgresStore

        await drop_postgres_tables(postgres_dsn, PostgresStore(postgres_dsn,
                                                               table_prefix=tables).tables)
        await drop_redis_prefix(redis_url, prefix)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr
    assert "ResourceWarning" not in out.stderr and "nclosed" not in out.stderr, out.stderr


async def test_a_run_goes_through_a_network_that_drops_connections(
    server_target: tuple[str, str], proxy_factory: Callable[..., Any]
) -> None:
    """Through a proxy that drops the first two connections, a whole run (lease, commits,
    release) completes on Redis and PostgreSQL."""
    kind, target = server_target
    async with proxy_factory(target, 6379 if kind == "redis" else 5432, drop=2) as proxy:
        nodes, S = plan()  # type: ignore[misc]
        if kind == "redis":
            store: Any = redis_module.RedisStore(proxy.url(target), key_prefix=unique("px"))
        else:
            from interpreters.stores.postgres import PostgresStore

            store = PostgresStore(proxy.url(target), table_prefix=unique("px"))
        try:
            result = await interpret(nodes, S(v=0), store=store, config=RunConfig(run_id="px"))
            assert str(result.status) == "COMPLETED" and result.final_state == S(v=3)
            assert proxy.connections >= 3
        finally:
            if kind == "postgres":
                await drop_postgres_tables(target, store.tables)
            else:
                await drop_redis_prefix(target, store.key_prefix)
            await store.close()


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
def server_target(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(kind, url)`` of each shared server."""
    kind = str(request.param)
    return kind, request.getfixturevalue("redis_url" if kind == "redis" else "postgres_dsn")
