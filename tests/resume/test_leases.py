"""Leases through ``interpret``: one worker per run id on RedisStore, PostgresStore and
FileStore."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from stroma import RunLocked
from stroma.runner import interpret
from stroma.trace import ExecutionResult, RunStatus
from tests.resume.pipeline import Num, Pipeline, config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio and asyncpg only run on asyncio."""
    return "asyncio"


@pytest.fixture(params=["redis", "postgres", "file"])
def make_store(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """New store instances (one per worker) on one Redis key prefix, PostgreSQL tables or
    FileStore folder."""
    return request.getfixturevalue(f"{request.param}_stores")


async def test_a_second_worker_gets_run_locked_and_a_third_gets_the_finished_result(
    make_store: Callable[[], Any],
) -> None:
    """While one interpret call holds a run, a second on the same id raises RunLocked naming
    the run and the holder, running nothing; once the first finishes, a third call returns
    the finished result without running anything."""
    run_id = f"leased-{os.getpid()}"
    entered, gate = anyio.Event(), anyio.Event()
    first = Pipeline(gate=gate, entered=entered, gate_at="e")
    results: list[ExecutionResult] = []

    async def hold() -> None:
        results.append(await interpret(first.nodes(), Num(value=1), store=make_store(),
                                       config=config(run_id)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        with anyio.fail_after(30):
            await entered.wait()
        second = Pipeline()
        with pytest.raises(RunLocked) as caught:
            await interpret(second.nodes(), Num(value=1), store=make_store(),
                            config=config(run_id))
        assert not second.called
        assert caught.value.run_id == run_id
        holder = caught.value.holder
        assert f":{os.getpid()}:" in holder  # host:pid:token of the first worker
        assert run_id in str(caught.value) and holder in str(caught.value)
        gate.set()

    (done,) = results
    assert done.status is RunStatus.COMPLETED and done.final_state == Num(value=23)
    third = Pipeline()
    again = await interpret(third.nodes(), Num(value=1), store=make_store(),
                            config=config(run_id))
    assert not third.called
    assert again.status is RunStatus.COMPLETED and again.final_state == done.final_state
    assert again.trace.diff(done.trace) == []


@pytest.mark.parametrize(
    ("gate_at", "finished"),
    [("e", {"a", "flaky", "left", "right", "total"}), ("right", {"a", "flaky", "left"})],
)
async def test_a_cancelled_worker_releases_the_run_and_another_resumes_it(
    make_store: Callable[[], Any], gate_at: str, finished: set[str]
) -> None:
    """A worker cancelled mid-run (inside a node, or inside a fan-out after one child
    finished) lets another worker resume the run from the store's log: RESUMED, the same
    final state, finished nodes and children not called again."""
    run_id = f"handover-{gate_at}-{os.getpid()}"
    store = make_store()
    entered, gate = anyio.Event(), anyio.Event()  # the gate is never opened
    first = Pipeline(gate=gate, entered=entered, gate_at=gate_at)

    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(first.nodes(), Num(value=1), store=store, config=config(run_id))
            raise AssertionError("the gated run finished")

        tg.start_soon(run)
        with anyio.fail_after(30):
            await entered.wait()
            if gate_at == "right":  # wait until left's outcome is durable
                while True:
                    log = await make_store().read_log(run_id)
                    if log is not None and any(getattr(call, "node_id", "") == "left"
                                               for _, _, call, _ in log.partials):
                        break
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()

    second = Pipeline(flaky_failed=True)
    result = await interpret(second.nodes(), Num(value=1), store=make_store(),
                             config=config(run_id))
    assert result.status is RunStatus.RESUMED and result.final_state == Num(value=23)
    assert not second.called & finished
    assert second.calls[gate_at] == 1


async def test_runs_tells_a_run_in_progress_from_one_whose_worker_is_gone(
    make_store: Callable[[], Any],
) -> None:
    """While a worker runs a run, the store's ``lease_holder`` names it and ``runs``
    (``run_summaries`` / ``format_runs``) shows the run unfinished and where it runs; once
    that worker is gone (cancelled mid-run, as a crash stops it) the run is unfinished
    with nobody running it, which is what a run to resume looks like."""
    from stroma.cli import format_runs, run_summaries

    run_id = f"shown-{os.getpid()}"
    entered, gate = anyio.Event(), anyio.Event()  # the gate is never opened
    first = Pipeline(gate=gate, entered=entered, gate_at="e")
    store = make_store()
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(first.nodes(), Num(value=1), store=store, config=config(run_id))

        tg.start_soon(run)
        with anyio.fail_after(30):
            await entered.wait()
        holder = await make_store().lease_holder(run_id)
        assert holder is not None and f":{os.getpid()}:" in holder
        (line,) = [s for s in await run_summaries(make_store()) if s.run_id == run_id]
        assert line.status == "running/crashed" and line.held_by == holder
        table = format_runs([line])
        assert "running in" in table.splitlines()[0] and holder in table
        assert line.to_json()["held_by"] == holder
        tg.cancel_scope.cancel()

    assert await make_store().lease_holder(run_id) is None
    (line,) = [s for s in await run_summaries(make_store()) if s.run_id == run_id]
    assert line.status == "running/crashed" and line.held_by is None
    assert "running in" not in format_runs([line])
