"""Structured concurrency of fan-outs: limits, cancellation, ordering, contracts, logging."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from pydantic import create_model

from stroma import AsyncInMemoryStore, FailureClass, RunStatus, replay
from stroma import effects as fx
from stroma.plan import map_each, parallel, seq
from stroma.runner import RunConfig, interpret
from tests.combinators.kit import (
    Gauge,
    Item,
    Items,
    Num,
    Out,
    Script,
    child_lines,
    field_model,
    stable_lines,
)

NO_RETRY = {"RECOVERABLE": {"max_retries": 0, "backoff_seconds": 0},
            "AMBIGUOUS": {"max_retries": 0, "backoff_seconds": 0}}


def gauged_children(script: Script, gauge: Gauge, n: int) -> list[Any]:
    children = []
    for i in range(n):
        model = field_model(f"f{i}")

        async def body(s: Num, i: int = i) -> dict[str, int]:
            await gauge.hold()
            return {f"f{i}": s.value + i}

        children.append(script.node(f"c{i}", Num, model, body))
    return children


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 5, None])
async def test_parallel_peak_concurrency_equals_the_limit(anyio_backend: str,
                                                          limit: int | None) -> None:
    """20 parallel children with max_concurrency=k never run more than k at once, and do
    reach k (without a limit all 20 run at once)."""
    script, gauge = Script(), Gauge()
    group = parallel(*gauged_children(script, gauge, 20), max_concurrency=limit)
    result = await interpret([group], Num(value=1))
    assert result.status is RunStatus.COMPLETED
    assert gauge.peak == (limit or 20) and gauge.running == 0
    assert result.final_state.model_dump() == {f"f{i}": 1 + i for i in range(20)}


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 5, None])
async def test_map_peak_concurrency_equals_the_limit(anyio_backend: str,
                                                     limit: int | None) -> None:
    """map_each over 20 items with max_concurrency=k runs at most, and at some point
    exactly, k items at once."""
    script, gauge = Script(), Gauge()

    async def body(i: Item) -> dict[str, int]:
        await gauge.hold()
        return {"out": i.item * 10}

    sq = script.node("sq", Item, Out, body)
    plan = seq(map_each(sq, over="items", into="outs", max_concurrency=limit, input=Items))
    result = await interpret(plan, Items(items=list(range(20))))
    assert result.status is RunStatus.COMPLETED
    assert gauge.peak == (limit or 20) and script.calls["sq"] == 20
    assert [o["out"] for o in result.final_state.model_dump()["outs"]] == [
        i * 10 for i in range(20)
    ]


@pytest.mark.anyio
async def test_the_limit_covers_whole_sub_plans(anyio_backend: str) -> None:
    """With a sub-plan body, max_concurrency bounds the sub-plans in flight, not nodes."""
    script, gauge = Script(), Gauge()
    inside = Gauge()

    async def first(i: Item) -> dict[str, int]:
        gauge.running += 1
        gauge.peak = max(gauge.peak, gauge.running)
        await inside.hold()
        return {"item": i.item + 1}

    async def second(i: Item) -> dict[str, int]:
        await inside.hold()
        gauge.running -= 1
        return {"out": i.item}

    body = seq(script.node("first", Item, Item, first), script.node("second", Item, Out, second))
    plan = seq(map_each(body, over="items", into="outs", max_concurrency=3, input=Items))
    result = await interpret(plan, Items(items=list(range(12))))
    assert result.status is RunStatus.COMPLETED
    assert gauge.peak == 3 and inside.peak == 3


@pytest.mark.anyio
async def test_the_first_failure_cancels_the_siblings(anyio_backend: str) -> None:
    """A failing child cancels a sibling blocked on an event; the sibling's cancellation is
    recorded as NodeCancelled, the failure as NodeRaised, and the run FAILS with the
    failing child's error, not with a cancellation."""
    script = Script()
    never = anyio.Event()
    state = {"cancelled": False, "started": anyio.Event()}

    async def blocked(s: Num) -> dict[str, int]:
        state["started"].set()
        try:
            await never.wait()
        except anyio.get_cancelled_exc_class():
            state["cancelled"] = True
            raise
        return {"a": 0}

    async def boom(s: Num) -> dict[str, int]:
        await state["started"].wait()
        raise KeyError("boom")

    group = parallel(
        script.node("blocked", Num, field_model("a"), blocked),
        script.node("boom", Num, field_model("b"), boom),
    )
    result = await interpret([group], Num(value=1), config=RunConfig(run_id="cancel"),
                             store=AsyncInMemoryStore())
    assert state["cancelled"] and not never.is_set()
    assert result.status is RunStatus.PARTIAL  # KeyError is AMBIGUOUS: retried, then gave up
    outcomes = [json.loads(line) for line in result.log.to_jsonl().splitlines()]
    children = [o for o in outcomes if "child" in o]
    assert children and all(
        c["event"]["t"] == ("NodeCancelled" if c["child"] == 0 else "NodeRaised")
        for c in children
    )
    assert all("KeyError" in c["event"]["error"]["type_names"][0]
               for c in children if c["child"] == 1)
    failures = [e for e in result.trace if e.failure is not None]
    assert failures and {e.failure for e in failures} == {FailureClass.AMBIGUOUS}
    assert all("boom" in (e.failure_message or "") for e in failures)
    assert "cancel" not in (result.stop_reason or "").lower()


