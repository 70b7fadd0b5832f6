"""Inputs for waiting runs on every built-in store: ``send_input`` end to end, and what the
durable stores promise about ``put_input`` / ``get_input`` (files, errors, leases, TTLs,
an older PostgreSQL database).

The end-to-end cases run on each built-in store (the in-memory stores, FileStore, RedisStore,
SyncRedisStore, PostgresStore) and on both anyio backends, except where the store's client
runs on asyncio only (RedisStore, PostgresStore).
"""

from __future__ import annotations

import inspect
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import (
    AsyncInMemoryStore,
    InMemoryStore,
    InputRefused,
    NodeContract,
    RunLocked,
    RunStatus,
    await_input,
    loop,
    send_input,
    stroma_node,
)
from stroma.errors import LogCorrupted, StoreError
from stroma.inputs import pending_wait
from stroma.plan import seq
from stroma.runner import RunConfig, interpret
from tests.services import drop_postgres_tables, drop_redis_prefix, unique

pytestmark = pytest.mark.anyio

# Each store kind and the backends it runs on (redis.asyncio and asyncpg: asyncio only).
KINDS: dict[str, tuple[str, ...]] = {
    "memory": ("asyncio", "trio"),
    "memory-async": ("asyncio", "trio"),
    "file": ("asyncio", "trio"),
    "sync-redis": ("asyncio", "trio"),
    "redis": ("asyncio",),
    "postgres": ("asyncio",),
}
_MARKS = {"redis": pytest.mark.redis, "sync-redis": pytest.mark.redis,
          "postgres": pytest.mark.postgres}
CASES = [
    pytest.param((kind, backend), id=f"{kind}-{backend}",
                 marks=[_MARKS[kind]] if kind in _MARKS else [])
    for kind, backends in KINDS.items()
    for backend in backends
]


async def call(result: Any) -> Any:
    """The value of a store call, sync or async."""
    return await result if inspect.isawaitable(result) else result


class Workers:
    """Store objects on one shared place (folder, key prefix, tables): each ``make()`` is
    another worker's store; the in-memory stores are one object (memory is not shared)."""

    def __init__(self, kind: str, make: Callable[[], Any]) -> None:
        self.kind = kind
        self._make = make
        self.made: list[Any] = []
        self.target = ""  # the server's URL/DSN, for a lease-holding child process
        self.name = ""  # the key prefix / table prefix

    def make(self) -> Any:
        if self.made and self.kind.startswith("memory"):
            return self.made[0]
        self.made.append(self._make())
        return self.made[-1]


