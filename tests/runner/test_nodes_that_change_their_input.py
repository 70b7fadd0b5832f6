"""A node that changes its input model in place (``state.n += 1``, ``state.items.append``)
and then fails: its retry was given the changed model, not the state the run had
committed, and a failed run's final state (and the Finish its log records) was the changed
model, which a replay of the log (no node called) does not give: the replay and the live
run differed. The run goes on after a failed attempt with the state as its JSON reads back,
as a resume does."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import RunStatus, interpret, parallel, replay, seq
from stroma.contracts import NodeContract
from stroma.runner import stroma_node


class S(BaseModel):
    n: int = 0
    seen: list[int] = []


def node(node_id: str) -> Any:
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=S, output_schema=S))


@node("first")
async def first(s: S) -> dict[str, Any]:
    return {"n": 1}


def run_twice(plan: Any) -> tuple[Any, Any]:
    async def both() -> tuple[Any, Any]:
        live = await interpret(plan, S())
        assert live.log is not None
        return live, await replay(plan, live.log)

    return anyio.run(both)


def test_a_retry_gets_the_committed_state_not_the_one_the_failed_attempt_changed() -> None:
    given: list[S] = []

    @node("flaky")
    async def flaky(s: S) -> S:
        given.append(s.model_copy(deep=True))
        s.n += 100
        s.seen.append(len(given))
        if len(given) == 1:
            raise ConnectionError("reset")
        return S(n=s.n + 1, seen=s.seen)

    live, again = run_twice(seq(first, flaky))
    assert given == [S(n=1), S(n=1)]  # (the retry was given n=101, seen=[1])
    assert live.status is RunStatus.COMPLETED and live.final_state == S(n=102, seen=[2])
    assert again == live


@pytest.mark.parametrize("returns", ["raises", "returns None"])
def test_a_failed_runs_final_state_is_the_committed_one_and_replays_the_same(
    returns: str,
) -> None:
    @node("broken")
    async def broken(s: S) -> Any:
        s.n += 1000
        if returns == "raises":
            raise ValueError("nope")
        return None  # (a ContractViolation: TERMINAL)

    live, again = run_twice(seq(first, broken))
    assert live.status in (RunStatus.PARTIAL, RunStatus.FAILED)
    assert live.final_state == S(n=1)  # (it was S(n=2001), or S(n=1001))
    assert live.log.finish.final_state == {"n": 1, "seen": []}
    assert again == live


class P(BaseModel):
    n: int = 0
    a: int = 0
    b: int = 0
    seen: list[int] = []


@pytest.mark.anyio
async def test_parallel_children_each_get_the_groups_input_not_what_a_sibling_changed(
    anyio_backend: str,
) -> None:
    """``left`` changes its input in place; ``right`` (run while it does) and the merge
    still see the group's input, as a resume or a replay of the run would: children do not
    share one model."""
    changed = anyio.Event()

    def p_node(node_id: str) -> Any:
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=P,
                                                 output_schema=P))

    @p_node("left")
    async def left(s: P) -> dict[str, int]:
        s.n += 100
        s.seen.append(1)
        changed.set()
        return {"a": 1}

    @p_node("right")
    async def right(s: P) -> dict[str, Any]:
        await changed.wait()
        return {"b": s.n + 1, "seen": [*s.seen, 2]}

    plan = [parallel(left, right)]
    live = await interpret(plan, P())
    assert live.status is RunStatus.COMPLETED
    assert live.final_state.model_dump() == P(n=0, a=1, b=1, seen=[2]).model_dump()
    assert live.log is not None
    again = await replay(plan, live.log)
    assert again.final_state.model_dump() == live.final_state.model_dump()
