"""A plan that begins with ``await_input`` (``seq(await_input(...), step)``) is checked where
it is placed: after a step, against that step's output; at the start of a run, against
the initial state."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    InMemoryStore,
    PlanError,
    RunConfig,
    StromaRunner,
    await_input,
    interpret,
    route,
    send_input,
    seq,
)
from stroma.trace import RunStatus


class Approval(BaseModel):
    ok: bool


class Task(BaseModel):
    next: str = "ship"
    approval: Approval | None = None


class Counted(BaseModel):
    n: int = 0
    approval: Approval | None = None


class NoField(BaseModel):
    next: str = "ship"


runner = StromaRunner.quick()


@runner.node("pick", input=Task, output=Task)
async def pick(t: Task) -> Task:
    return t


@runner.node("ship", input=Task, output=Task)
async def ship(t: Task) -> Task:
    return t.model_copy(update={"next": "shipped"})


@runner.node("bare", input=NoField, output=NoField)
async def bare(t: NoField) -> NoField:
    return t


def test_a_plan_beginning_with_a_wait_is_checked_against_the_step_before_it() -> None:
    """Placed after a step whose output has no field for the input, the wait's plan is
    refused naming the field and the fix."""
    with pytest.raises(PlanError, match=r"no field 'approval'.*approval: Approval \| None"):
        seq(bare, route(lambda s: s.next, {"ship": seq(await_input("approval", Approval),
                                                       bare)}))


@pytest.mark.anyio
async def test_a_route_to_a_wait_ends_waiting_and_goes_on_with_the_input() -> None:
    """A route whose arm begins with a wait stops the run WAITING; once the input is sent
    the run goes on to the arm's next step with the input in the state."""
    plan = seq(pick, route(lambda s: s.next, {"ship": seq(await_input("approval", Approval),
                                                         ship)}))
    store, config = InMemoryStore(), RunConfig(run_id="placed")
    first = await interpret(plan, Task(), store=store, config=config)
    assert first.status is RunStatus.WAITING
    await send_input(store, "placed", "approval", {"ok": True})
    done: Any = await interpret(plan, Task(), store=store, config=config)
    assert done.status is RunStatus.RESUMED
    assert done.final_state == Task(next="shipped", approval=Approval(ok=True))


@pytest.mark.anyio
async def test_a_run_beginning_with_a_wait_checks_its_initial_state() -> None:
    """A whole plan that begins with a wait takes its state from the run: an initial
    state with the field waits; one without it fails TERMINAL naming the fix."""
    plan = seq(await_input("approval", Approval), ship)
    waiting = await interpret(plan, Task())
    assert waiting.status is RunStatus.WAITING
    answered: Any = await interpret(plan, Task(), inputs={"approval": {"ok": False}})
    assert answered.final_state.approval == Approval(ok=False)
    wrong = await interpret(seq(await_input("approval", Approval), bare), NoField())
    assert wrong.status is RunStatus.FAILED
    assert "approval: Approval | None = None" in (wrong.stop_reason or "")


@pytest.mark.anyio
async def test_an_input_given_to_interpret_answers_one_wait_of_a_loop() -> None:
    """``inputs={name: payload}`` answers the first wait of that name; the next
    iteration's wait asks again (the run ends WAITING there), instead of one approval
    approving every later request."""
    from stroma import loop

    @runner.node("count", input=Counted, output=Counted)
    async def count(c: Counted) -> Counted:
        return c.model_copy(update={"n": c.n + 1, "approval": None})

    plan = loop(seq(await_input("approval", Approval, input=Counted), count),
                until=lambda c: c.n >= 3, max_iterations=5, name="asks")
    result: Any = await interpret(plan, Counted(), inputs={"approval": {"ok": True}})
    assert result.status is RunStatus.WAITING
    assert result.final_state.n == 1
    assert "approval@asks#2" in (result.stop_reason or "")


@pytest.mark.anyio
async def test_an_input_that_is_not_json_text_is_refused_by_the_wait_not_raised() -> None:
    """A str given to interpret that is not JSON is checked as the value itself: it does
    not fit the schema, so the run waits on and no raw JSON error escapes."""
    plan = seq(pick, route(lambda s: s.next, {"ship": seq(await_input("approval", Approval),
                                                         ship)}))
    result = await interpret(plan, Task(), inputs={"approval": "yes please"})
    assert result.status is RunStatus.WAITING
    assert "does not fit Approval" in (result.stop_reason or "")


@pytest.mark.anyio
@pytest.mark.parametrize("given", ["approval", "approval@asks#1"])
async def test_an_input_given_to_interpret_answers_its_wait_again_when_a_group_retries(
    anyio_backend: str, given: str
) -> None:
    """parallel(flaky, loop(await_input(...))): on the group's first attempt the loop's
    wait is answered and the loop runs out of iterations, but flaky failed first, so the
    group runs again and the loop child from its start. The input given to interpret (by
    its name or its key) answers that same wait again, as one sent to the store does: the
    run ends PARTIAL (the loop ran out), not WAITING for an input it was given."""
    from stroma import FailureClass, FailurePolicy, InMemoryStore, loop, parallel, send_input

    calls: list[str] = []

    @runner.node("flaky", input=Counted, output=Counted)
    async def flaky(c: Counted) -> dict[str, int]:
        calls.append("flaky")
        if len(calls) == 1:
            raise TimeoutError("flaky: once")
        return {"n": 1}

    asks = loop(await_input("approval", Approval, input=Counted), until=lambda c: False,
                max_iterations=1, name="asks")
    plan = seq(parallel(flaky, asks))
    config = RunConfig(run_id="retried", policy_map={
        FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0)})
    direct = await interpret(plan, Counted(), config=config, inputs={given: {"ok": True}})
    assert direct.status is RunStatus.PARTIAL, direct.stop_reason
    assert "ran out of iterations" in (direct.stop_reason or "")

    calls.clear()
    store = InMemoryStore()
    assert (await interpret(plan, Counted(), store=store, config=config)).status is (
        RunStatus.WAITING)
    await send_input(store, "retried", "approval@asks#1", {"ok": True})
    sent = await interpret(plan, Counted(), store=store, config=config)
    assert (sent.status, sent.stop_reason) == (RunStatus.PARTIAL, direct.stop_reason)


def test_a_group_of_untyped_waits_is_refused_naming_them_and_the_fix() -> None:
    """parallel(await_input(...), await_input(...)) at the start of a plan has no state type
    to check the waits against: the PlanError names both children and says what to do."""
    from pydantic import BaseModel

    from stroma import PlanError, await_input, parallel, seq

    class Yes(BaseModel):
        ok: bool

    with pytest.raises(PlanError) as info:
        seq(parallel(await_input("a", Yes), await_input("b", Yes)))
    message = str(info.value)
    assert "await_input(a)" in message and "await_input(b)" in message
    assert "do not" in message and "input=MyState" in message
