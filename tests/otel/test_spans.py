"""The span tree of a traced run, exactly: a span per run, per node attempt (retries as
siblings), per group attempt with a span per child (a plan child's nodes beneath it), and
the waits, budget stops and raising hooks as span events, with the attributes and
statuses ``stroma.otel`` names."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    NodeContract,
    NodeHooks,
    RunConfig,
    RunStatus,
    StromaRunner,
    interpret,
    map_each,
    parallel,
    seq,
    stroma_node,
)
from stroma import effects as fx
from stroma.cost import estimate_cost_usd
from stroma.otel import (
    ATTEMPT,
    BACKOFF_EVENT,
    BACKOFF_SECONDS,
    BUDGET_STOP_EVENT,
    CHILD_ID,
    CHILD_INDEX,
    COST_USD,
    ERROR_TYPE,
    FAILURE_CLASS,
    FAILURE_MESSAGE,
    HOOK,
    HOOK_FAILED_EVENT,
    INPUT_TOKENS,
    ITEM,
    ITEM_INDEX,
    LATENCY_MS,
    MESSAGE,
    MODEL,
    NODE_ID,
    OUTCOME,
    OUTPUT_TOKENS,
    RUN_ID,
    STATUS,
    STOP_REASON,
    TIMEOUT_MS,
    TOTAL_TOKENS,
    WHERE,
    Tracing,
)
from tests.otel.telemetry import Telemetry, node

pytestmark = pytest.mark.anyio


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


class Out(BaseModel):
    out: int


def contract(node_id: str, inp: type[BaseModel], out: type[BaseModel]) -> NodeContract:
    return NodeContract(node_id=node_id, input_schema=inp, output_schema=out)


def retries(n: int, backoff: float = 0.0) -> dict[FailureClass, FailurePolicy]:
    return {c: FailurePolicy(max_retries=n, backoff_seconds=backoff) for c in FailureClass}


async def skip_sleep(seconds: float) -> None:
    """The backoff without the wait (interpret's ``sleep``): the run goes on at once."""
    await anyio.lowlevel.checkpoint()


def traced(telemetry: Telemetry, **fields: Any) -> RunConfig:
    return RunConfig(tracing=Tracing(telemetry.tracer_provider, telemetry.meter_provider),
                     **fields)


def ran(result: Any, telemetry: Telemetry, **more: Any) -> dict[str, Any]:
    """The run span's attributes: its id and the Finish record's totals."""
    finish = result.log.finish
    attributes = {RUN_ID: result.run_id, STATUS: finish.status.value,
                  TOTAL_TOKENS: finish.total_tokens, COST_USD: finish.total_cost_usd,
                  LATENCY_MS: finish.total_latency_ms}
    if finish.reason is not None:
        attributes[STOP_REASON] = finish.reason
    attributes.update(more)
    return attributes


def group_records(result: Any) -> list[tuple[fx.CallParallel, fx.ParallelReturned]]:
    return [(eff, ev) for eff, ev in (r for r in result.log.records if type(r) is tuple)
            if type(eff) is fx.CallParallel]


def assert_nested_in_time(telemetry: Telemetry) -> None:
    """Every span lies within its parent's time, and its events within its own."""
    spans = {s.context.span_id: s for s in telemetry.spans()}
    for s in spans.values():
        assert s.start_time is not None and s.end_time is not None
        assert s.start_time <= s.end_time
        parent = spans.get(s.parent.span_id) if s.parent is not None else None
        if parent is not None:
            assert parent.start_time <= s.start_time <= s.end_time <= parent.end_time  # type: ignore[operator]
        for e in s.events:
            assert s.start_time <= e.timestamp <= s.end_time


async def test_retries_are_sibling_attempt_spans_and_backoffs_run_events(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A node that fails twice then succeeds gives three sibling attempt spans under the
    run's: ERROR with the failure class, message, error type and an exception event for
    the failures, OK with the GenAI usage and cost for the success; each backoff is an
    event on the run's span naming the attempt it precedes."""
    calls: list[int] = []

    @stroma_node("fetch", contract("fetch", Num, Num))
    async def fetch(state: Num) -> tuple[dict[str, int], int, int, str]:
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError(f"drop {len(calls)}")
        return {"value": state.value + 1}, 120, 30, "gpt-4o"

    config = traced(telemetry, policy_map=retries(3, backoff=1.0), seed=7)
    result = await interpret([fetch], Num(value=1), config=config, sleep=skip_sleep)

    assert result.status is RunStatus.COMPLETED
    waits = [eff.seconds for eff, _ in (r for r in result.log.records if type(r) is tuple)
             if type(eff) is fx.Sleep]
    assert len(waits) == 2
    run_id = result.run_id

    def failed(attempt: int) -> dict[str, Any]:
        return node("stroma node fetch", f"ERROR: drop {attempt}", {
            RUN_ID: run_id, NODE_ID: "fetch", ATTEMPT: attempt,
            FAILURE_CLASS: "AMBIGUOUS", FAILURE_MESSAGE: f"drop {attempt}",
            ERROR_TYPE: "ConnectionError", OUTCOME: "failed",
        }, [("exception", {"exception.type": "ConnectionError",
                           "exception.message": f"drop {attempt}"})])

    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [
        (BACKOFF_EVENT, {BACKOFF_SECONDS: waits[0], NODE_ID: "fetch", ATTEMPT: 2}),
        (BACKOFF_EVENT, {BACKOFF_SECONDS: waits[1], NODE_ID: "fetch", ATTEMPT: 3}),
    ], [
        failed(1),
        failed(2),
        node("stroma node fetch", "OK", {
            RUN_ID: run_id, NODE_ID: "fetch", ATTEMPT: 3, INPUT_TOKENS: 120,
            OUTPUT_TOKENS: 30, COST_USD: estimate_cost_usd("gpt-4o", 120, 30),
            MODEL: "gpt-4o", OUTCOME: "succeeded",
        }),
    ])]
    assert result.total_cost_usd == estimate_cost_usd("gpt-4o", 120, 30)
    assert_nested_in_time(telemetry)
    run_span = telemetry.named("stroma run")[0]
    attempts = telemetry.named("stroma node fetch")
    # Backoffs lie between the attempts they separate; attempts do not overlap.
    for before, event, after in zip(attempts, run_span.events, attempts[1:], strict=False):
        assert before.end_time <= event.timestamp <= after.start_time  # type: ignore[operator]
    # The exception event of a live exception carries its stack.
    stack = attempts[0].events[0].attributes["exception.stacktrace"]  # type: ignore[index]
    assert "ConnectionError: drop 1" in str(stack)