@pytest.mark.anyio
async def test_a_failing_map_item_cancels_the_other_items(anyio_backend: str) -> None:
    """In map_each, one item's terminal failure cancels the items still running; the run is
    FAILED naming the map step."""
    script = Script()
    gate = anyio.Event()
    cancelled: list[int] = []

    async def body(i: Item) -> dict[str, int]:
        if i.item == 3:
            await anyio.sleep(0)
            raise PermissionError("item 3 may not")
        try:
            await gate.wait()
        except anyio.get_cancelled_exc_class():
            cancelled.append(i.item)
            raise
        return {"out": i.item}

    classify = lambda exc, ctx: FailureClass.TERMINAL  # noqa: E731
    plan = seq(map_each(script.node("m", Item, Out, body), over="items", into="outs",
                        input=Items))
    result = await interpret(plan, Items(items=list(range(6))),
                             config=RunConfig(classifiers=[classify]))
    assert result.status is RunStatus.FAILED
    assert sorted(cancelled) == [0, 1, 2, 4, 5]
    assert "map_each(m, over=items, into=outs)" in (result.stop_reason or "")
    assert "PermissionError" in (result.stop_reason or "")
    kinds = [c["event"]["t"] for c in child_lines(result.log.to_jsonl())]
    assert kinds == ["NodeCancelled"] * 3 + ["NodeRaised"] + ["NodeCancelled"] * 2


CHILD_MODELS = [
    create_model(f"Child{k}", __module__=__name__, **{f"c{k}": (int, ...), "last": (str, ...)})
    for k in range(4)
]


def staggered_plan(script: Script, order: list[int]) -> Any:
    """Three parallel children and a map over four items; child/item k finishes after
    ``order.index(k)`` rounds of checkpoints, so ``order`` is the completion order."""
    def child(k: int) -> Any:
        model = CHILD_MODELS[k]

        async def body(s: Any) -> dict[str, Any]:
            for _ in range(order.index(k) * 3):
                await anyio.sleep(0)
            return {f"c{k}": k, "last": f"child{k}"}

        return script.node(f"child{k}", Items, model, body)

    async def item_body(i: Item) -> dict[str, int]:
        for _ in range(order.index(i.item) * 3):
            await anyio.sleep(0)
        return {"out": i.item * 100}

    return seq(
        map_each(script.node("sq", Item, Out, item_body), over="items", into="outs",
                 input=Items),
        parallel(child(0), child(1), child(2), child(3)),
    )


@pytest.mark.anyio
async def test_outputs_merge_in_argument_order_whatever_the_completion_order(
    anyio_backend: str,
) -> None:
    """Children finishing in order or in reverse give the same merged state (a later
    argument wins a shared key) and the same log text, timestamps aside."""
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        script = Script()
        results.append(await interpret(
            staggered_plan(script, order), Items(items=[0, 1, 2, 3]),
            config=RunConfig(run_id="order", seed=7), store=AsyncInMemoryStore(),
        ))
    first = results[0]
    assert first.status is RunStatus.COMPLETED
    assert first.final_state.model_dump() == {
        "c0": 0, "c1": 1, "c2": 2, "c3": 3, "last": "child3",
    }
    texts = [stable_lines(r.log.to_jsonl()) for r in results]
    assert texts[0] == texts[1] == texts[2]
    assert all(r.final_state == first.final_state for r in results)
    assert [r.trace.diff(first.trace) for r in results] == [[]] * 3


