"""Every built-in store answers the same misuse with the same StromaError, before it writes
anything: a state whose JSON cannot be made (StateNotSerializable naming the field), a
schema that is not a model class (StromaTypeError), whether or not the checkpoint exists."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import interpreters.stores.file as file_module
import interpreters.stores.redis as redis_module
from interpreters.stores.memory import AsyncInMemoryStore, InMemoryStore
from stroma.errors import StateNotSerializable, StromaTypeError
from tests.services import drop_postgres_tables, drop_redis_prefix, unique

pytestmark = pytest.mark.anyio


class Blob(BaseModel):
    name: str
    b: bytes


async def call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


@pytest.fixture(params=["memory", "async-memory", "file",
                        pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("sync-redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def every_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Each built-in store, fresh."""
    kind = request.param
    if kind == "memory":
        yield InMemoryStore()
    elif kind == "async-memory":
        yield AsyncInMemoryStore()
    elif kind == "file":
        yield file_module.FileStore(tmp_path / "store")
    elif kind in ("redis", "sync-redis"):
        url = request.getfixturevalue("redis_url")
        prefix = unique("stroma-misuse")
        cls = redis_module.RedisStore if kind == "redis" else redis_module.SyncRedisStore
        store = cls(url, key_prefix=prefix)
        try:
            yield store
        finally:
            await call(store.close())
            await drop_redis_prefix(url, prefix)
    else:
        from interpreters.stores.postgres import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        pg = PostgresStore(dsn, table_prefix=unique("misuse"))
        try:
            yield pg
        finally:
            await pg.close()
            await drop_postgres_tables(dsn, pg.tables)


async def test_a_state_json_cannot_hold_is_refused_naming_the_field(every_store: Any) -> None:
    """save() of raw bytes that are not UTF-8 raises StateNotSerializable naming the field
    and the fix, and the checkpoint saved before stays as it was."""
    await call(every_store.save("r", "n", Blob(name="ok", b=b"fine")))
    with pytest.raises(StateNotSerializable) as info:
        await call(every_store.save("r", "n", Blob(name="bad", b=b"\xff")))
    message = str(info.value)
    assert type(every_store).__name__ + ".save" in message
    assert "node 'n'" in message and "field 'b' of Blob" in message
    assert "base64-encode binary data" in message
    assert await call(every_store.load_typed("r", "n", Blob)) == Blob(name="ok", b=b"fine")
    with pytest.raises(StateNotSerializable):
        await call(every_store.save_typed("r", "other", Blob(name="bad", b=b"\xff"), Blob))
    assert await call(every_store.load_typed("r", "other", Blob)) is None


async def test_a_log_append_with_an_unwritable_checkpoint_writes_nothing(
    every_store: Any,
) -> None:
    """append_log with a checkpoint JSON cannot hold writes neither the lines nor it."""
    if not hasattr(every_store, "append_log"):
        pytest.skip(f"{type(every_store).__name__} keeps no durable log")
    with pytest.raises(StateNotSerializable, match="field 'b' of Blob"):
        await call(every_store.append_log("r", ['{"x": 1}'], ("n", Blob(name="x", b=b"\xff"))))
    assert await call(every_store.read_log("r")) is None
    assert await call(every_store.load_typed("r", "n", Blob)) is None


@pytest.mark.parametrize("schema", [int, None, "Blob", Blob(name="x", b=b"")])
async def test_typed_methods_refuse_a_schema_that_is_not_a_model(
    every_store: Any, schema: Any
) -> None:
    """load_typed (checkpoint there or not) and save_typed with a schema that is not a
    BaseModel class raise the same StromaTypeError from every store; nothing is saved."""
    name = type(every_store).__name__
    with pytest.raises(StromaTypeError, match=rf"^{name}\.load_typed\(run_id, node_id, schema\): "
                                              "schema must be a BaseModel type"):
        await call(every_store.load_typed("r", "missing", schema))
    await call(every_store.save("r", "there", Blob(name="x", b=b"")))
    with pytest.raises(StromaTypeError, match="schema must be a BaseModel type"):
        await call(every_store.load_typed("r", "there", schema))
    with pytest.raises(StromaTypeError, match=rf"^{name}\.save_typed\(run_id, node_id, state, "
                                              r"schema\): schema must be a BaseModel type"):
        await call(every_store.save_typed("r", "typed", Blob(name="y", b=b""), schema))
    assert await call(every_store.load_typed("r", "typed", Blob)) is None