async def test_a_timeout_is_a_failed_attempt_span_with_its_timeout(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A node cancelled by its timeout is an ERROR attempt span (RECOVERABLE, TimeoutError,
    the timeout's message) and its retry a sibling OK span; both say the timeout."""
    calls: list[int] = []

    @stroma_node("slow", contract("slow", Num, Num))
    async def slow(state: Num) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            await anyio.sleep_forever()
        return {"value": state.value * 2}

    runner = StromaRunner.quick(policy_map=retries(1)).with_node_timeouts({"slow": 20})
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([slow], Num(value=4))

    assert result.status is RunStatus.COMPLETED and result.final_state == Num(value=8)
    message = "node 'slow' timed out after 20 ms and was cancelled"
    run_id = result.run_id
    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [], [
        node("stroma node slow", f"ERROR: {message}", {
            RUN_ID: run_id, NODE_ID: "slow", ATTEMPT: 1, TIMEOUT_MS: 20,
            FAILURE_CLASS: "RECOVERABLE", FAILURE_MESSAGE: message,
            ERROR_TYPE: "TimeoutError", OUTCOME: "failed",
        }, [("exception", {"exception.type": "TimeoutError", "exception.message": message})]),
        node("stroma node slow", "OK", {
            RUN_ID: run_id, NODE_ID: "slow", ATTEMPT: 2, TIMEOUT_MS: 20,
            OUTCOME: "succeeded",
        }),
    ])]
    assert_nested_in_time(telemetry)


