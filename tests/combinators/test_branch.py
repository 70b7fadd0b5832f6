"""branch: the predicate picks the arm, the choice is logged, and replay reads it back.

A replay never calls the predicate: it follows the recorded answer. So a predicate whose
logic changed after the run is not detected by replay (the plan's fingerprint excludes
function bodies, predicates included); only a change of the plan's structure is.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import stroma
from stroma import AsyncInMemoryStore, FailureClass, RunStatus
from stroma import effects as fx
from stroma.plan import branch, parallel, seq
from stroma.runner import RunConfig, interpret
from tests.combinators.kit import Called, Num, Script, field_model


class Pred:
    """A predicate that counts its calls and raises once ``armed``."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0
        self.armed = False
        self.__name__ = "pred"

    def __call__(self, state: Any) -> Any:
        if self.armed:
            raise Called("the predicate was called during replay")
        self.calls += 1
        return self.fn(state)


def build(script: Script, pred: Any) -> Any:
    async def inc(s: Num) -> dict[str, int]:
        return {"value": s.value + 1}

    async def big(s: Num) -> dict[str, int]:
        return {"value": s.value * 100}

    async def small(s: Num) -> dict[str, int]:
        return {"value": -s.value}

    return seq(
        script.node("inc", Num, Num, inc),
        branch(pred, then=script.node("big", Num, Num, big),
               otherwise=script.node("small", Num, Num, small), name="big?"),
    )


@pytest.mark.anyio
@pytest.mark.parametrize(("start", "arm", "final"), [(5, "big", 600), (0, "small", -1)])
async def test_the_predicate_picks_the_arm(anyio_backend: str, start: int, arm: str,
                                           final: int) -> None:
    """The predicate sees the current state; only the chosen arm's nodes run."""
    script = Script()
    pred = Pred(lambda s: s.value > 3)
    result = await interpret(build(script, pred), Num(value=start))
    assert result.status is RunStatus.COMPLETED and result.final_state == Num(value=final)
    assert dict(script.calls) == {"inc": 1, arm: 1}
    assert [e.node_id for e in result.trace] == ["inc", arm]
    assert pred.calls == 1


@pytest.mark.anyio
async def test_the_choice_is_in_the_log(anyio_backend: str) -> None:
    """A branch is one ChooseBranch record answered by BranchChosen(taken=...)."""
    script = Script()
    result = await interpret(build(script, Pred(lambda s: s.value > 3)), Num(value=0),
                             config=RunConfig(run_id="b"), store=AsyncInMemoryStore())
    chosen = [(e, v) for e, v in result.log.records if isinstance(e, fx.ChooseBranch)]
    assert chosen == [(fx.ChooseBranch("big?"), fx.BranchChosen(False))]
    lines = [json.loads(line) for line in result.log.to_jsonl().splitlines()]
    [line] = [x for x in lines if x.get("effect", {}).get("t") == "ChooseBranch"]
    assert line["event"] == {"t": "BranchChosen", "taken": False, "error": None}


@pytest.mark.anyio
async def test_replay_follows_the_record_without_calling_the_predicate(
    anyio_backend: str,
) -> None:
    """Replay (from the log object and from its text) reaches the same result while the
    predicate and every node raise if called."""
    script = Script()
    pred = Pred(lambda s: s.value > 3)
    plan = build(script, pred)
    result = await interpret(plan, Num(value=7))
    pred.armed = script.replaying = True
    assert await stroma.replay(plan, result.log) == result
    again = await stroma.replay(plan, result.log.to_jsonl())
    assert again == result and again.trace.diff(result.trace) == []


@pytest.mark.anyio
async def test_a_changed_predicate_is_not_detected_by_replay(anyio_backend: str) -> None:
    """Replay with a predicate that would now choose the other arm still takes the recorded
    one: predicates are code, and code is not part of the plan's fingerprint."""
    result = await interpret(build(Script(), Pred(lambda s: s.value > 3)), Num(value=7))
    flipped = build(Script(), Pred(lambda s: s.value <= 3))
    assert flipped.fingerprint == build(Script(), Pred(bool)).fingerprint
    replayed = await stroma.replay(flipped, result.log)
    assert replayed == result and [e.node_id for e in replayed.trace] == ["inc", "big"]


