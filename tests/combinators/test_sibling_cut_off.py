"""A fan-out child that its group cancels because a sibling failed, and that then raises
an error of its own (an HTTP client's ConnectionError when its call is cut off), is a
cancelled child: the sibling's failure is the group's.

It used to count as a failure of its own, and the first failed child in argument order
fails the group: a child before the one that failed, cut off, put its ConnectionError
(AMBIGUOUS, retried) in place of the real failure (a TERMINAL contract violation): the run
ended PARTIAL after retries instead of FAILED, and which of the two depended on the timing
of the children (a run cut short and resumed could end otherwise than one that was not).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    NodeContract,
    RunConfig,
    RunStatus,
    interpret,
    map_each,
    parallel,
    replay,
    seq,
    stroma_node,
)

pytestmark = pytest.mark.anyio

RETRY = {c: FailurePolicy(max_retries=2, backoff_seconds=0.0) for c in FailureClass}


class Item(BaseModel):
    item: int


class S(BaseModel):
    items: list[int] = [1, 2, 3]
    outs: list[Item] = []
    a: int = 0
    b: int = 0


async def _cut_off(started: anyio.Event) -> None:
    started.set()
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        raise ConnectionError("connection closed") from None


def _map_plan(calls: list[int]) -> Any:
    started = anyio.Event()

    async def fn(s: Item) -> Any:
        calls.append(s.item)
        if s.item == 1:  # blocks; raises when its group cancels it
            await _cut_off(started)
        if s.item == 3:  # breaks its contract (TERMINAL) once item 1 is running
            await started.wait()
            return {"item": "three"}
        return {"item": 10 * s.item}

    node = stroma_node("f", NodeContract(node_id="f", input_schema=Item,
                                         output_schema=Item))(fn)
    return seq(map_each(node, over="items", into="outs", input=S))


def _parallel_plan(calls: list[int]) -> Any:
    started = anyio.Event()

    async def first(s: S) -> dict[str, int]:
        calls.append(1)
        await _cut_off(started)
        return {"a": 1}

    async def second(s: S) -> dict[str, Any]:
        calls.append(2)
        await started.wait()
        return {"b": "two"}  # breaks its contract: TERMINAL

    a = stroma_node("first", NodeContract(node_id="first", input_schema=S,
                                          output_schema=S))(first)
    b = stroma_node("second", NodeContract(node_id="second", input_schema=S,
                                           output_schema=S))(second)
    return seq(parallel(a, b))


@pytest.mark.parametrize("make", [_map_plan, _parallel_plan], ids=["map_each", "parallel"])
async def test_a_child_cut_off_by_a_failed_sibling_is_cancelled_not_failed(
    anyio_backend: str, make: Any
) -> None:
    calls: list[int] = []
    plan = make(calls)
    result = await interpret(plan, S(), config=RunConfig(policy_map=RETRY))
    assert result.status is RunStatus.FAILED
    [event] = list(result.trace)  # one attempt: TERMINAL, not retried
    assert event.failure is FailureClass.TERMINAL
    assert "Contract violation" in (event.failure_message or "")
    assert "ConnectionError" not in (event.failure_message or "")
    calls.clear()
    again = await replay(plan, result.log)
    assert again.trace.diff(result.trace) == [] and calls == []
