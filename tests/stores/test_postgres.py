"""PostgresStore against a real PostgreSQL server: tables, transactions, errors, leases."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

import interpreters.stores.postgres as postgres_module
from interpreters.stores.postgres import PostgresStore
from stroma.errors import LogCorrupted, RunLocked, StoreError, UnsafeSchemaRef

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


class State(BaseModel):
    n: int
    at: datetime


STATE = State(n=1, at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
LINES = ['{"stroma_log":1}', '{"i":0}', '{"i":1}']  # raw lines: the store does not parse them


@pytest.fixture
async def raw(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the same database, to look behind the store's back."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def count_rows(raw: asyncpg.Connection, store: PostgresStore, run_id: str) -> list[int]:
    """How many rows the run has in the checkpoint, log, lease and input tables."""
    return [
        await raw.fetchval(f"SELECT count(*) FROM {table} WHERE run_id = $1", run_id)
        for table in store.tables
    ]


async def log_rows(raw: asyncpg.Connection, store: PostgresStore, run_id: str) -> list[Any]:
    return await raw.fetch(
        f"SELECT seq, line FROM {store.log_table} WHERE run_id = $1 ORDER BY seq", run_id
    )


# ------------------------------------------------------------------------- tables


async def test_tables_are_created_on_first_use(
    postgres_dsn: str, raw: asyncpg.Connection, unique_name: Callable[[str], str]
) -> None:
    """The first operation creates the four tables; no setup call is needed."""
    store = PostgresStore(postgres_dsn, table_prefix=unique_name("t"))
    try:
        for table in store.tables:
            assert await raw.fetchval("SELECT to_regclass($1)", table) is None
        assert await store.load("r", "n") is None
        for table in store.tables:
            assert await raw.fetchval("SELECT to_regclass($1)", table) is not None
    finally:
        await store.close()
        await raw.execute(f"DROP TABLE IF EXISTS {', '.join(store.tables)}")


async def test_concurrent_setup_is_idempotent(
    postgres_dsn: str, raw: asyncpg.Connection, unique_name: Callable[[str], str]
) -> None:
    """Many workers setting up the same tables at once (and again later) all succeed."""
    prefix = unique_name("t")
    stores = [PostgresStore(postgres_dsn, table_prefix=prefix) for _ in range(6)]
    try:
        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(store.setup)
        await stores[0].setup()
        await stores[1].save("r", "n", STATE)
        assert await stores[2].load("r", "n") == STATE
    finally:
        for store in stores:
            await store.close()
        await raw.execute(f"DROP TABLE IF EXISTS {', '.join(stores[0].tables)}")


async def test_tables_live_in_the_configured_schema(
    postgres_dsn: str, raw: asyncpg.Connection, unique_name: Callable[[str], str]
) -> None:
    """With schema="x", the schema and its tables are created there, not in public."""
    schema = unique_name("s")
    store = PostgresStore(postgres_dsn, schema=schema, table_prefix="stroma")
    try:
        await store.save("r", "n", STATE)
        tables = await raw.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        assert sorted(t["table_name"] for t in tables) == [
            "stroma_checkpoints",
            "stroma_inputs",
            "stroma_leases",
            "stroma_log",
        ]
    finally:
        await store.close()
        await raw.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# --------------------------------------------------------------------- rows and log


TRICKY_RUNS = ["a", "a%", "a_", "a:b", "A", "a ", "ab"]


async def test_delete_removes_exactly_the_runs_rows(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """delete removes the run's rows in every table and no row of look-alike runs."""
    for run in TRICKY_RUNS:
        await postgres_store.append_log(run, LINES, ("n", STATE))
        await postgres_store.put_input(run, "approval", "true")
    await raw.execute(
        f"INSERT INTO {postgres_store.leases_table} VALUES ('a', 'gone', now() - interval '1 s')"
    )
    assert await count_rows(raw, postgres_store, "a") == [1, 3, 1, 1]
    await postgres_store.delete("a")
    assert await count_rows(raw, postgres_store, "a") == [0, 0, 0, 0]
    for run in TRICKY_RUNS[1:]:
        assert await count_rows(raw, postgres_store, run) == [1, 3, 0, 1]
        assert await postgres_store.load(run, "n") == STATE
        assert await postgres_store.get_input(run, "approval") == "true"


