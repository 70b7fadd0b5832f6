"""The simulated interpreter: real nodes and machinery on a virtual clock, so retry policies
with long backoffs are tested without sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import stroma
from interpreters.simulate import DEFAULT_START, VirtualClock, simulate
from stroma import ExecutionBudget, NodeContract, RunStatus, stroma_node
from stroma.failures import FailureClass, FailurePolicy
from stroma.runner import RunConfig


class Num(BaseModel):
    value: int


def flaky(node_id: str, failures: int, clock: VirtualClock, *, takes: float = 0.0) -> Any:
    """A node that times out ``failures`` times, then adds one; each call takes ``takes``
    virtual seconds."""
    calls = {"n": 0}

    async def node(state: Num) -> dict[str, int]:
        calls["n"] += 1
        await clock.sleep(takes)
        if calls["n"] <= failures:
            raise TimeoutError(f"{node_id} call {calls['n']} timed out")
        return {"value": state.value + 1}

    contract = NodeContract(node_id=node_id, input_schema=Num, output_schema=Num)
    return stroma_node(node_id, contract)(node)


def retrying(retries: int = 3, backoff: float = 30.0, **changes: Any) -> RunConfig:
    policy = FailurePolicy(max_retries=retries, backoff_seconds=backoff)
    return RunConfig(policy_map={FailureClass.RECOVERABLE: policy}, **changes)


@pytest.mark.anyio
async def test_long_backoffs_take_no_real_time() -> None:
    """Three retries with a 30 s backoff finish at once, having slept 0..90 virtual seconds."""
    clock = VirtualClock()
    began = time.perf_counter()
    result = await simulate([flaky("fetch", 3, clock)], Num(value=1), config=retrying(),
                            clock=clock)
    assert time.perf_counter() - began < 5.0
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=2)
    assert [e.attempt for e in result.trace] == [1, 2, 3, 4]
    assert len(clock.sleeps) == 3
    assert all(0.0 <= s <= 30.0 for s in clock.sleeps)
    assert 0.0 <= clock.slept <= 90.0
    assert clock.slept == pytest.approx(sum(clock.sleeps))


@pytest.mark.anyio
async def test_trace_timestamps_advance_by_virtual_time() -> None:
    """Each attempt starts after the previous one's virtual duration plus the backoff slept."""
    clock = VirtualClock()
    result = await simulate([flaky("fetch", 3, clock, takes=2.0)], Num(value=1),
                            config=retrying(), clock=clock)
    events = list(result.trace)
    assert events[0].timestamp_utc == DEFAULT_START
    assert [e.duration_ms for e in events] == [2000] * 4
    for before, after, slept in zip(events[:-1], events[1:], clock.sleeps, strict=True):
        gap = (after.timestamp_utc - before.timestamp_utc).total_seconds()
        assert gap == pytest.approx(2.0 + slept, abs=1e-5)
    assert clock.now() - DEFAULT_START == pytest.approx(
        timedelta(seconds=8.0 + clock.slept), abs=timedelta(microseconds=10)
    )


@pytest.mark.anyio
async def test_simulated_result_replays() -> None:
    """A simulated run's effect log replays to an equal result."""
    clock = VirtualClock()
    nodes = [flaky("fetch", 2, clock, takes=0.5), flaky("store", 0, clock)]
    result = await simulate(nodes, Num(value=1), config=retrying(), clock=clock)
    assert result.status is RunStatus.COMPLETED
    assert await stroma.replay(nodes, result.log) == result


@pytest.mark.anyio
async def test_exhausted_retries_are_partial_within_the_backoff_bound() -> None:
    """A node that never recovers makes 1 + max_retries attempts and sleeps at most 3 x 30 s."""
    clock = VirtualClock()
    result = await simulate([flaky("fetch", 99, clock)], Num(value=1), config=retrying(),
                            clock=clock)
    assert result.status is RunStatus.PARTIAL
    assert len(result.trace) == 4
    assert 0.0 <= clock.slept <= 90.0


@pytest.mark.anyio
async def test_same_seed_gives_the_same_sleeps() -> None:
    """The jitter is seeded (0 by default), so a simulation is reproducible."""
    runs = []
    for _ in range(2):
        clock = VirtualClock()
        await simulate([flaky("fetch", 3, clock)], Num(value=1), config=retrying(), clock=clock)
        runs.append(clock.sleeps)
    assert runs[0] == runs[1]
    seeded = VirtualClock()
    await simulate([flaky("fetch", 3, seeded)], Num(value=1), config=retrying(seed=12345),
                   clock=seeded)
    assert seeded.sleeps != runs[0]


@pytest.mark.anyio
async def test_latency_budget_counts_virtual_durations() -> None:
    """Node durations are virtual, so a latency budget is spent by virtual time alone."""
    clock = VirtualClock()
    nodes = [flaky("slow", 0, clock, takes=10.0), flaky("next", 0, clock)]
    config = RunConfig(budget=ExecutionBudget(max_latency_ms=10_000))
    result = await simulate(nodes, Num(value=1), config=config, clock=clock)
    assert result.status is RunStatus.PARTIAL
    assert [e.node_id for e in result.trace] == ["slow", "next"]
    assert result.trace.events[1].failure is FailureClass.RECOVERABLE
    assert "budget spent" in (result.stop_reason or "")


@pytest.mark.anyio
async def test_start_sets_the_virtual_start() -> None:
    """``start=`` is where virtual time begins: the first attempt is stamped with it."""
    start = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    clock_free = [flaky("fetch", 0, VirtualClock())]
    result = await simulate(clock_free, Num(value=1), start=start)
    assert result.trace.events[0].timestamp_utc == start


@pytest.mark.anyio
async def test_start_and_clock_together_is_an_error() -> None:
    """Giving both a start and a clock is refused with a message saying which to give."""
    with pytest.raises(ValueError, match="give one of them"):
        await simulate([flaky("fetch", 0, VirtualClock())], Num(value=1),
                       start=DEFAULT_START, clock=VirtualClock())


def test_virtual_clock_only_moves_forward() -> None:
    """advance() refuses negative time; now() follows the elapsed virtual seconds."""
    clock = VirtualClock()
    clock.advance(1.5)
    assert clock.time() == 1.5
    assert clock.now() == DEFAULT_START + timedelta(seconds=1.5)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="aware datetime"):
        VirtualClock(datetime(2024, 1, 1))
