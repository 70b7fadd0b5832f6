"""Nodes that block the event loop past their timeout (issue 10, item 11).

Python cannot pre-empt a node that blocks (``time.sleep``, a CPU loop), so its timeout
cannot cancel it; the deadline is checked when it returns. Such a return is not a
success: the attempt is a TimeoutError (RECOVERABLE) whose message says it returned
after N ms, past its timeout, its output is discarded, and the usual retry follows. The
nodes here block for 120 ms under a 30 ms timeout, to keep the suite fast.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    NodeContract,
    RunStatus,
    map_each,
    replay,
    seq,
    stroma_node,
)
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These runs use the memory store: asyncio and trio both."""
    return str(request.param)

BLOCK_S = 0.12
TIMEOUT_MS = 30
LATE = re.compile(r"node 'slow' returned after (\d+) ms, past its timeout of 30 ms")


class Num(BaseModel):
    value: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


def block(how: str) -> None:
    """Hold the thread (and so the event loop) for BLOCK_S."""
    if how == "sleep":
        time.sleep(BLOCK_S)
        return
    end = time.perf_counter() + BLOCK_S
    while time.perf_counter() < end:  # a CPU loop: no await, nothing to cancel
        pass


def slow_node(calls: Counter[str], how: str, blocking_calls: int) -> Any:
    """'slow' blocks on its first ``blocking_calls`` calls, then returns at once; each
    call's output says which call it was."""

    async def slow(s: Num) -> dict[str, int]:
        calls["slow"] += 1
        if calls["slow"] <= blocking_calls:
            block(how)
        return {"value": s.value + 100 * calls["slow"]}

    return stroma_node("slow", NodeContract(node_id="slow", input_schema=Num,
                                            output_schema=Num))(slow)


def late_by(message: str | None) -> int:
    match = LATE.search(message or "")
    assert match is not None, message
    return int(match.group(1))


@pytest.mark.parametrize("how", ["sleep", "cpu"])
@pytest.mark.parametrize("where", ["node_timeouts", "with_timeout"])
async def test_a_node_that_blocks_past_its_timeout_is_a_timeout_attempt(
    anyio_backend: str, how: str, where: str
) -> None:
    """A node that blocks 120 ms under a 30 ms timeout and then returns is a RECOVERABLE
    TimeoutError attempt saying it returned N ms after, past its timeout; its output is
    discarded and the retry's output is the one kept."""
    calls: Counter[str] = Counter()
    plan = seq(slow_node(calls, how, blocking_calls=1))
    policies = {FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0)}
    if where == "with_timeout":
        plan = plan.with_timeout("slow", TIMEOUT_MS)
        config = RunConfig(policy_map=policies)
    else:
        config = RunConfig(policy_map=policies, node_timeouts={"slow": TIMEOUT_MS})

    result = await interpret(plan, Num(value=1), config=config)

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=201)  # the second call's output, not the first's
    first, second = result.trace
    assert (first.attempt, first.failure, first.output_state) == (
        1, FailureClass.RECOVERABLE, None)
    assert late_by(first.failure_message) > TIMEOUT_MS
    assert first.duration_ms > TIMEOUT_MS
    assert (second.attempt, second.failure) == (2, None)
    assert await replay(plan, result.log) == result


async def test_a_blocking_node_out_of_retries_ends_the_run_partial(anyio_backend: str) -> None:
    """With no retries left, a node that always blocks past its timeout ends the run
    PARTIAL (never COMPLETED), the reason naming the TimeoutError."""
    calls: Counter[str] = Counter()
    plan = seq(slow_node(calls, "sleep", blocking_calls=10))
    config = RunConfig(
        node_timeouts={"slow": TIMEOUT_MS},
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=0, backoff_seconds=0)},
    )

    result = await interpret(plan, Num(value=1), config=config)

    assert result.status is RunStatus.PARTIAL and result.final_state == Num(value=1)
    assert calls == {"slow": 1}
    assert "TimeoutError" in (result.stop_reason or "")
    assert late_by(result.stop_reason) > TIMEOUT_MS


async def test_a_fan_out_child_that_blocks_past_its_timeout_fails_the_group(
    anyio_backend: str,
) -> None:
    """A map item that blocks past its timeout fails the group's attempt with the same
    TimeoutError (RECOVERABLE); the group's retry runs only the items not done, and the
    run replays."""
    calls: Counter[int] = Counter()

    async def slow(i: Item) -> dict[str, int]:
        calls[i.item] += 1
        if i.item == 2 and calls[i.item] == 1:
            block("sleep")
        return {"item": i.item * 10}

    node = stroma_node("slow", NodeContract(node_id="slow", input_schema=Item,
                                            output_schema=Item))(slow)
    plan = seq(map_each(node, over="items", into="outs", input=Items, max_concurrency=1))
    config = RunConfig(
        node_timeouts={"slow": TIMEOUT_MS},
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0)},
    )

    result = await interpret(plan, Items(items=[1, 2, 3]), config=config)

    assert result.status is RunStatus.COMPLETED
    assert [o["item"] for o in result.final_state.model_dump()["outs"]] == [10, 20, 30]
    first, second = result.trace
    assert first.failure is FailureClass.RECOVERABLE and second.failure is None
    assert late_by(first.failure_message) > TIMEOUT_MS
    assert calls[1] == 1 and calls[2] == 2  # item 1 succeeded first: not called again
    assert await replay(plan, result.log) == result