async def test_delete_leaves_a_live_lease_to_its_holder(postgres_store: PostgresStore) -> None:
    """Deleting a run's data while a worker holds its lease does not hand the run to another."""
    async with postgres_store.lease("r", "worker-a"):
        await postgres_store.save("r", "n", STATE)
        await postgres_store.delete("r")
        with pytest.raises(RunLocked):
            async with postgres_store.lease("r", "worker-b"):
                pass


async def test_seq_continues_across_appends(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """Each append continues the run's sequence numbers where the last one stopped."""
    await postgres_store.append_log("r", LINES[:1])
    await postgres_store.append_log("r", LINES[1:])
    await postgres_store.append_log("r", [], ("n", STATE))  # a checkpoint alone adds no row
    rows = await log_rows(raw, postgres_store, "r")
    assert [(r["seq"], r["line"]) for r in rows] == list(enumerate(LINES))


async def test_concurrent_appends_to_one_run_are_serialized(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """Appends racing on the same run get gapless sequence numbers, each batch contiguous."""

    async def writer(w: int) -> None:
        await postgres_store.append_log("r", [f'{{"w":{w},"k":{k}}}' for k in range(5)])

    async with anyio.create_task_group() as tg:
        for w in range(10):
            tg.start_soon(writer, w)
    rows = await log_rows(raw, postgres_store, "r")
    assert [r["seq"] for r in rows] == list(range(50))
    batches = [[r["line"] for r in rows[i : i + 5]] for i in range(0, 50, 5)]
    for batch in batches:
        w = batch[0].split(",")[0]
        assert batch == [f'{w},"k":{k}}}' for k in range(5)]


async def test_run_ids(postgres_store: PostgresStore) -> None:
    """run_ids names every run with checkpoints or a log, once, sorted."""
    for run in TRICKY_RUNS:
        await postgres_store.save(run, "n", STATE)
    await postgres_store.append_log("only-log", LINES)
    assert await postgres_store.run_ids() == sorted([*TRICKY_RUNS, "only-log"])


@pytest.mark.parametrize(
    ("run_id", "problem"),
    [("", "empty"), ("x" * 2000, "bytes long"), (42, "must be a str"), ("a\x00b", "NUL")],
)
async def test_bad_run_ids_are_refused(
    postgres_store: PostgresStore, run_id: Any, problem: str
) -> None:
    """Empty, absurdly long, non-text and NUL-holding run ids raise a StoreError saying why."""
    with pytest.raises(StoreError, match=problem) as info:
        await postgres_store.save(run_id, "n", STATE)
    assert "PostgresStore.save" in str(info.value) and "run id" in str(info.value)


# ---------------------------------------------------------------- what comes back


@pytest.mark.parametrize("ref", ["os:system", "this:Anything", "subprocess:Popen"])
async def test_tampered_schema_ref_is_refused(
    postgres_store: PostgresStore,
    raw: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    ref: str,
) -> None:
    """A schema ref written into the table by someone else is refused; nothing is imported or
    called."""
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.delitem(sys.modules, "this", raising=False)
    await postgres_store.setup()
    await raw.execute(
        f"INSERT INTO {postgres_store.checkpoints_table} (run_id, node_id, schema_ref, state) "
        "VALUES ('r', 'n', $1, '\"echo pwned\"')",
        ref,
    )
    with pytest.raises(UnsafeSchemaRef, match="refusing to load schema"):
        await postgres_store.load("r", "n")
    assert calls == []
    assert "this" not in sys.modules


async def test_corrupt_checkpoint_is_log_corrupted(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """A stored state that does not validate is a LogCorrupted naming the run and the node."""
    await postgres_store.save("r", "n", STATE)
    await raw.execute(f'UPDATE {postgres_store.checkpoints_table} SET state = \'{{"n": "x"}}\'')
    with pytest.raises(LogCorrupted, match=r"'r'.*'n'.*does not validate"):
        await postgres_store.load("r", "n")


# -------------------------------------------------------------------------- errors


async def test_dropped_connection_is_retried(
    postgres_dsn: str, proxy_factory: Any, unique_name: Callable[[str], str]
) -> None:
    """A connection the network drops is retried on a new one, and the operation succeeds."""
    async with proxy_factory(postgres_dsn, 5432, drop=1) as proxy:
        store = PostgresStore(proxy.url(postgres_dsn), table_prefix=unique_name("t"))
        try:
            await store.save("r", "n", STATE)
            assert await store.load("r", "n") == STATE
            assert proxy.connections >= 2
        finally:
            conn = await asyncpg.connect(postgres_dsn)
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {', '.join(store.tables)}")
            finally:
                await conn.close()
            await store.close()


async def test_append_retried_after_a_lost_commit_reply_is_applied_once(
    postgres_store: PostgresStore, raw: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If COMMIT succeeds but its reply is lost, the retry notices and the rows appear once."""
    await postgres_store.setup()
    original = asyncpg.transaction.Transaction.__aexit__
    calls: list[int] = []

    async def commit_then_fail(self: Any, *exc: Any) -> Any:
        result = await original(self, *exc)
        calls.append(1)
        if len(calls) == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("reply lost")
        return result

    monkeypatch.setattr(asyncpg.transaction.Transaction, "__aexit__", commit_then_fail)
    await postgres_store.append_log("r", LINES, ("n", STATE))
    monkeypatch.undo()
    assert len(calls) == 2
    assert [r["line"] for r in await log_rows(raw, postgres_store, "r")] == LINES
    assert await postgres_store.load("r", "n") == STATE


async def test_unreachable_server_is_a_store_error_after_bounded_attempts(
    closed_port: int,
) -> None:
    """Connection refused is retried a bounded number of times, then names op, run and server."""
    dsn = f"postgresql://postgres@127.0.0.1:{closed_port}/test"
    store = PostgresStore(dsn, max_attempts=2)
    with pytest.raises(StoreError) as info:
        await store.save("run-1", "n", STATE)
    message = str(info.value)
    assert "PostgresStore.save" in message and "'run-1'" in message
    assert dsn in message and "after 2 attempts" in message


async def test_permanent_error_is_a_store_error_at_once(
    postgres_dsn: str, unique_name: Callable[[str], str]
) -> None:
    """A database that does not exist is a permanent error: not retried, op and run named."""
    dsn = postgres_dsn.rsplit("/", 1)[0] + "/" + unique_name("no_such_db")
    store = PostgresStore(dsn)
    with pytest.raises(StoreError, match="permanent") as info:
        await store.save("run-1", "n", STATE)
    message = str(info.value)
    assert "PostgresStore.save" in message and "'run-1'" in message
    assert "does not exist" in message


def test_password_is_not_in_error_messages() -> None:
    """The server named in messages has its password masked."""
    store = PostgresStore("postgresql://user:s3cret@localhost:5432/db")
    assert "s3cret" not in repr(store) and "user:***@localhost:5432" in repr(store)


def test_missing_asyncpg_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the postgres extra, constructing the store raises ImportError with the pip
    command."""
    monkeypatch.setattr(postgres_module, "_asyncpg", None)
    with pytest.raises(ImportError, match=r"pip install 'stroma\[postgres\]'"):
        PostgresStore("postgresql://localhost/db")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schema": "a;drop"}, "schema"),
        ({"table_prefix": 'x"y'}, "table_prefix"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any], match: str) -> None:
    """Nonsense settings (including SQL in identifiers) fail at construction, naming the
    setting."""
    with pytest.raises(ValueError, match=match):
        PostgresStore("postgresql://localhost/db", **kwargs)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error(postgres_dsn: str) -> None:
    """Under trio, the store says it needs asyncio instead of failing obscurely."""
    store = PostgresStore(postgres_dsn)
    with pytest.raises(StoreError, match="needs the asyncio backend"):
        await store.save("r", "n", STATE)


# -------------------------------------------------------------------------- leases


async def test_second_holder_gets_run_locked(postgres_store: PostgresStore) -> None:
    """While one worker holds a run, another gets RunLocked naming the run and the holder."""
    async with postgres_store.lease("run-7", "worker-a"):
        with pytest.raises(RunLocked) as info:
            async with postgres_store.lease("run-7", "worker-b"):
                pytest.fail("two holders at once")
    assert info.value.run_id == "run-7" and info.value.holder == "worker-a"


async def test_released_lease_can_be_taken_again(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """Leaving the context deletes the lease row, so another worker can claim the run."""
    async with postgres_store.lease("r", "worker-a"):
        pass
    assert await count_rows(raw, postgres_store, "r") == [0, 0, 0, 0]
    async with postgres_store.lease("r", "worker-b"):
        pass


async def test_lease_is_renewed_while_held(postgres_store: PostgresStore) -> None:
    """A lease held longer than lease_seconds is renewed in the background and stays
    exclusive."""
    async with postgres_store.lease("r", "worker-a"):
        start = anyio.current_time()
        while anyio.current_time() - start < 2 * postgres_store.lease_seconds:
            with pytest.raises(RunLocked):
                async with postgres_store.lease("r", "worker-b"):
                    pass
            await anyio.sleep(0.05)


async def test_body_exception_propagates_and_releases(postgres_store: PostgresStore) -> None:
    """An exception in the body comes out unchanged (no ExceptionGroup) and frees the run."""
    with pytest.raises(KeyError):
        async with postgres_store.lease("r", "worker-a"):
            raise KeyError("boom")
    async with postgres_store.lease("r", "worker-b"):
        pass


async def test_outer_cancellation_is_honoured_and_releases(postgres_store: PostgresStore) -> None:
    """A timeout around the lease cancels the body as usual and the run is free afterwards."""
    with anyio.move_on_after(0.1) as scope:
        async with postgres_store.lease("r", "worker-a"):
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with postgres_store.lease("r", "worker-b"):
        pass


async def test_lost_lease_cancels_the_body(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """If another worker takes the lease, the body is cancelled and RunLocked names the taker."""
    reached_end = False
    with pytest.raises(RunLocked) as info:
        async with postgres_store.lease("r", "worker-a"):
            await raw.execute(
                f"UPDATE {postgres_store.leases_table} SET holder = 'intruder', "
                "expires_at = now() + interval '60 s'"
            )
            with anyio.fail_after(10):
                await anyio.sleep_forever()
            reached_end = True
    assert info.value.holder == "intruder" and not reached_end


@pytest.mark.slow
async def test_dead_holders_lease_expires(
    postgres_dsn: str, postgres_store: PostgresStore, lease_holder: Any
) -> None:
    """A worker process killed with SIGKILL keeps the run until its lease expires, then loses
    it."""
    await postgres_store.setup()
    name = postgres_store.table_prefix
    async with lease_holder("postgres", postgres_dsn, name, "r", "child") as child:
        with pytest.raises(RunLocked) as info:
            async with postgres_store.lease("r", "parent"):
                pass
        assert info.value.holder == "child"
        child.kill()
        await child.wait()
        with anyio.fail_after(15):
            while True:
                try:
                    async with postgres_store.lease("r", "parent"):
                        break
                except RunLocked as exc:
                    assert exc.holder == "child"
                    await anyio.sleep(0.05)


async def test_a_damaged_last_log_row_is_log_corrupted_and_nothing_is_written_after_it(
    postgres_store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """Each append is one transaction, so a damaged last row is no torn tail of a crash:
    reading the log says it is damaged, and a resume refuses before writing (were it
    dropped, the resumed run would append after it and the log could not be read again)."""
    from stroma.runner import RunConfig, interpret
    from tests.stores.chain import N, chain

    nodes = chain()
    await interpret(nodes, N(v=0), store=postgres_store, config=RunConfig(run_id="r"))
    table = postgres_store.log_table
    await raw.execute(
        f"UPDATE {table} SET line = $1 WHERE run_id = 'r' AND seq = "
        f"(SELECT max(seq) FROM {table} WHERE run_id = 'r')", '{"i":5,"effect":{"t":"Comm')
    rows = await raw.fetchval(f"SELECT count(*) FROM {table} WHERE run_id = 'r'")
    with pytest.raises(LogCorrupted, match="not JSON"):
        await postgres_store.read_log("r")
    with pytest.raises(LogCorrupted, match="not JSON"):
        await interpret(nodes, N(v=0), store=postgres_store, config=RunConfig(run_id="r"))
    assert await raw.fetchval(f"SELECT count(*) FROM {table} WHERE run_id = 'r'") == rows