async def test_a_parallel_group_attempt_has_a_span_per_child(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A parallel group's attempt is a span with one child span per child: the child that
    raised is ERROR with its exception, its sibling cancelled (ERROR, naming why); the
    group's retry is a sibling group span whose children both succeed."""
    left_calls: list[int] = []
    right_calls: list[int] = []

    @stroma_node("left", contract("left", Num, Left))
    async def left(state: Num) -> dict[str, int]:
        left_calls.append(1)
        if len(left_calls) == 1:
            await anyio.sleep_forever()  # cancelled when its sibling fails
        return {"left": state.value}

    @stroma_node("right", contract("right", Num, Right))
    async def right(state: Num) -> dict[str, int]:
        right_calls.append(1)
        if len(right_calls) == 1:
            raise ValueError("right broke")
        return {"right": -state.value}

    group = parallel(left, right)
    runner = StromaRunner.quick(policy_map=retries(1))
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([group], Num(value=3))

    assert result.status is RunStatus.COMPLETED
    step = group.step_id
    run_id = result.run_id

    def child(node_id: str, index: int, attempt: int, status: str = "OK",
              **more: Any) -> dict[str, Any]:
        attributes = {RUN_ID: run_id, NODE_ID: node_id, ATTEMPT: attempt,
                      CHILD_INDEX: index, OUTCOME: "succeeded"}
        attributes.update(more.pop("attributes", {}))
        return node(f"stroma node {node_id}", status, attributes, **more)

    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [], [
        node(f"stroma parallel {step}", "ERROR: right broke", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 1, FAILURE_CLASS: "AMBIGUOUS",
            FAILURE_MESSAGE: "right broke", ERROR_TYPE: "ValueError", OUTCOME: "failed",
        }, [("exception", {"exception.type": "ValueError", "exception.message": "right broke"})],
            [
            child("left", 0, 1, "ERROR: cancelled: child 1 failed",
                  attributes={OUTCOME: "cancelled"}),
            child("right", 1, 1, "ERROR: right broke", attributes={
                FAILURE_CLASS: "AMBIGUOUS", FAILURE_MESSAGE: "right broke",
                ERROR_TYPE: "ValueError", OUTCOME: "failed",
            }, events=[("exception", {"exception.type": "ValueError",
                                      "exception.message": "right broke"})]),
        ]),
        node(f"stroma parallel {step}", "OK", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 2, OUTCOME: "succeeded",
        }, [], [child("left", 0, 2), child("right", 1, 2)]),
    ])]
    assert_nested_in_time(telemetry)