@pytest.mark.anyio
async def test_a_bad_child_output_is_a_terminal_contract_violation(anyio_backend: str) -> None:
    """A parallel child returning an output that breaks its contract fails the run FAILED
    with a ContractViolation naming the child, without retrying."""
    script = Script()

    async def good(s: Num) -> dict[str, int]:
        return {"a": 1}

    async def bad(s: Num) -> dict[str, str]:
        return {"b": "not a number"}

    group = parallel(script.node("good", Num, field_model("a"), good),
                     script.node("bad", Num, field_model("b"), bad))
    result = await interpret([group], Num(value=1))
    assert result.status is RunStatus.FAILED
    assert "ContractViolation" in (result.stop_reason or "")
    assert "'bad'" in (result.stop_reason or "") or "bad" in (result.stop_reason or "")
    assert script.calls == {"good": 1, "bad": 1}
    [event] = list(result.trace)
    assert event.failure is FailureClass.TERMINAL and event.node_id == "parallel(good, bad)"


@pytest.mark.anyio
async def test_a_bad_map_item_output_is_a_terminal_contract_violation(
    anyio_backend: str,
) -> None:
    """A map item whose output breaks the body's contract fails the run FAILED."""
    script = Script()

    async def body(i: Item) -> dict[str, Any]:
        return {"out": "x" if i.item == 2 else i.item}

    plan = seq(map_each(script.node("m", Item, Out, body), over="items", into="outs",
                        input=Items))
    result = await interpret(plan, Items(items=[1, 2, 3]))
    assert result.status is RunStatus.FAILED and "ContractViolation" in (result.stop_reason or "")
    assert script.calls["m"] == 3


@pytest.mark.anyio
async def test_a_parallel_is_one_trace_event_with_one_log_line_per_child(
    anyio_backend: str,
) -> None:
    """A group of four children is one trace event and one log record, written as a head
    line plus one "child" line per child in argument order."""
    script, gauge = Script(), Gauge()
    group = parallel(*gauged_children(script, gauge, 4), max_concurrency=2)
    result = await interpret([group], Num(value=0), config=RunConfig(run_id="lines"),
                             store=AsyncInMemoryStore())
    assert [e.node_id for e in result.trace] == ["parallel(c0, c1, c2, c3)"]
    text = result.log.to_jsonl()
    heads = [json.loads(line) for line in text.splitlines()
             if '"CallParallel"' in line and '"child"' not in line]
    assert len(heads) == 1 and heads[0]["effect"]["n"] == 4
    assert heads[0]["effect"]["max_concurrency"] == 2
    kids = child_lines(text)
    assert [k["child"] for k in kids] == [0, 1, 2, 3]
    assert [k["effect"]["node_id"] for k in kids] == ["c0", "c1", "c2", "c3"]
    assert all(k["i"] == heads[0]["i"] and k["event"]["t"] == "NodeReturned" for k in kids)


@pytest.mark.anyio
async def test_a_map_with_no_items_gives_an_empty_list(anyio_backend: str) -> None:
    """map_each over an empty list calls nothing and sets ``into`` to []."""
    script = Script()

    async def body(i: Item) -> dict[str, int]:
        return {"out": 0}

    plan = seq(map_each(script.node("m", Item, Out, body), over="items", into="outs",
                        input=Items))
    result = await interpret(plan, Items(items=[]))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump() == {"items": [], "outs": []}
    assert script.calls == {}