def _drop_redis_prefix_blocking(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` with the blocking client (works on any backend)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=prefix.encode() + b":*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(store kind, anyio backend)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    """The backend of the case: both for stores that run on trio, asyncio for the others."""
    return case[1]


@pytest.fixture
async def workers(
    case: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Workers]:
    """Store objects of the case's kind on one fresh place, closed and emptied afterwards."""
    kind = case[0]
    if kind == "memory":
        yield Workers(kind, InMemoryStore)
        return
    if kind == "memory-async":
        yield Workers(kind, AsyncInMemoryStore)
        return
    if kind == "file":
        yield Workers(kind, lambda: FileStore(tmp_path / "store"))
        return
    if kind in ("redis", "sync-redis"):
        from interpreters.stores.redis import RedisStore, SyncRedisStore

        url = request.getfixturevalue("redis_url")
        prefix = unique("stroma-inputs")
        cls = RedisStore if kind == "redis" else SyncRedisStore
        made = Workers(kind, lambda: cls(url, key_prefix=prefix, lease_ms=30000))
        made.target, made.name = url, prefix
        try:
            yield made
        finally:
            for store in made.made:
                await call(store.close())
            _drop_redis_prefix_blocking(url, prefix)  # (redis.asyncio would not run on trio)
        return
    from interpreters.stores.postgres import PostgresStore

    dsn = request.getfixturevalue("postgres_dsn")
    prefix = unique("inp")
    made = Workers(kind, lambda: PostgresStore(dsn, table_prefix=prefix, lease_seconds=30))
    made.target, made.name = dsn, prefix
    try:
        yield made
    finally:
        for store in made.made:
            await store.close()
        await drop_postgres_tables(dsn, PostgresStore(dsn, table_prefix=prefix).tables)


# ------------------------------------------------------------------------------ plans


class Approval(BaseModel):
    approved: bool
    by: str


class Doc(BaseModel):
    n: int = 0
    trail: list[str] = []
    approval: Approval | None = None


def node(node_id: str, calls: Counter[str]) -> Any:
    """A node that counts its calls, adds 1 to ``n`` and its id to ``trail``."""

    async def step(doc: Doc) -> dict[str, Any]:
        calls[node_id] += 1
        return {**doc.model_dump(), "n": doc.n + 1, "trail": [*doc.trail, node_id]}

    contract = NodeContract(node_id=node_id, input_schema=Doc, output_schema=Doc)
    return stroma_node(node_id, contract)(step)


def approval_plan(calls: Counter[str]) -> Any:
    """draft, review, wait for an approval, publish."""
    return seq(node("draft", calls), node("review", calls), await_input("approval", Approval),
               node("publish", calls))


def looped_plan(calls: Counter[str]) -> Any:
    """A loop of two iterations, each doing work and then waiting for an approval."""
    body = seq(node("work", calls), await_input("approval", Approval))
    return loop(body, until=lambda d: d.n >= 2, max_iterations=3, name="agent")


async def read_log(store: Any, run_id: str) -> Any:
    if hasattr(store, "read_log"):
        return await call(store.read_log(run_id))
    return store.get_log(run_id)


# ------------------------------------------------------------------- send_input end to end


async def test_a_waiting_run_is_sent_its_input_and_resumed(workers: Workers) -> None:
    """A run WAITING at an await_input refuses a bad payload (naming the field) and a wrong
    digest with nothing changed, accepts a good one, and run again by another worker ends
    RESUMED with the input in its state, no node before the wait called again."""
    calls: Counter[str] = Counter()
    store = workers.make()
    first = await interpret(approval_plan(calls), Doc(), store=store,
                            config=RunConfig(run_id="doc-1"))
    assert first.status is RunStatus.WAITING
    assert calls == Counter({"draft": 1, "review": 1})
    log = await read_log(store, "doc-1")
    [wait] = pending_wait(log)
    assert (wait.key, wait.name) == ("approval", "approval")
    lines = log.lines()

    async def unchanged() -> None:
        again = await read_log(store, "doc-1")
        assert again.lines() == lines
        assert [w.key for w in pending_wait(again)] == ["approval"]
        assert await call(store.get_input("doc-1", "approval")) is None

    with pytest.raises(InputRefused, match=r"approved: Input should be a valid boolean"):
        await send_input(store, "doc-1", "approval", {"approved": "perhaps", "by": "ada"})
    await unchanged()
    with pytest.raises(InputRefused, match=r"\bby: Field required"):
        await send_input(store, "doc-1", "approval", {"approved": True})
    await unchanged()
    with pytest.raises(InputRefused, match=r"meant for another request"):
        await send_input(store, "doc-1", "approval", {"approved": True, "by": "ada"},
                         digest="0" * 16)
    await unchanged()
    with pytest.raises(InputRefused, match=r"'yes' is str, read as JSON text, and it is not"):
        await send_input(store, "doc-1", "approval", "yes")
    await unchanged()

    key = await send_input(store, "doc-1", "approval", Approval(approved=True, by="ada"),
                           digest=wait.digest)
    assert key == "approval"
    stored = await call(store.get_input("doc-1", "approval"))
    assert json.loads(stored) == {"approved": True, "by": "ada"}

    second = await interpret(approval_plan(calls), Doc(), store=workers.make(),
                             config=RunConfig(run_id="doc-1"))
    assert second.status is RunStatus.RESUMED
    assert second.final_state == Doc(n=3, trail=["draft", "review", "publish"],
                                     approval=Approval(approved=True, by="ada"))
    assert calls == Counter({"draft": 1, "review": 1, "publish": 1})
    assert pending_wait(await read_log(store, "doc-1")) == []


async def test_a_wait_in_each_iteration_of_a_loop_has_its_own_key(workers: Workers) -> None:
    """A wait inside a loop asks for ``approval@agent#1``, then ``approval@agent#2``; each
    input sent resumes the run at the right iteration and the work of an iteration is done
    once."""
    calls: Counter[str] = Counter()
    keys = []
    for n in (1, 2):
        result = await interpret(looped_plan(calls), Doc(), store=workers.make(),
                                 config=RunConfig(run_id="agent-1"))
        assert result.status is RunStatus.WAITING
        [wait] = pending_wait(await read_log(workers.make(), "agent-1"))
        keys.append(wait.key)
        assert calls == Counter({"work": n})
        sent = await send_input(workers.make(), "agent-1", "approval",
                                {"approved": n == 2, "by": f"reviewer{n}"}, digest=wait.digest)
        assert sent == wait.key
    assert keys == ["approval@agent#1", "approval@agent#2"]
    done = await interpret(looped_plan(calls), Doc(), store=workers.make(),
                           config=RunConfig(run_id="agent-1"))
    assert done.status is RunStatus.RESUMED
    assert done.final_state == Doc(n=2, trail=["work", "work"],
                                   approval=Approval(approved=True, by="reviewer2"))
    assert calls == Counter({"work": 2})
    for n, key in enumerate(keys, 1):
        text = await call(workers.make().get_input("agent-1", key))
        assert json.loads(text)["by"] == f"reviewer{n}"


async def test_a_waiting_run_holds_no_lease(
    workers: Workers, request: pytest.FixtureRequest
) -> None:
    """A WAITING run is listed as WAITING and leased by no one: another worker (a process of
    its own, for the server stores) takes its lease at once."""
    if workers.kind.startswith("memory"):
        pytest.skip("the in-memory stores have neither leases nor list_runs")
    store = workers.make()
    result = await interpret(approval_plan(Counter()), Doc(), store=store,
                             config=RunConfig(run_id="idle"))
    assert result.status is RunStatus.WAITING
    [info] = [i for i in await call(workers.make().list_runs()) if i.run_id == "idle"]
    assert info.status == "WAITING" and info.nodes_done == 2
    if workers.kind == "file":
        return  # FileStore has no leases: nothing holds the run
    lease_holder = request.getfixturevalue("lease_holder")
    kind = "postgres" if workers.kind == "postgres" else "redis"
    # The stores' leases last 30 s: a lease the run had kept would refuse the child's claim.
    async with lease_holder(kind, workers.target, workers.name, "idle", "another-worker") as p:
        assert p.returncode is None
    await send_input(store, "idle", "approval", {"approved": False, "by": "bo"})
    with anyio.fail_after(20):
        while True:  # until the killed child's 300 ms lease has expired
            try:
                resumed = await interpret(approval_plan(Counter()), Doc(), store=workers.make(),
                                          config=RunConfig(run_id="idle"))
                break
            except RunLocked:
                await anyio.sleep(0.05)
    assert resumed.status is RunStatus.RESUMED
    assert resumed.final_state.approval == Approval(approved=False, by="bo")  # type: ignore[attr-defined]


async def test_a_put_while_a_worker_holds_the_run_leaves_its_log_whole(
    workers: Workers,
) -> None:
    """Inputs are not part of the fenced log: a put from another worker, and from the
    holder's own store object, is accepted while the run is in progress, and the run goes
    on to a whole, COMPLETED log."""
    calls: Counter[str] = Counter()
    inside = anyio.Event()
    go_on = anyio.Event()

    async def slow(doc: Doc) -> dict[str, Any]:
        inside.set()
        await go_on.wait()
        return {**doc.model_dump(), "n": doc.n + 1}

    contract = NodeContract(node_id="slow", input_schema=Doc, output_schema=Doc)
    plan = seq(node("a", calls), stroma_node("slow", contract)(slow), node("b", calls))
    holder = workers.make()
    other = workers.make()
    results: list[Any] = []

    async def run() -> None:
        results.append(await interpret(plan, Doc(), store=holder,
                                       config=RunConfig(run_id="busy")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(30):
            await inside.wait()
        await call(other.put_input("busy", "approval", '{"from":"other"}'))
        await call(holder.put_input("busy", "note@agent#1", '{"from":"holder"}'))
        go_on.set()
    [result] = results
    assert result.status is RunStatus.COMPLETED and result.final_state.n == 3
    log = await read_log(other, "busy")
    assert log.finish is not None and log.finish.status is RunStatus.COMPLETED
    assert log.lines() == result.log.lines()
    assert log.completed_nodes() == ["a", "slow", "b"]
    assert await call(other.get_input("busy", "approval")) == '{"from":"other"}'
    assert await call(other.get_input("busy", "note@agent#1")) == '{"from":"holder"}'


async def test_deleting_a_waiting_run_forgets_its_inputs(workers: Workers) -> None:
    """After delete, a run with the same id starts afresh: the input sent to the deleted one
    is gone, so the new run waits again."""
    store = workers.make()
    calls: Counter[str] = Counter()
    await interpret(approval_plan(calls), Doc(), store=store, config=RunConfig(run_id="gone"))
    await send_input(store, "gone", "approval", {"approved": True, "by": "ada"})
    await call(store.delete("gone"))
    assert await call(store.get_input("gone", "approval")) is None
    again = await interpret(approval_plan(calls), Doc(), store=workers.make(),
                            config=RunConfig(run_id="gone"))
    assert again.status is RunStatus.WAITING
    assert calls == Counter({"draft": 2, "review": 2})


async def test_misused_put_input_says_what_is_expected(workers: Workers) -> None:
    """On the durable stores a text that is not a str is a TypeError naming the run and the
    key, a text that is not JSON (a run could never read it) or does not encode as UTF-8 is
    a StoreError saying so, and so is a key that is not a non-empty str; nothing is kept."""
    store = workers.make()
    if workers.kind.startswith("memory"):
        pytest.skip("the in-memory stores keep what they are given (they check nothing)")
    with pytest.raises(TypeError, match=r"input 'approval' of run 'r'.*must be given as a str"):
        await call(store.put_input("r", "approval", {"approved": True}))
    for bad_key in ("", 7):
        with pytest.raises(StoreError, match="input key"):
            await call(store.put_input("r", bad_key, "true"))
        with pytest.raises(StoreError, match="input key"):
            await call(store.get_input("r", bad_key))
    with pytest.raises(StoreError, match="lone surrogate"):
        await call(store.put_input("r", "approval", '"\ud800"'))
    for not_json in ("yes", "", '{"approved": tru', '"\x00"'):
        with pytest.raises(StoreError, match=r"input 'approval' of run 'r' is not JSON text"):
            await call(store.put_input("r", "approval", not_json))
    assert await call(store.get_input("r", "approval")) is None


# ------------------------------------------------------------------------ FileStore


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_file_inputs_are_files_in_the_runs_inputs_folder(
    file_store: FileStore, tmp_path: Path
) -> None:
    """Every input is one file in ``runs/<run>/inputs``, named by its encoded key; none
    is written anywhere else, and nothing but the input files is left behind."""
    keys = ["approval", "approval@agent#3", "approval@fan[2]", "../../x", ".", "A" * 250]
    for key in keys:
        await file_store.put_input("run/1", key, '"ok"')
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    folder = "store/runs/run%2f1/inputs/"
    assert all(f.startswith(folder) and f.endswith(".json") for f in files), files
    assert len(files) == len(keys)
    assert folder + "approval%40agent%233.json" in files
    assert folder + "approval%40fan%5b2%5d.json" in files
    assert await file_store.run_ids() == ["run/1"]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_file_put_leaves_a_running_workers_temp_files_alone(
    file_store: FileStore,
) -> None:
    """A put never removes a checkpoint temp file (another process may be writing it) nor a
    fresh input temp file; it removes an input temp file left by a put that crashed."""
    await file_store.save("r", "n", Doc())
    run = Path(file_store.path) / "runs" / "r"
    in_flight = run / "checkpoints" / "~tmp.0123456789abcdef"
    in_flight.write_bytes(b"half a checkpoint")
    old_ckpt = os.stat(in_flight).st_mtime - 3600
    os.utime(in_flight, (old_ckpt, old_ckpt))
    await file_store.put_input("r", "approval", "true")
    crashed = run / "inputs" / "~tmp.aaaaaaaaaaaaaaaa"
    fresh = run / "inputs" / "~tmp.bbbbbbbbbbbbbbbb"
    crashed.write_bytes(b"{")
    fresh.write_bytes(b"{")
    old = os.stat(crashed).st_mtime - 3600
    os.utime(crashed, (old, old))
    await file_store.put_input("r", "approval", "false")
    assert in_flight.exists() and fresh.exists() and not crashed.exists()
    assert await file_store.get_input("r", "approval") == "false"
    assert await file_store.load("r", "n") == Doc()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_file_input_errors_name_the_run_and_the_key(file_store: FileStore) -> None:
    """An OS error writing or reading an input is a StoreError naming the run, the key and
    the file, never an OSError."""
    await file_store.put_input("r", "approval", "true")
    inputs = Path(file_store.path) / "runs" / "r2" / "inputs"
    inputs.parent.mkdir(parents=True)
    inputs.write_text("a file where the inputs folder should be")
    with pytest.raises(StoreError) as put_info:
        await file_store.put_input("r2", "approval@agent#2", "true")
    message = str(put_info.value)
    assert "put_input for run 'r2', input 'approval@agent#2'" in message
    assert str(inputs) in message
    folder = Path(file_store.path) / "runs" / "r" / "inputs" / "approval%40x.json"
    folder.mkdir()  # a folder where the input file of 'approval@x' should be
    with pytest.raises(StoreError) as get_info:
        await file_store.get_input("r", "approval@x")
    assert "get_input for run 'r', input 'approval@x'" in str(get_info.value)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_damaged_input_file_is_log_corrupted(file_store: FileStore) -> None:
    """An input file that is not what put_input wrote (not JSON, wrong shape, another key's
    file moved here) is a LogCorrupted naming the file and the fix."""
    await file_store.put_input("r", "a", "1")
    await file_store.put_input("r", "b", "2")
    folder = Path(file_store.path) / "runs" / "r" / "inputs"
    for content, problem in [
        (b"{torn", "not JSON"),
        (b'{"key": "a", "text": 1}', "expected a JSON object"),
        ((folder / "b.json").read_bytes(), "holds the input 'b', not 'a'"),
    ]:
        (folder / "a.json").write_bytes(content)
        with pytest.raises(LogCorrupted, match=problem) as info:
            await file_store.get_input("r", "a")
        assert str(folder / "a.json") in str(info.value)
        assert "send the input again" in str(info.value)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_symlinked_inputs_folder_is_refused(file_store: FileStore, tmp_path: Path) -> None:
    """An inputs folder that a planted symlink leads out of the store is refused; nothing is
    written outside the store."""
    outside = tmp_path / "outside"
    outside.mkdir()
    run = Path(file_store.path) / "runs" / "r"
    run.mkdir(parents=True)
    (run / "inputs").symlink_to(outside)
    with pytest.raises(StoreError, match="symlink"):
        await file_store.put_input("r", "approval", "true")
    with pytest.raises(StoreError, match="symlink"):
        await file_store.get_input("r", "approval")
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------- server stores


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_input_errors_name_the_run_and_the_key(closed_port: int) -> None:
    """A Redis server that cannot be reached makes put_input/get_input a StoreError naming
    the operation, the run and the key (both stores)."""
    from interpreters.stores.redis import RedisStore, SyncRedisStore

    url = f"redis://127.0.0.1:{closed_port}/0"
    for store in (RedisStore(url, max_attempts=1), SyncRedisStore(url, max_attempts=1)):
        with pytest.raises(StoreError) as put_info:
            await call(store.put_input("r", "approval@agent#1", "true"))
        assert "put_input for run 'r', input 'approval@agent#1'," in str(put_info.value)
        with pytest.raises(StoreError) as get_info:
            await call(store.get_input("r", "approval@agent#1"))
        assert "get_input for run 'r', input 'approval@agent#1'," in str(get_info.value)
        await call(store.close())


@pytest.mark.postgres
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_postgres_input_errors_name_the_run_and_the_key(closed_port: int) -> None:
    """A PostgreSQL server that cannot be reached makes put_input/get_input a StoreError
    naming the operation, the run and the key."""
    from interpreters.stores.postgres import PostgresStore

    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{closed_port}/test",
                          max_attempts=1)
    try:
        with pytest.raises(StoreError) as put_info:
            await store.put_input("r", "approval@fan[2]", "true")
        assert "put_input for run 'r', input 'approval@fan[2]'," in str(put_info.value)
        with pytest.raises(StoreError) as get_info:
            await store.get_input("r", "approval@fan[2]")
        assert "get_input for run 'r', input 'approval@fan[2]'," in str(get_info.value)
    finally:
        await store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_database_made_before_inputs_gets_the_inputs_table(postgres_dsn: str) -> None:
    """Tables made by a version without inputs (no inputs table) keep their runs, and a store
    of this version adds the inputs table when it connects; puts and gets then work."""
    import asyncpg

    from interpreters.stores.postgres import PostgresStore

    prefix = unique("old")
    old = PostgresStore(postgres_dsn, table_prefix=prefix)
    try:
        await old.append_log("r", [], ("n", Doc(n=4)))
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE {old.inputs_table}")  # as an older version made it
        finally:
            await conn.close()
        new = PostgresStore(postgres_dsn, table_prefix=prefix)
        try:
            assert await new.load("r", "n") == Doc(n=4)
            await new.put_input("r", "approval", "true")
            assert await new.get_input("r", "approval") == "true"
        finally:
            await new.close()
    finally:
        await old.close()
        await drop_postgres_tables(postgres_dsn, old.tables)


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_inputs_expire_with_the_run(redis_url: str) -> None:
    """The inputs key has the run's TTL: a put refreshes the TTL of the run's keys (so a run
    sent its input does not expire before it resumes), and a commit refreshes the inputs'."""
    import redis.asyncio as aioredis

    from interpreters.stores.redis import RedisStore

    prefix = unique("stroma-ttl")
    store = RedisStore(redis_url, ttl_seconds=120, key_prefix=prefix)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        keys = store._keys("r", "test")
        await store.append_log("r", ['{"stroma_log": 1}'], ("n", Doc()))
        await store.put_input("r", "approval", "true")
        for key in (*keys.data, keys.inputs):
            assert 0 < await raw.ttl(key) <= 120, key
            await raw.pexpire(key, 5000)
        await store.put_input("r", "approval@agent#2", "false")
        for key in (*keys.data, keys.inputs):
            assert await raw.ttl(key) > 60, key
            await raw.pexpire(key, 5000)
        await store.save("r", "m", Doc())
        for key in (keys.ckpt, keys.log, keys.inputs):
            assert await raw.ttl(key) > 60, key
        await store.delete("r")
        assert await raw.exists(*keys.data, keys.inputs) == 0
    finally:
        await raw.aclose()
        await store.close()
        await drop_redis_prefix(redis_url, prefix)