async def test_a_map_each_attempt_has_a_span_per_item(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A map_each attempt's span has a span per item with its item index; when one item
    fails, the group's retry runs (and shows) only that item."""
    finished = anyio.Event()
    done: list[int] = []
    failed_once: list[int] = []

    @stroma_node("double", contract("double", Item, Out))
    async def double(item: Item) -> dict[str, int]:
        if item.item == 20 and not failed_once:
            await finished.wait()  # the other items have returned
            failed_once.append(1)
            raise RuntimeError("item 20 broke")
        done.append(item.item)
        if len(done) == 2:
            finished.set()
        return {"out": item.item * 2}

    mapped = map_each(double, over="items", into="outs", input=Items)
    runner = StromaRunner.quick(policy_map=retries(1))
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([mapped], Items(items=[10, 20, 30]))

    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump()["outs"] == [{"out": 20}, {"out": 40}, {"out": 60}]
    step = mapped.step_id
    run_id = result.run_id

    def item(index: int, attempt: int) -> dict[str, Any]:
        return node("stroma node double", "OK", {
            RUN_ID: run_id, NODE_ID: "double", ATTEMPT: attempt, ITEM_INDEX: index,
            ITEM: index, WHERE: f"{step}[{index}]", OUTCOME: "succeeded",
        })

    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [], [
        node(f"stroma map {step}", "ERROR: item 20 broke", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 1, FAILURE_CLASS: "AMBIGUOUS",
            FAILURE_MESSAGE: "item 20 broke", ERROR_TYPE: "RuntimeError", OUTCOME: "failed",
        }, [("exception", {"exception.type": "RuntimeError",
                           "exception.message": "item 20 broke"})], [
            item(0, 1),
            node("stroma node double", "ERROR: item 20 broke", {
                RUN_ID: run_id, NODE_ID: "double", ATTEMPT: 1, ITEM_INDEX: 1,
                ITEM: 1, WHERE: f"{step}[1]", FAILURE_CLASS: "AMBIGUOUS",
                FAILURE_MESSAGE: "item 20 broke",
                ERROR_TYPE: "RuntimeError", OUTCOME: "failed",
            }, [("exception", {"exception.type": "RuntimeError",
                               "exception.message": "item 20 broke"})]),
            item(2, 1),
        ]),
        node(f"stroma map {step}", "OK", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 2, OUTCOME: "succeeded",
        }, [], [item(1, 2)]),
    ])]
    assert_nested_in_time(telemetry)


