"""A run that stops before its Finish keeps what it performed, and is in its store from
its start: FileStore, Redis and PostgreSQL (the in-memory store holds the log itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stroma import FailureClass, FailurePolicy, NodeHooks
from stroma.runner import RunConfig, interpret
from tests.faults.kit import Acc, pipeline
from tests.services import drop_postgres_tables, drop_redis_prefix, unique

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    kind = str(request.param)
    if kind == "file":
        from stroma import FileStore

        yield FileStore(tmp_path)
    elif kind == "redis":
        from interpreters.stores.redis import RedisStore

        url = request.getfixturevalue("redis_url")
        made: Any = RedisStore(url, key_prefix=unique("stroma-keep"))
        try:
            yield made
        finally:
            await made.close()
            await drop_redis_prefix(url, made.key_prefix)
    else:
        from interpreters.stores.postgres import PostgresStore

        dsn = request.getfixturevalue("postgres_dsn")
        made = PostgresStore(dsn, table_prefix=unique("keep"))
        try:
            yield made
        finally:
            await made.close()
            await drop_postgres_tables(dsn, made.tables)


async def _read(store: Any, run_id: str) -> Any:
    log = store.read_log(run_id)
    return await log if hasattr(log, "__await__") else log


async def test_a_failure_hook_fires_once_when_the_run_is_cancelled_in_its_backoff(
    store: Any,
) -> None:
    """The failure hook fired, then the run was cancelled in the backoff before the retry:
    the run that goes on sleeps again and retries, but does not fire that hook again."""
    fired: list[tuple[str, str]] = []
    calls: list[str] = []
    cancel = anyio.Event()

    async def on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        fired.append(("start", node_id))

    async def on_failure(run_id: str, node_id: str, exc: Exception, fc: Any) -> None:
        fired.append(("failure", node_id))
        cancel.set()

    async def flaky(i: int) -> None:
        if calls.count("n00") == 1:
            raise ConnectionError("the API dropped the connection")

    config = dict(
        run_id=unique("keep"),
        hooks=NodeHooks(on_node_start=on_start, on_node_failure=on_failure),
        policy_map={FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=1)},
        seed=1,  # (its jitter makes the backoff 0.57 s: the cancel at 50 ms lands in it)
    )
    async with anyio.create_task_group() as tg:
        async def cancel_at_backoff() -> None:
            await cancel.wait()
            await anyio.sleep(0.05)  # (the failure recorded, the hook's too: the backoff)
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_at_backoff)
        await interpret(pipeline(1, calls, flaky), Acc(value=0), store=store,
                        config=RunConfig(**config))
    assert fired == [("start", "n00"), ("failure", "n00")]
    with anyio.fail_after(60):  # (the run that goes on sleeps its backoff: about 1 s)
        result = await interpret(pipeline(1, calls, flaky), Acc(value=0), store=store,
                                 config=RunConfig(**config))
    assert result.final_state == Acc(value=1)
    assert fired == [("start", "n00"), ("failure", "n00"), ("start", "n00")]
    assert calls == ["n00", "n00"]
    log = await _read(store, config["run_id"])
    slept = [e.seconds for e, _ in log.records if type(e).__name__ == "Sleep"]
    assert len(slept) == 1 and slept[0] > 0.2  # (the backoff the cancel came in)


async def test_a_run_is_in_its_store_before_its_first_commit(store: Any) -> None:
    """While its first node runs, the run's log is in the store (``runs`` lists it as
    running; a crash there leaves a run that goes on from its start)."""
    run_id = unique("early")
    entered, release = anyio.Event(), anyio.Event()
    seen: list[Any] = []

    async def during(i: int) -> None:
        entered.set()
        await release.wait()

    async with anyio.create_task_group() as tg:
        async def look() -> None:
            await entered.wait()
            seen.append(await _read(store, run_id))
            release.set()

        tg.start_soon(look)
        result = await interpret(pipeline(2, None, during), Acc(value=0), store=store,
                                 config=RunConfig(run_id=run_id))
    assert result.final_state == Acc(value=2)
    early = seen[0]
    assert early is not None, "the run was not in its store while its first node ran"
    assert early.header.run_id == run_id and early.finish is None
