"""The command line on Redis and PostgreSQL: `runs`, `show` and `replay` take a URL or a
DSN (with the store's key or table prefix) as they take a FileStore folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from tests.cli.test_cli import cli
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
from tests.timeline import pipelines as P


async def _record(store: Any) -> None:
    try:
        await P.map_run(store)
        await P.retries_run(store)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def redis_spec() -> Iterator[str]:
    """A Redis URL naming a key prefix that holds a map_each run and a retries run."""
    from interpreters.stores.redis import RedisStore

    url = require("Redis", REDIS_URL, 6379, START_REDIS)
    prefix = unique("stroma-cli")
    anyio.run(_record, RedisStore(url, key_prefix=prefix), backend="asyncio")
    try:
        yield f"{url}?key_prefix={prefix}"
    finally:
        anyio.run(drop_redis_prefix, url, prefix, backend="asyncio")


@pytest.fixture(scope="module")
def postgres_spec() -> Iterator[str]:
    """A PostgreSQL DSN naming a table prefix that holds a map_each run and a retries run."""
    from interpreters.stores.postgres import PostgresStore

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    prefix = unique("cli")
    store = PostgresStore(dsn, table_prefix=prefix)
    tables = store.tables
    anyio.run(_record, store, backend="asyncio")
    try:
        yield f"{dsn}?table_prefix={prefix}"
    finally:
        anyio.run(drop_postgres_tables, dsn, tables, backend="asyncio")


@pytest.fixture(params=["redis", "postgres"])
def spec(request: pytest.FixtureRequest) -> str:
    """The store spec of each server store in turn."""
    return str(request.getfixturevalue(f"{request.param}_spec"))


@pytest.mark.redis
@pytest.mark.postgres
def test_runs_on_a_server_store(spec: str) -> None:
    """`runs` lists the server store's runs with status and totals."""
    out = cli("runs", spec, "--json")
    assert out.returncode == 0, out.stderr
    runs = {r["run_id"]: r for r in json.loads(out.stdout)}
    assert set(runs) == {"map", "retries"}
    assert runs["map"]["status"] == "COMPLETED" and runs["map"]["tokens"] == 360
    assert runs["retries"]["failures"] == 2


@pytest.mark.redis
@pytest.mark.postgres
def test_show_on_a_server_store_lists_the_childrens_attempts(spec: str) -> None:
    """`show` reads the run from the server and lists each map item's attempts."""
    out = cli("show", spec, "map")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "run map: COMPLETED"
    assert sum(1 for line in lines if line.startswith("  fetch [item 1]")) == 3
    data = json.loads(cli("show", spec, "map", "--json").stdout)
    assert [len(r["bars"]) for r in data["rows"]] == [1, 1, 3, 1]


@pytest.mark.redis
@pytest.mark.postgres
def test_replay_on_a_server_store(spec: str) -> None:
    """`replay` replays a run read from the server: OK with its plan, DIVERGED (exit 1)
    with another."""
    ok = cli("replay", spec, "retries", "--plan", "tests.timeline.pipelines:RETRIES_PLAN")
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
    bad = cli("replay", spec, "retries", "--plan", "tests.timeline.pipelines:MAP_PLAN")
    assert bad.returncode == 1 and bad.stdout.startswith("DIVERGED"), bad.stderr


@pytest.mark.redis
@pytest.mark.postgres
def test_an_unknown_run_on_a_server_store_names_the_runs_there(spec: str) -> None:
    """An unknown run id on a server store is one line naming the runs it has."""
    out = cli("show", spec, "nope")
    assert out.returncode == 2
    assert out.stderr.startswith("stroma: error: no run 'nope'")
    assert "runs there: map, retries" in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.postgres
def test_a_dsn_without_stroma_tables_is_an_error_and_creates_none() -> None:
    """A DSN whose table prefix has no tables is one line naming the tables looked for,
    and reading it creates no table (the store would make them on first use)."""
    import asyncpg

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    prefix = unique("absent")
    out = cli("runs", f"{dsn}?table_prefix={prefix}")
    assert out.returncode == 2 and out.stderr.startswith("stroma: error: no stroma tables")
    assert f"{prefix}_checkpoints" in out.stderr and "?table_prefix=NAME" in out.stderr
    assert len(out.stderr.splitlines()) == 1

    async def tables() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE $1",
                                    f"{prefix}%")
            return [r["tablename"] for r in rows]
        finally:
            await conn.close()

    assert anyio.run(tables, backend="asyncio") == []