async def test_a_plan_child_has_its_nodes_attempts_beneath_it(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A map_each whose step is a sub-plan gives one ``stroma child`` span per item, with
    the sub-plan's totals, and that item's node attempts (its own retries included)
    beneath it."""
    second_calls: list[int] = []

    @stroma_node("first", contract("first", Item, Item))
    async def first(item: Item) -> dict[str, int]:
        return {"item": item.item + 1}

    @stroma_node("second", contract("second", Item, Out))
    async def second(item: Item) -> tuple[dict[str, int], int, str]:
        if item.item == 3:
            second_calls.append(1)
            if len(second_calls) == 1:
                raise ConnectionError("second dropped")
        return {"out": item.item * 10}, 7, "gpt-4o-mini"

    mapped = map_each(seq(first, second), over="items", into="outs", input=Items)
    runner = StromaRunner.quick(policy_map=retries(1))
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([mapped], Items(items=[1, 2]))

    assert result.status is RunStatus.COMPLETED
    step = mapped.step_id
    run_id = result.run_id
    [(_, returned)] = group_records(result)
    finished = returned.outcomes
    assert [type(o) for o in finished] == [fx.PlanFinished, fx.PlanFinished]
    cost = estimate_cost_usd("gpt-4o-mini", 7, 0)

    def attempt(node_id: str, number: int, index: int, **more: Any) -> dict[str, Any]:
        attributes = {RUN_ID: run_id, NODE_ID: node_id, ATTEMPT: number, ITEM: index,
                      WHERE: f"{step}[{index}]"}
        if node_id == "second":
            attributes.update({INPUT_TOKENS: 7, OUTPUT_TOKENS: 0, COST_USD: cost,
                               MODEL: "gpt-4o-mini"})
        attributes[OUTCOME] = "succeeded"
        return node(f"stroma node {node_id}", "OK", attributes, **more)

    def plan_child(index: int, children: list[dict[str, Any]]) -> dict[str, Any]:
        outcome = finished[index]
        return node(f"stroma child {step}[{index}]", "OK", {
            RUN_ID: run_id, CHILD_ID: f"{step}[{index}]", ATTEMPT: 1, ITEM_INDEX: index,
            ITEM: index, WHERE: f"{step}[{index}]", OUTCOME: "succeeded", STATUS: "COMPLETED",
            TOTAL_TOKENS: 7, COST_USD: cost,
            LATENCY_MS: outcome.total_latency_ms,
        }, [], children)

    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [], [
        node(f"stroma map {step}", "OK", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 1, OUTCOME: "succeeded",
        }, [], [
            plan_child(0, [attempt("first", 1, 0), attempt("second", 1, 0)]),
            plan_child(1, [
                attempt("first", 1, 1),
                node("stroma node second", "ERROR: second dropped", {
                    RUN_ID: run_id, NODE_ID: "second", ATTEMPT: 1, ITEM: 1,
                    WHERE: f"{step}[1]", FAILURE_CLASS: "AMBIGUOUS",
                    FAILURE_MESSAGE: "second dropped",
                    ERROR_TYPE: "ConnectionError", OUTCOME: "failed",
                }, [("exception", {"exception.type": "ConnectionError",
                                   "exception.message": "second dropped"})]),
                attempt("second", 2, 1),
            ]),
        ]),
    ])]
    assert_nested_in_time(telemetry)


async def test_a_budget_stop_is_an_event_and_the_run_span_says_why(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A step not started because the budget is spent is a ``stroma.budget_stop`` event on
    the run's span, not an attempt span; the run's span is ERROR with the reason, PARTIAL."""

    @stroma_node("spend", contract("spend", Num, Num))
    async def spend(state: Num) -> tuple[dict[str, int], int, int, str]:
        return {"value": state.value}, 60, 40, "gpt-4o-mini"

    @stroma_node("after", contract("after", Num, Num))
    async def after(state: Num) -> dict[str, int]:
        raise AssertionError("a spent budget starts no node")

    runner = StromaRunner.quick().with_budget(tokens=100)
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([spend, after], Num(value=1))

    reason = "budget spent (tokens 100 of 100): 'after' was not started"
    assert result.status is RunStatus.PARTIAL and result.stop_reason == reason
    run_id = result.run_id
    assert telemetry.tree() == [node("stroma run", f"ERROR: {reason}",
                                     ran(result, telemetry), [
        (BUDGET_STOP_EVENT, {NODE_ID: "after", ATTEMPT: 1, MESSAGE: reason}),
    ], [
        node("stroma node spend", "OK", {
            RUN_ID: run_id, NODE_ID: "spend", ATTEMPT: 1, INPUT_TOKENS: 60,
            OUTPUT_TOKENS: 40, COST_USD: estimate_cost_usd("gpt-4o-mini", 60, 40),
            MODEL: "gpt-4o-mini", OUTCOME: "succeeded",
        }),
    ])]
    assert ran(result, telemetry)[TOTAL_TOKENS] == 100
    assert_nested_in_time(telemetry)


async def test_a_raising_hook_is_an_event_on_its_attempt_and_changes_nothing(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """Hooks that raise are ``stroma.hook_failed`` events on the attempt they fired for
    (the start hook's first, the failure or success hook's after the exception event);
    the attempts' outcomes and the run's are what they are without them."""

    async def on_start(run_id: str, node_id: str, state: Any) -> None:
        if node_id == "a":
            raise RuntimeError("start hook broke")

    async def on_success(run_id: str, node_id: str, state: Any, tokens: int) -> None:
        if node_id == "b":
            raise KeyError("success hook broke")

    async def on_failure(run_id: str, node_id: str, exc: Exception, cls: Any) -> None:
        raise LookupError("failure hook broke")

    calls: list[int] = []

    @stroma_node("a", contract("a", Num, Num))
    async def a(state: Num) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a failed once")
        return {"value": state.value + 1}

    @stroma_node("b", contract("b", Num, Num))
    async def b(state: Num) -> dict[str, int]:
        return {"value": state.value * 3}

    hooks = NodeHooks(on_node_start=on_start, on_node_success=on_success,
                      on_node_failure=on_failure)
    runner = StromaRunner.quick(policy_map=retries(1), hooks=hooks)
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([a, b], Num(value=1))

    assert result.status is RunStatus.COMPLETED and result.final_state == Num(value=6)
    assert [(e.node_id, e.attempt, e.failure) for e in result.trace] == [
        ("a", 1, FailureClass.AMBIGUOUS), ("a", 2, None), ("b", 1, None)
    ]
    run_id = result.run_id
    start_broke = (HOOK_FAILED_EVENT, {HOOK: "start", "exception.type": "RuntimeError",
                                       "exception.message": "start hook broke"})
    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [], [
        node("stroma node a", "ERROR: a failed once", {
            RUN_ID: run_id, NODE_ID: "a", ATTEMPT: 1, FAILURE_CLASS: "AMBIGUOUS",
            FAILURE_MESSAGE: "a failed once", ERROR_TYPE: "ValueError", OUTCOME: "failed",
        }, [
            start_broke,
            ("exception", {"exception.type": "ValueError", "exception.message": "a failed once"}),
            (HOOK_FAILED_EVENT, {HOOK: "failure", "exception.type": "LookupError",
                                 "exception.message": "failure hook broke"}),
        ]),
        node("stroma node a", "OK", {
            RUN_ID: run_id, NODE_ID: "a", ATTEMPT: 2, OUTCOME: "succeeded",
        }, [start_broke]),
        node("stroma node b", "OK", {
            RUN_ID: run_id, NODE_ID: "b", ATTEMPT: 1, OUTCOME: "succeeded",
        }, [(HOOK_FAILED_EVENT, {HOOK: "success", "exception.type": "KeyError",
                                 "exception.message": "'success hook broke'"})]),
    ])]
    assert_nested_in_time(telemetry)