@pytest.mark.anyio
async def test_a_group_timeout_cancels_the_children_and_is_a_timeout(anyio_backend: str) -> None:
    """with_timeout on a parallel group cancels children still running at the deadline; the
    log records the facts (the unfinished child cancelled, the deadline passed) and the
    machine makes the attempt a TimeoutError (RECOVERABLE), not a cancellation."""
    script = Script()
    never = anyio.Event()

    async def stuck(s: Num) -> dict[str, int]:
        await never.wait()
        return {"a": 1}

    async def quick(s: Num) -> dict[str, int]:
        return {"b": 2}

    plan = seq(parallel(script.node("stuck", Num, field_model("a"), stuck),
                        script.node("quick", Num, field_model("b"), quick)))
    plan = plan.with_timeout("parallel(stuck, quick)", 5)
    result = await interpret(plan, Num(value=1), config=RunConfig(policy_map=NO_RETRY))
    assert result.status is RunStatus.PARTIAL
    assert "timed out after 5 ms" in (result.stop_reason or "")
    [event] = list(result.trace)
    assert event.failure is FailureClass.RECOVERABLE
    kinds = [c["event"]["t"] for c in child_lines(result.log.to_jsonl())]
    assert kinds == ["NodeCancelled", "NodeReturned"]
    group = next(r for r in result.log.records if isinstance(r[0], fx.CallParallel))
    assert group[1].deadline_passed is True


async def _past_the_deadline(how: str) -> None:
    """What a child that does not let its group's deadline stop it does: it shields its
    work from the cancellation, or swallows the cancellation, and returns late."""
    if how == "shield":
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.03)
    else:
        try:
            await anyio.sleep(0.03)
        except anyio.get_cancelled_exc_class():
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["shield", "swallow"])
@pytest.mark.parametrize("limit", [None, 1])
async def test_a_parallel_child_returning_after_the_groups_deadline_is_a_timeout(
    anyio_backend: str, how: str, limit: int | None
) -> None:
    """A parallel group with a timeout whose child shields or swallows the cancellation and
    returns after the deadline fails its attempt with a TimeoutError (RECOVERABLE), as a
    node does; it used to COMPLETE. The log holds the facts: every child returned, and the
    deadline passed."""
    script = Script()

    async def quick(s: Num) -> dict[str, int]:
        return {"a": 1}

    async def stubborn(s: Num) -> dict[str, int]:
        await _past_the_deadline(how)
        return {"b": 2}

    plan = seq(parallel(script.node("quick", Num, field_model("a"), quick),
                        script.node("stubborn", Num, field_model("b"), stubborn),
                        max_concurrency=limit))
    plan = plan.with_timeout("parallel(quick, stubborn)", 5)
    result = await interpret(plan, Num(value=1), config=RunConfig(policy_map=NO_RETRY))
    assert result.status is RunStatus.PARTIAL
    assert result.final_state == Num(value=1)
    [event] = list(result.trace)
    assert event.failure is FailureClass.RECOVERABLE
    assert event.failure_message == (
        "'parallel(quick, stubborn)' timed out after 5 ms: a child returned after its "
        "deadline (it shielded or swallowed the cancellation, or blocked the event loop)")
    kinds = [c["event"]["t"] for c in child_lines(result.log.to_jsonl())]
    assert kinds == ["NodeReturned", "NodeReturned"]
    group = next(r for r in result.log.records if isinstance(r[0], fx.CallParallel))
    assert group[1].deadline_passed is True
    replayed = await replay(plan, result.log)
    assert replayed.status is RunStatus.PARTIAL and replayed.trace.diff(result.trace) == []


@pytest.mark.anyio
async def test_a_map_item_returning_after_the_groups_deadline_is_a_timeout_and_is_kept(
    anyio_backend: str,
) -> None:
    """The same for map_each; what its children did is kept for the group's retry, as for
    any failed attempt of a group: the retry calls none of them again."""
    script = Script()

    async def body(i: Item) -> dict[str, int]:
        if i.item == 2:
            await _past_the_deadline("shield")
        return {"out": i.item * 10}

    step = "map_each(m, over=items, into=outs)"
    plan = seq(map_each(script.node("m", Item, Out, body), over="items", into="outs",
                        input=Items)).with_timeout(step, 5)
    one_retry = {"RECOVERABLE": {"max_retries": 1, "backoff_seconds": 0}}
    result = await interpret(plan, Items(items=[1, 2, 3]),
                             config=RunConfig(policy_map=one_retry))
    assert [(e.attempt, e.failure) for e in result.trace] == [
        (1, FailureClass.RECOVERABLE), (2, None)]
    assert f"{step!r} timed out after 5 ms: a child returned" in (
        result.trace.events[0].failure_message or "")
    assert script.calls["m"] == 3
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump()["outs"] == [{"out": 10}, {"out": 20}, {"out": 30}]


