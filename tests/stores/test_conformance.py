"""One conformance suite for every checkpoint store.

Parametrized over the in-memory store, FileStore, RedisStore, PostgresStore and a user-style
custom store written the way the "Custom checkpoint backends" page shows (plain asyncpg, its
own table, ``_schema_ref`` / ``_resolve_schema``). Stores that hold effect logs (``LogStore``)
also run the log properties.
"""

from __future__ import annotations

import enum
import inspect
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from stroma import effects as fx
from stroma.checkpoint import AsyncInMemoryStore, LogStore, _resolve_schema, _schema_ref
from stroma.log import EffectLog, LogHeader, ResumeMarker

pytestmark = pytest.mark.anyio

T = TypeVar("T")


# ------------------------------------------------------------------------------ models


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    city: str
    tags: list[str] = Field(default_factory=list)


class Person(BaseModel):
    name: str
    born: datetime
    color: Color
    priority: Priority
    home: Address
    past: list[Address]
    scores: dict[str, float]
    nickname: str | None = None


class Item(BaseModel):
    sku: str
    price: Decimal
    seen_at: datetime


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    cursor: str | None = None


# Parametrized at module level, so the parametrized class is reachable by its ref, as
# pydantic registers it in this module's globals (that is what makes pickling work too).
PageOfItem = Page[Item]
PageOfInt = Page[int]

IST = timezone(timedelta(hours=5, minutes=30))

SAMPLES: dict[str, BaseModel] = {
    "nested": Person(
        name='Ada \u00e9\u4e2d\U0001f600 "quoted" \\ back\nline\x00nul',
        born=datetime(1815, 12, 10, 8, 30, 15, 123456, tzinfo=IST),
        color=Color.GREEN,
        priority=Priority.HIGH,
        home=Address(street="1 Main St", city="London", tags=["a", "b"]),
        past=[Address(street="2 Side St", city="Paris"), Address(street="x", city="y")],
        scores={"math": 0.1 + 0.2, "big": 1e300, "neg": -0.0},
        nickname=None,
    ),
    "generic": PageOfItem(
        items=[
            Item(sku="A-1", price=Decimal("19.990"), seen_at=datetime(2024, 2, 29, tzinfo=UTC)),
            Item(
                sku="B-2",
                price=Decimal("0.0000001"),
                seen_at=datetime(2024, 1, 1, 23, 59, 59, tzinfo=timezone(timedelta(hours=-8))),
            ),
        ],
        total=2,
        cursor="next",
    ),
    "generic-builtin": PageOfInt(items=[1, 2, 2**62], total=3),
    "enum-datetime": Item(
        sku="\u2603", price=Decimal("-1E+3"), seen_at=datetime(2000, 1, 1, tzinfo=IST)
    ),
}


def assert_same(loaded: BaseModel | None, saved: BaseModel) -> None:
    """``loaded`` is a new object of the saved type, equal to it, with the same UTC offsets."""
    assert loaded is not None
    assert type(loaded) is type(saved), f"got {type(loaded)!r}, expected {type(saved)!r}"
    assert loaded is not saved
    assert loaded == saved
    assert loaded.model_dump_json() == saved.model_dump_json()  # offsets, decimals, enums


# ------------------------------------------------------------------- a user-style store


class UserPostgresStore:
    """A custom backend as users write it (the docs' example, plain asyncpg, its own table).

    The docs' ``async with await asyncpg.connect(...)`` does not work (an asyncpg connection
    is no context manager), so this closes the connection in ``finally`` instead.
    """

    def __init__(self, dsn: str, table: str) -> None:
        self._dsn = dsn
        self._table = table

    async def _connect(self) -> Any:
        import asyncpg

        return await asyncpg.connect(self._dsn)

    async def create_table(self) -> None:
        conn = await self._connect()
        try:
            await conn.execute(
                f"CREATE TABLE {self._table} (run_id text, node_id text, state text, "
                "schema_ref text, PRIMARY KEY (run_id, node_id))"
            )
        finally:
            await conn.close()

    async def drop_table(self) -> None:
        conn = await self._connect()
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {self._table}")
        finally:
            await conn.close()

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        conn = await self._connect()
        try:
            await conn.execute(
                f"""
                INSERT INTO {self._table} (run_id, node_id, state, schema_ref)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (run_id, node_id) DO UPDATE
                SET state = EXCLUDED.state, schema_ref = EXCLUDED.schema_ref
                """,
                run_id,
                node_id,
                state.model_dump_json(),
                _schema_ref(type(state)),
            )
        finally:
            await conn.close()

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        conn = await self._connect()
        try:
            row = await conn.fetchrow(
                f"SELECT state, schema_ref FROM {self._table} WHERE run_id=$1 AND node_id=$2",
                run_id,
                node_id,
            )
        finally:
            await conn.close()
        if row is None:
            return None
        return _resolve_schema(row["schema_ref"]).model_validate_json(row["state"])

    async def delete(self, run_id: str) -> None:
        conn = await self._connect()
        try:
            await conn.execute(f"DELETE FROM {self._table} WHERE run_id=$1", run_id)
        finally:
            await conn.close()


