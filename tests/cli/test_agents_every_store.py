"""`runs`, `show` and `send-input` on Redis and PostgreSQL: a WAITING agent run is listed
with what it waits for, and answered through the server store as through a folder."""

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


def redis_store(spec: str) -> Any:
    from interpreters.stores.redis import RedisStore

    url, prefix = spec.split("?key_prefix=")
    return RedisStore(url, key_prefix=prefix)


def postgres_store(spec: str) -> Any:
    from interpreters.stores.postgres import PostgresStore

    dsn, prefix = spec.split("?table_prefix=")
    return PostgresStore(dsn, table_prefix=prefix)


OPEN = {"redis": redis_store, "postgres": postgres_store}


async def _with(make: Any, spec: str, fn: Any, *args: Any) -> Any:
    store = make(spec)
    try:
        return await fn(store, *args)
    finally:
        await store.close()


def on(kind: str, spec: str, fn: Any, *args: Any) -> Any:
    return anyio.run(_with, OPEN[kind], spec, fn, *args, backend="asyncio")


async def _get_input(store: Any) -> str | None:
    result: str | None = await store.get_input("agent", P.AGENT_KEY)
    return result


@pytest.fixture
def redis_spec() -> Iterator[str]:
    """A Redis key prefix of its own holding a WAITING agent run."""
    url = require("Redis", REDIS_URL, 6379, START_REDIS)
    prefix = unique("stroma-agents")
    spec = f"{url}?key_prefix={prefix}"
    on("redis", spec, P.agent_run)
    try:
        yield spec
    finally:
        anyio.run(drop_redis_prefix, url, prefix, backend="asyncio")


@pytest.fixture
def postgres_spec() -> Iterator[str]:
    """A PostgreSQL table prefix of its own holding a WAITING agent run."""
    from interpreters.stores.postgres import PostgresStore

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    prefix = unique("agents")
    spec = f"{dsn}?table_prefix={prefix}"
    tables = PostgresStore(dsn, table_prefix=prefix).tables
    on("postgres", spec, P.agent_run)
    try:
        yield spec
    finally:
        anyio.run(drop_postgres_tables, dsn, tables, backend="asyncio")


@pytest.fixture(params=["redis", "postgres"])
def server(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(kind, spec) of each server store in turn."""
    return request.param, str(request.getfixturevalue(f"{request.param}_spec"))


@pytest.mark.redis
@pytest.mark.postgres
def test_a_waiting_run_on_a_server_store_is_listed_shown_and_answered(
    server: tuple[str, str],
) -> None:
    """`runs` lists the WAITING run with its wait, `show` its rows per iteration; a bad
    payload is refused with nothing written; a good one is kept, and the run, run again
    on the server, goes on from the wait."""
    kind, spec = server
    runs = json.loads(cli("runs", spec, "--json").stdout)
    assert [(r["run_id"], r["status"]) for r in runs] == [("agent", "WAITING")]
    (wait,) = runs[0]["waiting_for"]
    assert wait["key"] == P.AGENT_KEY
    text = cli("runs", spec).stdout
    assert f"{P.AGENT_KEY} (digest {wait['digest'][:8]})" in text
    show = cli("show", spec, "agent")
    assert show.returncode == 0, show.stderr
    assert "think @agent#3" in show.stdout and "route:  pick @agent#2: search" in show.stdout
    bad = cli("send-input", spec, "agent", "approval", '{"ok": 3}')
    assert bad.returncode == 2 and "ok: expected boolean" in bad.stderr
    assert on(kind, spec, _get_input) is None
    good = cli("send-input", spec, "agent", "approval", '{"ok": true}', "--digest",
               wait["digest"])
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"sent {P.AGENT_KEY} (Approval) to run 'agent'")
    assert ("RedisStore(" if kind == "redis" else "PostgresStore(") in good.stdout
    assert json.loads(on(kind, spec, _get_input)) == {"ok": True}
    result = on(kind, spec, P.agent_resumed)
    assert result.status.value == "RESUMED" and result.final_state.done == ["a", "shipped"]
    after = json.loads(cli("runs", spec, "--json").stdout)
    assert [(r["status"], r["waiting_for"]) for r in after] == [("RESUMED", [])]