@pytest.mark.anyio
async def test_a_raising_predicate_fails_the_run(anyio_backend: str) -> None:
    """A predicate that raises ends the run FAILED, naming the branch and the error, with a
    TERMINAL trace event for the branch; no arm runs and replay gives the same."""
    script = Script()

    def broken(state: Any) -> bool:
        raise LookupError("no such key 'score'")

    plan = build(script, broken)
    result = await interpret(plan, Num(value=1))
    assert result.status is RunStatus.FAILED
    assert result.stop_reason == (
        "the predicate of 'big?' raised: LookupError: no such key 'score'"
    )
    assert result.final_state == Num(value=2)  # the last valid state
    last = result.trace.events[-1]
    assert last.node_id == "big?" and last.failure is FailureClass.TERMINAL
    assert dict(script.calls) == {"inc": 1}
    script.replaying = True
    assert await stroma.replay(plan, result.log) == result


def test_an_async_predicate_is_refused_when_built() -> None:
    """``branch`` refuses an ``async def`` predicate: predicates are plain functions."""

    async def coro_pred(state: Any) -> bool:
        return True

    with pytest.raises(stroma.PlanError, match=r"predicate is async.*'def'"):
        branch(coro_pred, then=[])


@pytest.mark.anyio
async def test_a_predicate_returning_an_awaitable_fails_with_advice(anyio_backend: str) -> None:
    """A plain function that returns an awaitable fails the run FAILED, saying predicates
    are plain functions (and the awaitable is closed, not left to warn)."""

    async def later(state: Any) -> bool:
        return True

    result = await interpret(build(Script(), lambda s: later(s)), Num(value=1))
    assert result.status is RunStatus.FAILED
    assert "returned an awaitable" in (result.stop_reason or "")


@pytest.mark.anyio
async def test_a_branch_without_otherwise_passes_the_state_on(anyio_backend: str) -> None:
    """When the predicate says no and there is no ``otherwise``, the state goes on as is."""
    script = Script()

    async def inc(s: Num) -> dict[str, int]:
        return {"value": s.value + 1}

    async def dbl(s: Num) -> dict[str, int]:
        return {"value": s.value * 2}

    plan = seq(
        branch(lambda s: s.value > 10, then=script.node("dbl", Num, Num, dbl), name="gate"),
        script.node("inc", Num, Num, inc),
    )
    low = await interpret(plan, Num(value=1))
    high = await interpret(plan, Num(value=11))
    assert low.final_state == Num(value=2) and high.final_state == Num(value=23)


@pytest.mark.anyio
async def test_branches_nest(anyio_backend: str) -> None:
    """A branch inside an arm of another branch, and a multi-step arm, run inline."""
    script = Script()

    async def add(s: Num) -> dict[str, int]:
        return {"value": s.value + 1}

    def n(node_id: str) -> Any:
        return script.node(node_id, Num, Num, add)

    plan = seq(
        branch(lambda s: s.value > 0,
               then=[n("p1"), branch(lambda s: s.value > 5, then=n("big"),
                                     otherwise=[n("s1"), n("s2")], name="inner")],
               otherwise=n("neg"), name="outer"),
        n("end"),
    )
    result = await interpret(plan, Num(value=1))
    assert [e.node_id for e in result.trace] == ["p1", "s1", "s2", "end"]
    assert result.final_state == Num(value=5)
    result = await interpret(plan, Num(value=9))
    assert [e.node_id for e in result.trace] == ["p1", "big", "end"]
    script.replaying = True
    assert await stroma.replay(plan, result.log) == result


@pytest.mark.anyio
async def test_a_branch_inside_a_parallel_child(anyio_backend: str) -> None:
    """A parallel child may be a sub-plan with a branch; its choice replays too."""
    script = Script()
    pred = Pred(lambda s: s.value % 2 == 0)

    async def even(s: Num) -> dict[str, str]:
        return {"parity": "even"}

    async def odd(s: Num) -> dict[str, str]:
        return {"parity": "odd"}

    async def sign(s: Num) -> dict[str, str]:
        return {"sign": "+" if s.value >= 0 else "-"}

    parity = field_model("parity", str)

    async def noop(s: Num) -> Num:
        return s

    plan = seq(parallel(
        seq(script.node("start", Num, Num, noop),
            branch(pred, then=script.node("even", Num, parity, even),
                   otherwise=script.node("odd", Num, parity, odd), name="even?")),
        script.node("sign", Num, field_model("sign", str), sign),
    ))
    result = await interpret(plan, Num(value=4))
    assert result.final_state.model_dump() == {"parity": "even", "sign": "+"}
    pred.armed = script.replaying = True
    replayed = await stroma.replay(plan, result.log.to_jsonl())
    assert replayed == result