# --------------------------------------------------------------------------- the stores

STORES = (
    "memory",
    "file",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("custom", marks=pytest.mark.postgres),
)


@pytest.fixture
async def custom_store(
    postgres_dsn: str, unique_name: Callable[[str], str]
) -> AsyncIterator[UserPostgresStore]:
    """The user-style store, on a table of its own that is dropped afterwards."""
    custom = UserPostgresStore(postgres_dsn, unique_name("user_checkpoints"))
    await custom.create_table()
    try:
        yield custom
    finally:
        await custom.drop_table()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each kind of store, fresh and isolated for one test."""
    kind = request.param
    if kind == "memory":
        return AsyncInMemoryStore()
    if kind == "file":
        file_module = pytest.importorskip(
            "interpreters.stores.file", reason="FileStore (interpreters/stores/file.py) missing"
        )
        return file_module.FileStore(tmp_path / "store")
    return request.getfixturevalue(
        {"redis": "redis_store", "postgres": "postgres_store", "custom": "custom_store"}[kind]
    )


@pytest.fixture
def log_store(store: Any) -> Any:
    """The stores that hold effect logs durably (LogStore); the others skip."""
    if not isinstance(store, LogStore):
        pytest.skip(f"{type(store).__name__} does not implement LogStore (append_log/read_log)")
    return store


# ------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("sample", sorted(SAMPLES))
async def test_round_trip_is_exact(store: Any, run_prefix: str, sample: str) -> None:
    """A saved model loads back as a new object of the same type (never a dict), equal to it."""
    state = SAMPLES[sample]
    await store.save(run_prefix, "node", state)
    assert_same(await store.load(run_prefix, "node"), state)


async def test_round_trip_of_every_sample_in_one_run(store: Any, run_prefix: str) -> None:
    """Nodes of one run keep their own types side by side."""
    for name, state in SAMPLES.items():
        await store.save(run_prefix, name, state)
    for name, state in SAMPLES.items():
        assert_same(await store.load(run_prefix, name), state)


class Scores(BaseModel):
    best: float
    low: float
    values: dict[str, float]
    missing: float | None = None


async def test_floats_that_are_not_finite_round_trip(store: Any, run_prefix: str) -> None:
    """JSON has no infinity, and pydantic's JSON writes one as null, which would not read
    back: stroma's stores keep NaN and the infinities (a custom store is the user's own)."""
    if isinstance(store, UserPostgresStore):
        pytest.skip("a custom store serializes as its author chose")
    state = Scores(best=float("inf"), low=float("-inf"), values={"a": float("nan"), "b": 1.5})
    await store.save(run_prefix, "node", state)
    loaded = await store.load(run_prefix, "node")
    assert isinstance(loaded, Scores) and loaded is not state
    assert (loaded.best, loaded.low, loaded.values["b"], loaded.missing) == (
        float("inf"), float("-inf"), 1.5, None)
    assert math.isnan(loaded.values["a"])


async def test_missing_checkpoint_is_none(store: Any, run_prefix: str) -> None:
    """Loading a node never saved, or from a run never written, gives None."""
    assert await store.load(run_prefix, "never") is None
    await store.save(run_prefix, "a", SAMPLES["enum-datetime"])
    assert await store.load(run_prefix, "b") is None
    assert await store.load(run_prefix + "-other", "a") is None


async def test_save_overwrites(store: Any, run_prefix: str) -> None:
    """Saving a node again replaces its checkpoint (last write wins, type included)."""
    await store.save(run_prefix, "n", SAMPLES["nested"])
    await store.save(run_prefix, "n", SAMPLES["generic"])
    assert_same(await store.load(run_prefix, "n"), SAMPLES["generic"])


async def test_delete_isolates_runs(store: Any, run_prefix: str) -> None:
    """Deleting a run removes its checkpoints and nothing of runs whose ids extend it."""
    base = run_prefix
    others = [base + ":b", base + "b", base + "}:ckpt", base + "*", base + "/x", base + ":"]
    state = SAMPLES["enum-datetime"]
    for run in [base, *others]:
        await store.save(run, "n1", state)
        await store.save(run, "n2", state)
    await store.delete(base)
    assert await store.load(base, "n1") is None
    assert await store.load(base, "n2") is None
    for run in others:
        assert_same(await store.load(run, "n1"), state)
        assert_same(await store.load(run, "n2"), state)
    for run in others:
        await store.delete(run)


async def test_delete_of_unknown_run_is_a_no_op(store: Any, run_prefix: str) -> None:
    """Deleting a run that has nothing stored succeeds and leaves other runs alone."""
    await store.save(run_prefix, "n", SAMPLES["nested"])
    await store.delete(run_prefix + "-unknown")
    assert_same(await store.load(run_prefix, "n"), SAMPLES["nested"])


async def test_run_can_be_written_again_after_delete(store: Any, run_prefix: str) -> None:
    """A deleted run id is a fresh run: new checkpoints save and load normally."""
    await store.save(run_prefix, "n", SAMPLES["nested"])
    await store.delete(run_prefix)
    await store.save(run_prefix, "n", SAMPLES["generic"])
    assert_same(await store.load(run_prefix, "n"), SAMPLES["generic"])


class Step(BaseModel):
    run: str
    node: int
    at: datetime
    payload: list[int]


async def test_concurrent_writers_on_different_runs(store: Any, run_prefix: str) -> None:
    """20 runs writing 10 nodes each at the same time each read back exactly their own data."""
    runs = [f"{run_prefix}-{i}" for i in range(20)]
    start = datetime(2025, 1, 1, tzinfo=UTC)

    def state(run: str, node: int) -> Step:
        return Step(run=run, node=node, at=start + timedelta(minutes=node), payload=[node] * node)

    async def writer(run: str) -> None:
        for node in range(10):
            await store.save(run, f"n{node}", state(run, node))

    async with anyio.create_task_group() as tg:
        for run in runs:
            tg.start_soon(writer, run)
    for run in runs:
        for node in range(10):
            assert_same(await store.load(run, f"n{node}"), state(run, node))
    for run in runs:
        await store.delete(run)


id_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),  # no surrogates, no NUL
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(run=id_text, node=id_text, other_node=id_text)
async def test_arbitrary_ids_round_trip(store: Any, run: str, node: str, other_node: str) -> None:
    """Any text (no NUL) works as a run id and a node id, and distinct ids never collide."""
    state = SAMPLES["enum-datetime"]
    await store.delete(run)
    try:
        await store.save(run, node, state)
        assert_same(await store.load(run, node), state)
        if other_node != node:
            assert await store.load(run, other_node) is None
    finally:
        await store.delete(run)
    assert await store.load(run, node) is None


# -------------------------------------------------------------------------- effect logs


def sample_log(run_id: str) -> EffectLog:
    """A small effect log built by hand: calls, a failure, a sleep, checkpoints, a resume."""
    t0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    header = LogHeader(
        run_id=run_id, plan="fp-1234", seed=42, version="0.2.0", started_at=t0.isoformat()
    )
    error = fx.ErrorInfo(type_names=("builtins.ValueError", "builtins.Exception"), message="bad")
    records: list[Any] = [
        (fx.CallNode(node_id="fetch", attempt=1), fx.NodeRaised(error, t0, 12)),
        (fx.Sleep(seconds=0.25), fx.Slept(seconds=0.25)),
        (
            fx.CallNode(node_id="fetch", attempt=2, timeout_ms=500),
            fx.NodeReturned(output={"x": 1, "s": "\u00e9\n"}, started_at=t0, duration_ms=3),
        ),
        (fx.Commit("fetch", run_id, 2, t0, {"x": 0}, SAMPLES["nested"], 3, "m:Nested",
                   SAMPLES["nested"]), None),
        ResumeMarker(at=(t0 + timedelta(minutes=5)).isoformat()),
        (
            fx.CallNode(node_id="parse", attempt=1, model="gpt-4o-mini"),
            fx.NodeReturned(output={"y": [1, 2]}, started_at=t0, duration_ms=7, input_tokens=9),
        ),
        (fx.Commit("parse", run_id, 1, t0, {"y": [1, 2]}, SAMPLES["generic"], 7, "m:Generic",
                   SAMPLES["generic"]), None),
    ]
    return EffectLog(header, records)


async def test_effect_log_reads_back_exactly(log_store: Any, run_prefix: str) -> None:
    """Lines appended in several calls read back as the same log, line for line."""
    lines = sample_log(run_prefix).lines()
    await log_store.append_log(run_prefix, lines[:1])
    await log_store.append_log(run_prefix, lines[1:4])
    await log_store.append_log(run_prefix, lines[4:])
    read = await log_store.read_log(run_prefix)
    assert read is not None
    assert read.lines() == lines
    assert read.to_jsonl() == sample_log(run_prefix).to_jsonl()
    assert read == sample_log(run_prefix)


async def test_missing_log_is_none(log_store: Any, run_prefix: str) -> None:
    """A run with no log, even one with checkpoints, reads back no log (None)."""
    assert await log_store.read_log(run_prefix) is None
    await log_store.save(run_prefix, "n", SAMPLES["nested"])
    assert await log_store.read_log(run_prefix) is None


async def test_append_with_checkpoint_saves_both(log_store: Any, run_prefix: str) -> None:
    """append_log with a checkpoint makes both the lines and the checkpoint readable."""
    lines = sample_log(run_prefix).lines()
    await log_store.append_log(run_prefix, lines[:4], ("fetch", SAMPLES["nested"]))
    await log_store.append_log(run_prefix, lines[4:], ("parse", SAMPLES["generic"]))
    read = await log_store.read_log(run_prefix)
    assert read is not None and read.lines() == lines
    assert_same(await log_store.load(run_prefix, "fetch"), SAMPLES["nested"])
    assert_same(await log_store.load(run_prefix, "parse"), SAMPLES["generic"])


async def test_delete_removes_the_log_of_that_run_only(log_store: Any, run_prefix: str) -> None:
    """delete drops a run's log and checkpoints; a run whose id extends it keeps its own."""
    other = run_prefix + ":b"
    for run in (run_prefix, other):
        await log_store.append_log(run, sample_log(run).lines(), ("n", SAMPLES["nested"]))
    await log_store.delete(run_prefix)
    assert await log_store.read_log(run_prefix) is None
    assert await log_store.load(run_prefix, "n") is None
    read = await log_store.read_log(other)
    assert read is not None and read.lines() == sample_log(other).lines()
    assert_same(await log_store.load(other, "n"), SAMPLES["nested"])
    await log_store.delete(other)