async def test_a_group_that_times_out_cancels_its_children(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A group whose timeout passes is an ERROR group span (RECOVERABLE, the timeout's
    message, error.type TimeoutError, an exception event with them) whose children are
    cancelled, naming the timeout; its retry is a sibling group span."""
    calls: list[str] = []

    def hanging_once(node_id: str, out: type[BaseModel]) -> Any:
        @stroma_node(node_id, contract(node_id, Num, out))
        async def fn(state: Num) -> dict[str, int]:
            calls.append(node_id)
            if calls.count(node_id) == 1:
                await anyio.sleep_forever()
            return {node_id: state.value}

        return fn

    group = parallel(hanging_once("left", Left), hanging_once("right", Right))
    step = group.step_id
    runner = StromaRunner.quick(policy_map=retries(1)).with_node_timeouts({step: 20})
    runner.with_tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await runner.run([group], Num(value=5))

    assert result.status is RunStatus.COMPLETED
    message = f"{step!r} timed out after 20 ms and was cancelled"
    run_id = result.run_id

    def child(node_id: str, index: int, attempt: int, status: str, outcome: str) -> Any:
        return node(f"stroma node {node_id}", status, {
            RUN_ID: run_id, NODE_ID: node_id, ATTEMPT: attempt, CHILD_INDEX: index,
            OUTCOME: outcome,
        })

    cancelled = "ERROR: cancelled: the group's timeout passed"
    assert telemetry.tree() == [node("stroma run", "OK", ran(result, telemetry), [], [
        node(f"stroma parallel {step}", f"ERROR: {message}", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 1, TIMEOUT_MS: 20,
            FAILURE_CLASS: "RECOVERABLE", FAILURE_MESSAGE: message, ERROR_TYPE: "TimeoutError",
            OUTCOME: "failed",
        }, [("exception", {"exception.type": "TimeoutError", "exception.message": message})], [
            child("left", 0, 1, cancelled, "cancelled"),
            child("right", 1, 1, cancelled, "cancelled"),
        ]),
        node(f"stroma parallel {step}", "OK", {
            RUN_ID: run_id, NODE_ID: step, ATTEMPT: 2, TIMEOUT_MS: 20, OUTCOME: "succeeded",
        }, [], [
            child("left", 0, 2, "OK", "succeeded"),
            child("right", 1, 2, "OK", "succeeded"),
        ]),
    ])]
    assert_nested_in_time(telemetry)


async def test_an_output_that_breaks_its_contract_names_its_error_type(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """The attempt whose output broke its contract failed with the machine's
    ContractViolation: its span says so in error.type and in its exception event, as an
    attempt whose node raised does."""

    @stroma_node("bad", contract("bad", Num, Num))
    async def bad(state: Num) -> dict[str, str]:
        return {"value": "not a number"}

    result = await interpret(seq(bad), Num(value=1), config=traced(telemetry))
    assert result.status is RunStatus.FAILED
    [span] = [s for s in telemetry.exporter.get_finished_spans()
              if s.name == "stroma node bad"]
    assert span.attributes is not None
    assert span.attributes[ERROR_TYPE] == "stroma.contracts.ContractViolation"
    assert span.attributes[FAILURE_CLASS] == "TERMINAL"
    [event] = [e for e in span.events if e.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "stroma.contracts.ContractViolation"


async def test_every_failed_attempt_span_names_its_error_type(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A group's attempt that fails carries ``error.type`` as a node's does: the error of
    its first failed child (ChildFailed for a sub-plan child that gave up, the node's own
    exception for a node child), the same type as its exception event."""

    @stroma_node("fine", contract("fine", Num, Left))
    async def fine(state: Num) -> dict[str, int]:
        return {"left": state.value}

    @stroma_node("keep", contract("keep", Num, Num))
    async def keep(state: Num) -> dict[str, int]:
        return {"value": state.value}

    @stroma_node("breaks", contract("breaks", Num, Right))
    async def breaks(state: Num) -> dict[str, int]:
        raise ValueError("breaks broke")

    @stroma_node("each", contract("each", Item, Out))
    async def each(item: Item) -> dict[str, int]:
        if item.item == 1:
            raise KeyError("item 1")
        return {"out": item.item}

    group = parallel(fine, seq(keep, breaks))
    mapped = map_each(each, over="items", into="outs", input=Items)
    config = traced(telemetry, policy_map=retries(0))
    first = await interpret(seq(group), Num(value=1), config=config)
    second = await interpret(seq(mapped), Items(items=[0, 1]), config=config)
    assert first.status is second.status is RunStatus.PARTIAL

    failed = {s.name: s for s in telemetry.spans()
              if s.attributes is not None and s.attributes.get(OUTCOME) == "failed"}
    assert sorted(failed) == sorted([
        f"stroma parallel {group.step_id}", f"stroma child {group.step_id}[1]",
        "stroma node breaks", f"stroma map {mapped.step_id}", "stroma node each",
    ])
    for name, span in failed.items():
        assert span.attributes is not None
        [event] = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert span.attributes[ERROR_TYPE] == event.attributes["exception.type"], name
    assert failed[f"stroma parallel {group.step_id}"].attributes == {
        RUN_ID: first.run_id, NODE_ID: group.step_id, ATTEMPT: 1,
        FAILURE_CLASS: "RECOVERABLE",
        FAILURE_MESSAGE: f"{group.step_id}[1] PARTIAL: 'breaks' gave up after 1 attempt(s) "
                         "(AMBIGUOUS allows 0 retries): ValueError: breaks broke",
        ERROR_TYPE: "stroma.errors.ChildFailed", OUTCOME: "failed",
    }
    assert failed["stroma node breaks"].attributes[ERROR_TYPE] == "ValueError"
    assert failed[f"stroma map {mapped.step_id}"].attributes == {
        RUN_ID: second.run_id, NODE_ID: mapped.step_id, ATTEMPT: 1,
        FAILURE_CLASS: "AMBIGUOUS", FAILURE_MESSAGE: "'item 1'", ERROR_TYPE: "KeyError",
        OUTCOME: "failed",
    }
