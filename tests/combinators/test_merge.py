"""Children of a group merge what they returned, never their schemas' defaults."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from stroma import RunStatus, StromaRunner, parallel, seq
from stroma.runner import interpret


class In(BaseModel):
    x: int = 1


class Out(BaseModel):
    result: int = 0
    other: int = 0


def _runner_and_nodes() -> tuple[StromaRunner, object, object]:
    runner = StromaRunner.quick()

    @runner.node("a", input=In, output=Out)
    async def a(s: In) -> dict[str, int]:
        return {"result": 10}

    @runner.node("b", input=In, output=Out)
    async def b(s: In) -> dict[str, int]:
        return {"other": 6}

    return runner, a, b


@pytest.mark.anyio
async def test_a_later_childs_default_does_not_overwrite_an_earlier_childs_value() -> None:
    """parallel(a, b): b's schema default for 'result' leaves a's returned 10 in place."""
    runner, a, b = _runner_and_nodes()
    result = await runner.run([parallel(a, b)], In())
    assert result.status is RunStatus.COMPLETED
    assert (result.final_state.result, result.final_state.other) == (10, 6)  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_child_that_is_a_plan_merges_what_its_last_node_returned() -> None:
    """A sub-plan child merges the fields its steps set, not the defaults of its output."""
    runner, a, b = _runner_and_nodes()

    @runner.node("c", input=Out, output=Out)
    async def c(s: Out) -> dict[str, int]:
        return {"result": s.result + 1}

    result = await interpret(seq(parallel(b, seq(a, c))), In())
    assert result.status is RunStatus.COMPLETED
    assert (result.final_state.result, result.final_state.other) == (11, 6)  # type: ignore[attr-defined]
    reverse = await interpret(seq(parallel(seq(a, c), b)), In())
    assert (reverse.final_state.result, reverse.final_state.other) == (11, 6)  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_key_both_children_returned_goes_to_the_later_child() -> None:
    """When both children return a key, the later child in argument order wins it."""
    runner = StromaRunner.quick()

    @runner.node("first", input=In, output=Out)
    async def first(s: In) -> dict[str, int]:
        return {"result": 1, "other": 1}

    @runner.node("second", input=In, output=Out)
    async def second(s: In) -> dict[str, int]:
        return {"result": 2}

    result = await runner.run([parallel(first, second)], In())
    assert (result.final_state.result, result.final_state.other) == (2, 1)  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("store", [None, "memory"])
async def test_a_child_returning_a_model_merges_the_same_live_and_replayed(
    anyio_backend: str, store: str | None
) -> None:
    """parallel(a, m) where m returns a model (Out(other=6): 'result' left at its default)
    merges a's 10 and m's 6 live, and its replay (from the log and from its text) merges
    the same: the log keeps what the child set, not the model's defaults."""
    from stroma import InMemoryStore, RunConfig, replay

    runner, a, _ = _runner_and_nodes()

    @runner.node("m", input=In, output=Out)
    async def m(s: In) -> Out:
        return Out(other=6)

    plan = seq(parallel(a, m))
    kept = InMemoryStore() if store else None
    result = await interpret(plan, In(), store=kept, config=RunConfig(run_id="model-child"))
    assert (result.final_state.result, result.final_state.other) == (10, 6)  # type: ignore[attr-defined]
    assert result.log is not None
    for log in (result.log, result.log.to_jsonl()):
        again = await replay(plan, log)
        assert again == result and again.final_state == result.final_state


class Approval(BaseModel):
    ok: bool


class Asked(BaseModel):
    v: int = 0
    a: Approval | None = None
    b: Approval | None = None


@pytest.mark.anyio
async def test_two_waits_in_a_group_answered_by_send_input_keep_both_answers(
    anyio_backend: str,
) -> None:
    """parallel(await_input('a'), await_input('b')) after a node: the run waits for both;
    sent both with send_input and run again, it ends with both answers, as the same plan
    given both inputs up front does."""
    from stroma import (
        InMemoryStore,
        NodeContract,
        RunConfig,
        await_input,
        send_input,
        stroma_node,
    )
    from stroma.inputs import pending_wait

    async def start(s: Asked) -> dict[str, int]:
        return {"v": 1}

    first = stroma_node("first", NodeContract(node_id="first", input_schema=Asked,
                                              output_schema=Asked))(start)
    plan = seq(first, parallel(await_input("a", Approval), await_input("b", Approval)))
    up_front = await interpret(plan, Asked(), inputs={"a": {"ok": True}, "b": {"ok": False}})
    both = {"v": 1, "a": {"ok": True}, "b": {"ok": False}}
    assert up_front.final_state.model_dump() == both

    store, config = InMemoryStore(), RunConfig(run_id="two-waits")
    waiting = await interpret(plan, Asked(), store=store, config=config)
    assert waiting.status is RunStatus.WAITING and waiting.log is not None
    assert sorted(w.key for w in pending_wait(waiting.log)) == ["a", "b"]
    await send_input(store, "two-waits", "a", {"ok": True})
    await send_input(store, "two-waits", "b", {"ok": False})
    done = await interpret(plan, Asked(), store=store, config=config)
    assert done.status is RunStatus.RESUMED
    assert done.final_state.model_dump() == both