async def test_concurrent_appends_on_different_runs(log_store: Any, run_prefix: str) -> None:
    """Runs appending their logs line by line at the same time each read back their own log."""
    runs = [f"{run_prefix}-{i}" for i in range(10)]

    async def writer(run: str) -> None:
        for line in sample_log(run).lines():
            await log_store.append_log(run, [line], ("last", SAMPLES["enum-datetime"]))

    async with anyio.create_task_group() as tg:
        for run in runs:
            tg.start_soon(writer, run)
    for run in runs:
        read = await log_store.read_log(run)
        assert read is not None and read.lines() == sample_log(run).lines()
        await log_store.delete(run)


# ------------------------------------------------------------------------------ inputs

INPUT_STORES = (
    "memory",
    "memory-async",
    "file",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("sync-redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
)

# Keys as waits make them (a wait in a loop, in a map_each item, both), and keys that try
# to escape a folder, a Redis key or a file name, or to collide with each other.
HOSTILE_KEYS = (
    "approval",
    "approval@agent#3",
    "approval@fan[2]",
    "approval@agent#3/fan[2]",
    "approval@agent#13",
    "Approval",
    "../../etc/passwd",
    "..",
    ".",
    "a/b\\c",
    "}:ckpt",
    "{x}",
    "*?[",
    "%2e",
    "a b\tc",
    "caf\u00e9 \u4e2d \U0001f600",
    "k" * 300,
    "k" * 301,
)


async def _call(result: Any) -> Any:
    """The value of a store call, sync or async."""
    return await result if inspect.isawaitable(result) else result


@pytest.fixture
def sync_redis_store(redis_url: str, unique_name: Callable[[str], str]) -> Iterator[Any]:
    """A SyncRedisStore under a key prefix of its own, emptied and closed afterwards."""
    import redis

    from interpreters.stores.redis import SyncRedisStore

    prefix = unique_name("stroma-inputs")
    sync_store = SyncRedisStore(redis_url, key_prefix=prefix)
    try:
        yield sync_store
    finally:
        sync_store.close()
        client = redis.Redis.from_url(redis_url)
        try:
            for key in client.scan_iter(match=prefix.encode() + b":*", count=1000):
                client.delete(key)
        finally:
            client.close()


@pytest.fixture(params=INPUT_STORES)
def input_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each built-in store that keeps inputs, sync and async, fresh for one test."""
    from stroma.checkpoint import InMemoryStore

    kind = request.param
    if kind == "memory":
        return InMemoryStore()
    if kind == "memory-async":
        return AsyncInMemoryStore()
    if kind == "file":
        from interpreters.stores.file import FileStore

        return FileStore(tmp_path / "store")
    fixture = {"redis": "redis_store", "sync-redis": "sync_redis_store",
               "postgres": "postgres_store"}[kind]
    return request.getfixturevalue(fixture)


async def test_input_round_trips(input_store: Any, run_prefix: str) -> None:
    """A put input reads back as the same text, byte for byte."""
    text = '{"approved":true,"note":"caf\u00e9 \u4e2d \U0001f600 \\"q\\" \\\\ \\n"}'
    await _call(input_store.put_input(run_prefix, "approval", text))
    assert await _call(input_store.get_input(run_prefix, "approval")) == text


async def test_input_put_again_replaces_it(input_store: Any, run_prefix: str) -> None:
    """Putting the same key again replaces the input: the latest put wins."""
    for n in range(3):
        await _call(input_store.put_input(run_prefix, "approval", f'{{"n":{n}}}'))
    assert await _call(input_store.get_input(run_prefix, "approval")) == '{"n":2}'


async def test_unknown_input_is_none(input_store: Any, run_prefix: str) -> None:
    """An input never put, of a run never written or of another run, reads back as None."""
    assert await _call(input_store.get_input(run_prefix, "approval")) is None
    await _call(input_store.put_input(run_prefix, "approval", "true"))
    assert await _call(input_store.get_input(run_prefix, "approval@agent#1")) is None
    assert await _call(input_store.get_input(run_prefix + "-other", "approval")) is None
    assert await _call(input_store.get_input(run_prefix + ":b", "approval")) is None


async def test_hostile_input_keys_are_kept_apart(input_store: Any, run_prefix: str) -> None:
    """Every key (loop/map coordinates, separators, dots, case, globs, long) is its own
    input: each reads back its own text, and deleting the run removes every one."""
    for n, key in enumerate(HOSTILE_KEYS):
        await _call(input_store.put_input(run_prefix, key, f'{{"key":{n}}}'))
    for n, key in enumerate(HOSTILE_KEYS):
        assert await _call(input_store.get_input(run_prefix, key)) == f'{{"key":{n}}}', key
    await _call(input_store.delete(run_prefix))
    for key in HOSTILE_KEYS:
        assert await _call(input_store.get_input(run_prefix, key)) is None, key


async def test_delete_removes_the_inputs_of_that_run_only(
    input_store: Any, run_prefix: str
) -> None:
    """Deleting a run removes its inputs (with its checkpoints); runs whose ids extend it
    keep theirs, and the run id can be sent inputs again afterwards."""
    others = [run_prefix + ":b", run_prefix + "b", run_prefix + "}:inputs", run_prefix + "/x"]
    for run in [run_prefix, *others]:
        await _call(input_store.put_input(run, "approval@agent#1", '"yes"'))
        await _call(input_store.save(run, "n", SAMPLES["enum-datetime"]))
    await _call(input_store.delete(run_prefix))
    assert await _call(input_store.get_input(run_prefix, "approval@agent#1")) is None
    assert await _call(input_store.load(run_prefix, "n")) is None
    for run in others:
        assert await _call(input_store.get_input(run, "approval@agent#1")) == '"yes"'
    await _call(input_store.put_input(run_prefix, "approval@agent#1", '"again"'))
    assert await _call(input_store.get_input(run_prefix, "approval@agent#1")) == '"again"'
    for run in [run_prefix, *others]:
        await _call(input_store.delete(run))


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(keys=st.lists(id_text, min_size=1, max_size=4, unique=True), text=st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60))
async def test_arbitrary_input_keys_and_texts_round_trip(
    input_store: Any, run_prefix: str, keys: list[str], text: str
) -> None:
    """Any key text (no NUL) and any JSON text keep apart and read back exactly."""
    texts = [json.dumps([n, text], ensure_ascii=False) for n in range(len(keys))]
    try:
        for key, value in zip(keys, texts, strict=True):
            await _call(input_store.put_input(run_prefix, key, value))
        for key, value in zip(keys, texts, strict=True):
            assert await _call(input_store.get_input(run_prefix, key)) == value
    finally:
        await _call(input_store.delete(run_prefix))
