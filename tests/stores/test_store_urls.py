"""A store URL that cannot name a server the store's client would reach is refused when the
store is built, naming the URL and the form it takes: not retried as if the server were
down, and not read as another database (redis-py reads ``redis://host:6379/abc`` as db 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from interpreters.stores.postgres import PostgresStore
from interpreters.stores.redis import RedisStore, SyncRedisStore
from stroma.errors import StromaValueError


class Blob(BaseModel):
    name: str

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cls", [RedisStore, SyncRedisStore])
@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/abc",      # a database that is no number
    "redis://127.0.0.1:6379/0/1",
    "redis://127.0.0.1:6379/-1",
    "redis://127.0.0.1:6379/0?db=x",  # redis-py refuses it only on first connect
    "http://127.0.0.1:6379/0",
    "127.0.0.1:6379",
    "postgresql://postgres@127.0.0.1:5432/test",
    "redis:/127.0.0.1:6379",
])
def test_a_redis_url_that_names_no_redis_database_is_refused_when_built(
    cls: type, url: str
) -> None:
    with pytest.raises(StromaValueError) as info:
        cls(url)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}: ")
    assert repr(url) in message and "redis://localhost:6379/0" in message


@pytest.mark.parametrize("url", [
    "redis://localhost", "redis://localhost:6379", "redis://localhost:6379/",
    "redis://localhost:6379/15", "REDIS://localhost/2", "rediss://u:p@host:6380/1",
    "redis://localhost:6379/0?socket_keepalive=true", "unix:///tmp/redis.sock?db=3",
])
def test_a_redis_url_redis_py_reads_is_taken(url: str) -> None:
    assert RedisStore(url).redis_url == url


@pytest.mark.parametrize("dsn", [
    "redis://127.0.0.1:6379/0", "host=127.0.0.1 user=postgres dbname=test", "not a dsn",
    "postgresql:/127.0.0.1/test",  # asyncpg: database '127.0.0.1/test' on the default host
])
def test_a_postgres_dsn_asyncpg_cannot_read_is_refused_when_built(dsn: str) -> None:
    with pytest.raises(StromaValueError) as info:
        PostgresStore(dsn)
    message = str(info.value)
    assert message.startswith("PostgresStore: ") and repr(dsn) in message
    assert "postgresql://user@localhost:5432/db" in message


@pytest.mark.parametrize("dsn", [
    "postgresql://postgres@127.0.0.1:5432/test", "postgres://u:p@h/db", "postgresql:///test",
    "POSTGRESQL://h/db",
])
def test_a_postgres_dsn_asyncpg_reads_is_taken(dsn: str) -> None:
    assert PostgresStore(dsn).dsn == dsn


def test_the_cli_refuses_a_redis_url_whose_database_is_no_number() -> None:
    """`runs redis://host:6379/abc` listed the runs of database 0 as if they were there."""
    done = subprocess.run(
        [sys.executable, "-m", "stroma", "runs", "redis://127.0.0.1:1/abc"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.startswith("stroma: error: cannot open redis://127.0.0.1:1/abc: ")
    assert "'abc' is not a database number" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_dsn_parameter_asyncpg_refuses_is_a_permanent_error_not_a_server_down() -> None:
    """asyncpg's ClientConfigurationError (an InterfaceError) was retried max_attempts
    times and then said "Is the PostgreSQL server running and reachable?"."""
    import anyio

    from stroma import RunConfig, interpret, seq, stroma_node
    from stroma.contracts import NodeContract
    from stroma.errors import StoreError

    @stroma_node("n", NodeContract(node_id="n", input_schema=Blob, output_schema=Blob))
    async def n(b: Blob) -> Blob:
        return b

    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test?sslmode=bogus",
                          max_attempts=3)
    with pytest.raises(StoreError) as info:
        anyio.run(lambda: interpret(seq(n), Blob(name="x"), store=store,
                                    config=RunConfig(run_id="dsn-1")))
    message = str(info.value)
    assert "`sslmode` parameter must be one of" in message
    assert "a permanent error, not retried" in message and "after 3 attempts" not in message
    assert "Is the PostgreSQL server running" not in message


def test_the_cli_names_a_dsn_parameter_asyncpg_refuses_without_blaming_the_server() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stroma", "runs", "postgresql://u@127.0.0.1:1/db?sslmode=no"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("stroma: error: cannot read postgresql://u@127.0.0.1:1/db?"
                                  "sslmode=no: `sslmode` parameter must be one of: disable")
    assert "fix the URL" in done.stderr and "server running" not in done.stderr