@pytest.mark.anyio
async def test_a_child_turning_its_groups_timeout_into_another_error_is_a_timeout(
    anyio_backend: str,
) -> None:
    """A child that its group's deadline cancels and that then raises an error of its own
    (an HTTP client's ConnectionError) fails the group's attempt with a TimeoutError of the
    group (RECOVERABLE), naming the child and its error; it used to be the child's error
    (AMBIGUOUS), with the timeout gone from the trace."""
    script = Script()

    async def quick(s: Num) -> dict[str, int]:
        return {"a": 1}

    async def fetch(s: Num) -> dict[str, int]:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("connection closed") from None
        return {"b": 2}

    plan = seq(parallel(script.node("quick", Num, field_model("a"), quick),
                        script.node("fetch", Num, field_model("b"), fetch)))
    plan = plan.with_timeout("parallel(quick, fetch)", 5)
    result = await interpret(plan, Num(value=1), config=RunConfig(policy_map=NO_RETRY))
    assert result.status is RunStatus.PARTIAL
    [event] = list(result.trace)
    assert event.failure is FailureClass.RECOVERABLE
    assert event.failure_message == (
        "'parallel(quick, fetch)' timed out after 5 ms and was cancelled (its child "
        "'fetch' then raised ConnectionError: connection closed)")
    replayed = await replay(plan, result.log)
    assert replayed.trace.diff(result.trace) == []


@pytest.mark.anyio
async def test_a_group_whose_children_return_within_its_timeout_completes(
    anyio_backend: str,
) -> None:
    """A group whose children all return before its deadline completes: no timeout is
    reported for it."""
    script = Script()

    async def quick(s: Num) -> dict[str, int]:
        await anyio.sleep(0)
        return {"a": 1}

    async def also(s: Num) -> dict[str, int]:
        await anyio.sleep(0)
        return {"b": 2}

    plan = seq(parallel(script.node("quick", Num, field_model("a"), quick),
                        script.node("also", Num, field_model("b"), also)))
    plan = plan.with_timeout("parallel(quick, also)", 5_000)
    result = await interpret(plan, Num(value=1), config=RunConfig(policy_map=NO_RETRY))
    assert result.status is RunStatus.COMPLETED
    group = next(r for r in result.log.records if isinstance(r[0], fx.CallParallel))
    assert group[1].deadline_passed is False


@pytest.mark.anyio
async def test_with_retry_on_a_group_retries_the_group(anyio_backend: str) -> None:
    """A retry policy set on a group's id retries the group as one unit (one trace event
    per attempt); a retry runs only the children that have not succeeded yet."""
    script = Script()
    seen = {"n": 0}

    async def flaky(s: Num) -> dict[str, int]:
        seen["n"] += 1
        if seen["n"] < 3:
            raise TimeoutError("not yet")
        return {"a": 1}

    async def steady(s: Num) -> dict[str, int]:
        return {"b": 2}

    plan = seq(parallel(script.node("flaky", Num, field_model("a"), flaky),
                        script.node("steady", Num, field_model("b"), steady)))
    plan = plan.with_retry("parallel(flaky, steady)",
                           {"RECOVERABLE": {"max_retries": 2, "backoff_seconds": 0}})
    result = await interpret(plan, Num(value=1), config=RunConfig(policy_map=NO_RETRY))
    assert result.status is RunStatus.COMPLETED
    assert script.calls == {"flaky": 3, "steady": 1}
    assert [e.attempt for e in result.trace] == [1, 2, 3]


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 2])
async def test_a_bounded_map_starts_its_items_in_order_on_every_backend(
    anyio_backend: str, limit: int
) -> None:
    """With max_concurrency, items take their places in argument order (trio starts tasks
    in any order; the group does not leave it to the scheduler): the first ``limit`` items
    are the first to run, and with one place the items run one after another in order."""
    started: list[int] = []

    async def visit(i: Item) -> dict[str, int]:
        started.append(i.item)
        await anyio.sleep(0)
        return {"out": i.item}

    script = Script()
    plan = seq(map_each(script.node("visit", Item, Out, visit), over="items", into="outs",
                        input=Items, max_concurrency=limit))
    result = await interpret(plan, Items(items=list(range(8))))
    assert result.status is RunStatus.COMPLETED
    assert sorted(started) == list(range(8))
    assert set(started[:limit]) == set(range(limit))
    if limit == 1:
        assert started == list(range(8))
